"""What a sweep's MLflow runs hold: the parent run's params and artifacts from the plan, each
child run's params, metrics and tags from its merge's manifest line, and `log_batch` that sends
them within MLflow's limits. No threads and no decisions here: `tracking` does those.

Example:
    >>> line = {"merge_id": "0123456789abcdef", "status": "done", "adapters": [{"name": "a"},
    ...     {"name": "b"}], "weights": [0.7, 0.3], "combination_type": "ties",
    ...     "params": {"density": 0.5}, "path": "/out/merges/0123456789abcdef", "kept": True,
    ...     "metrics": {"qa": {"loss": 1.5, "loss_stderr": 0.1, "examples": 64}},
    ...     "objective": 1.5, "objective_stderr": 0.1}
    >>> merge_params(line)["weight.a"], merge_metrics(line)["qa.loss_stderr"], merge_tags(line)
    (0.7, 0.1, {'status': 'done', 'path': '/out/merges/0123456789abcdef', 'kept': 'true'})
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from collections.abc import Iterator
from typing import Any

from raymerge.sweep.plan import Plan
from raymerge.sweep.plan import objective as objective_of

MAX_PARAM_CHARS = 500
"""The longest param value every MLflow server accepts."""
MAX_TAG_CHARS = 5000
"""The longest tag value every MLflow server accepts."""


def spec_params(plan: Plan) -> dict[str, Any]:
    """The parent run's params: what the sweep is, in a few values."""
    spec = plan.spec
    params: dict[str, Any] = {
        "base_model": plan.base_model,
        "adapters": len(plan.adapters_used()),
        "adapter_names": ",".join(plan.adapters_used()),
        "engine": spec.engine,
        "workers": spec.workers,
        "gpus_per_worker": spec.gpus_per_worker,
        "seed": spec.seed,
    }
    if spec.combinations:
        params.update(grid_merges=plan.total(), combination_types=",".join(plan.counts()))
    objective = objective_of(spec)
    if objective is not None:
        params.update(objective=objective.name, objective_direction=objective.direction)
        params["eval_sets"] = ",".join(plan.eval_sets)
        if spec.evaluate.racing is not None:
            params["racing"] = spec.evaluate.racing.rule
    if spec.search is not None:
        params.update(search_sampler=spec.search.sampler_name(), search_budget=spec.search.budget)
    if spec.keep is not None:
        params["keep_top"] = spec.keep.top
    return params


def spec_artifacts(plan: Plan) -> dict[str, str]:
    """The spec file as written, and as validated (defaults and the CLI's overrides in)."""
    artifacts = {"spec/resolved.json": plan.spec.model_dump_json(indent=2)}
    with contextlib.suppress(OSError, UnicodeDecodeError):
        artifacts[f"spec/{plan.spec_path.name}"] = plan.spec_path.read_text()
    return artifacts


def merge_params(line: dict[str, Any]) -> dict[str, Any]:
    """A merge's recipe: merge_id, adapters, weights (also one per adapter), the combination
    type and its parameters, and a search's trial and sampled values."""
    names = [adapter["name"] for adapter in line["adapters"]]
    params: dict[str, Any] = {
        "merge_id": line["merge_id"],
        "adapters": ",".join(names),
        "weights": json.dumps(line["weights"]),
        "combination_type": line["combination_type"],
    }
    params.update({f"weight.{n}": w for n, w in zip(names, line["weights"], strict=False)})
    params.update({k: v for k, v in line["params"].items() if v is not None})
    if line.get("trial") is not None:
        params["trial"] = line["trial"]
    params.update({f"search.{k}": v for k, v in (line.get("search_params") or {}).items()})
    return params


def merge_metrics(line: dict[str, Any]) -> dict[str, float]:
    """Every metric of every eval set as SET.METRIC (its standard error as SET.METRIC_stderr),
    and the objective with its standard error."""
    metrics = {
        f"{name}.{key}": value
        for name, values in line["metrics"].items()
        for key, value in values.items()
    }
    metrics["objective"] = line.get("objective")
    metrics["objective_stderr"] = line.get("objective_stderr")
    return metrics


def merge_tags(line: dict[str, Any]) -> dict[str, str]:
    """status (done, stopped); a stopped merge's `stopped` (racing, pruned) and round; a done
    merge's folder (`path`) and whether it keeps its files (`kept`)."""
    tags = {"status": str(line["status"])}
    if line.get("stopped"):
        tags.update(stopped=str(line["stopped"]), round=str(line.get("round", "")))
    if line.get("path"):
        tags.update(path=line["path"], kept=str(line.get("kept", True)).lower())
    return tags


def log_batch(client, run_id: str, *, metrics=None, params=None, tags=None, step=0) -> None:
    """One log_batch call per at most 1000 values (at most 100 params and 100 tags), MLflow's
    limits; numbers that are not finite (an unknown stderr) are left out."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    metrics = [
        Metric(mlflow_key(k), float(v), now, step)
        for k, v in (metrics or {}).items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ]
    params = [Param(mlflow_key(k), clipped(v)) for k, v in (params or {}).items()]
    tags = [RunTag(mlflow_key(k), clipped(v, MAX_TAG_CHARS)) for k, v in (tags or {}).items()]
    for chunk in _chunks(metrics, params, tags):
        client.log_batch(run_id, *chunk)


def _chunks(metrics: list, params: list, tags: list) -> Iterator[tuple[list, list, list]]:
    while metrics or params or tags:
        chunk = (metrics[:800], params[:100], tags[:100])
        metrics, params, tags = metrics[800:], params[100:], tags[100:]
        yield chunk


def mlflow_key(name: str) -> str:
    """A name MLflow accepts as a key (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-./ ]", "_", str(name))


def clipped(value: Any, limit: int = MAX_PARAM_CHARS) -> str:
    """`value` as text of at most `limit` characters."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
