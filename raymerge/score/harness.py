"""lm-evaluation-harness on the held model: its HF model wrapper around the worker's PeftModel
(no second copy of the base model), the tasks built once per worker, each merged adapter scored
with itself active. Needs `pip install 'raymerge[lm-eval]'`.

Tasks of your own are YAMLs in `include_path` over local data files (absolute paths: the
harness resolves relative `data_files` against the working directory). A task whose data lives
on the Hugging Face hub needs the hub: where it is unreachable, the error says so.

Every metric comes with the harness's standard error (`M_stderr`): the closed form for means,
a bootstrap of `bootstrap_iters` resamples (default 1000; the harness's command line uses
100,000) for the metrics it bootstraps, run in this process (no process pool inside a worker).
"""

from __future__ import annotations

import os
from typing import Any

from raymerge.errors import InputError
from raymerge.score.requests import prefix_token_id

INSTALL = "pip install 'raymerge[lm-eval]'"


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


class Harness:
    """The harness's task objects, built once; `score(model, adapter)` runs them all."""

    def __init__(self, config: dict[str, Any], tokenizer):
        if not available():
            raise InputError(f"evaluate.lm_eval needs lm-evaluation-harness: {INSTALL}")
        from lm_eval.tasks import TaskManager

        self.config = config
        self.tokenizer = tokenizer
        tasks = list(config["tasks"])
        include = config.get("include_path")
        manager = TaskManager(include_path=include, include_defaults=False) if include else None
        if manager is None or not set(tasks) <= set(manager.all_tasks):
            manager = TaskManager(include_path=include)  # the harness's own tasks too (slower)
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            raise InputError(
                f"evaluate.lm_eval.tasks: {', '.join(unknown)} is not a task lm-eval knows; "
                "check the name, or put its YAML in `include_path`"
            )
        try:
            self.tasks = manager.load(tasks)
        except ConnectionError as exc:  # the datasets library's way of saying: no hub
            raise InputError(
                f"evaluate.lm_eval: a task needs data from the Hugging Face hub, which cannot be "
                f"reached ({str(exc).splitlines()[0]}); run where the hub is reachable, or define "
                "the task over local files in `include_path`"
            ) from exc
        for task in self.tasks["tasks"].values():
            task.set_config(key="num_fewshot", value=config.get("num_fewshot", 0))
        self._lm = None

    def score(self, model, adapter: str | None) -> dict[str, dict[str, float]]:
        """Every task's metrics with `adapter` active (None: the base model alone)."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        if self._lm is None:
            # The harness prefixes each context with BOS (or EOS); a tokenizer without either
            # (a byte-level one) gets its pad token, or token 0.
            self._lm = HFLM(
                pretrained=model,
                tokenizer=self.tokenizer,
                batch_size=self.config["batch_size"],
                prefix_token_id=prefix_token_id(self.tokenizer),
            )
        if adapter is None:
            with model.disable_adapter():
                results = self._evaluate(evaluate)
        else:
            model.set_adapter(adapter)
            results = self._evaluate(evaluate)
        return results

    def _evaluate(self, evaluate) -> dict[str, dict[str, float]]:
        os.environ.setdefault("DISABLE_MULTIPROC", "1")  # the bootstrap in this process
        output = evaluate(
            self._lm,
            self.tasks,
            limit=self.config.get("limit"),
            bootstrap_iters=self.config.get("bootstrap_iters", 1000),
            log_samples=False,
        )
        return harness_metrics(output["results"])


def harness_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{task: {metric: value, metric_stderr: value or None}} from the harness's results
    ("acc,none": the metric, then its filter; "N/A" where it has no stderr)."""
    metrics: dict[str, dict[str, Any]] = {}
    for task, values in results.items():
        for key, value in values.items():
            name, comma, _ = key.partition(",")
            if not comma:
                continue
            if isinstance(value, int | float) and not isinstance(value, bool):
                metrics.setdefault(task, {})[name] = round(float(value), 6)
            elif name.endswith("_stderr"):
                metrics.setdefault(task, {})[name] = None
    return metrics
