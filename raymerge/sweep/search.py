"""Adaptive search: asks Optuna (ask-and-tell) for candidate merges, tells it their scores.

The driver asks for a candidate whenever a worker frees up, so candidates run asynchronously on
the same worker pool as grid merges; each is an ordinary merge task (merge_id, merge.json,
metrics, manifest line) with its trial number and the parameters the sampler chose. A rerun
tells the sampler every committed trial again and continues up to the budget.

Asynchrony: up to `candidates_per_worker` x workers candidates are out at once, each chosen
without the results still running (TPE's constant liar spreads them). With one worker, one out
and a fixed seed the sequence is reproducible; with several it depends on which finishes first.

Example:
    >>> from raymerge.sweep.spec import SearchSpec
    >>> spec = SearchSpec.model_validate({"adapters": ["a", "b"], "budget": 3,
    ...     "methods": [{"combination_type": ["ties", "cat"], "density": {"low": 0.2, "high": 0.8}}]})
    >>> space = Space(spec, ["a", "b"])
    >>> sorted(space.distributions({"method": "ties", "ties.density": 0.5, "weight.0": 0.1,
    ...                              "weight.1": 0.2}))
    ['method', 'ties.density', 'weight.0', 'weight.1']
"""  # noqa: E501

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import warnings
from collections import deque
from dataclasses import replace
from typing import Any

from raymerge.merge.registry import METHODS
from raymerge.score.objective import Objective
from raymerge.store import manifest
from raymerge.sweep.expand import Candidate
from raymerge.sweep.spec import Range, SearchSpec
from raymerge.task import MergeTask

log = logging.getLogger(__name__)


def _optuna():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class Space:
    """The search space of a spec: which adapters, weights, types and parameters, as Optuna
    parameters (named so that each has one distribution throughout)."""

    def __init__(self, spec: SearchSpec, all_adapters: list[str]):
        self.spec = spec
        if spec.adapters is not None:
            self.sets = [tuple(spec.adapters)]
        else:
            pool = list(spec.from_ if spec.from_ is not None else all_adapters)
            self.sets = list(itertools.combinations(pool, spec.choose))
        self.methods: dict[str, tuple[str, dict[str, Any]]] = {}
        for i, entry in enumerate(spec.methods):
            for combination_type in entry.combination_type:
                label = combination_type
                if label in self.methods:  # the same type in two entries: tell them apart
                    label = f"{combination_type}#{i}"
                self.methods[label] = (combination_type, entry.params())

    def _weight_params(self, names: tuple[str, ...]) -> list[tuple[str, Range]]:
        weights = self.spec.weights
        if isinstance(weights, dict):
            return [(f"weight.{name}", weights[name]) for name in names]
        return [(f"weight.{i}", weights) for i in range(len(names))]

    def suggest(self, trial) -> Candidate:
        """The candidate a trial stands for (Optuna's define-by-run: only what applies)."""
        labels = ["+".join(names) for names in self.sets]
        names = self.sets[0]
        if len(labels) > 1:
            names = self.sets[labels.index(trial.suggest_categorical("adapters", labels))]
        weights = tuple(
            trial.suggest_float(key, r.low, r.high, log=r.log)
            for key, r in self._weight_params(names)
        )
        method_labels = list(self.methods)
        label = method_labels[0]
        if len(method_labels) > 1:
            label = trial.suggest_categorical("method", method_labels)
        combination_type, given = self.methods[label]
        method = METHODS[combination_type]
        params = method.defaults()
        for param, value in given.items():
            if not method.takes(param):
                continue
            key = f"{label}.{param}"
            if isinstance(value, Range) and param in INT_PARAMS:
                params[param] = trial.suggest_int(
                    key, int(value.low), int(value.high), log=value.log
                )
            elif isinstance(value, Range):
                params[param] = trial.suggest_float(key, value.low, value.high, log=value.log)
            elif isinstance(value, list):
                params[param] = trial.suggest_categorical(key, value)
            else:
                params[param] = value
        return Candidate(names, weights, combination_type, params)

    def distributions(self, params: dict[str, Any]) -> dict[str, Any]:
        """The distribution of each recorded parameter (to tell a rebuilt study its trials)."""
        optuna = _optuna()
        out: dict[str, Any] = {}
        labels = ["+".join(names) for names in self.sets]
        names = self.sets[0]
        if "adapters" in params:
            out["adapters"] = optuna.distributions.CategoricalDistribution(labels)
            names = self.sets[labels.index(params["adapters"])]
        for key, r in self._weight_params(names):
            out[key] = optuna.distributions.FloatDistribution(r.low, r.high, log=r.log)
        label = params.get("method", next(iter(self.methods)))
        if "method" in params:
            out["method"] = optuna.distributions.CategoricalDistribution(list(self.methods))
        for param, value in self.methods[label][1].items():
            key = f"{label}.{param}"
            if key not in params:
                continue
            if isinstance(value, Range) and param in INT_PARAMS:
                out[key] = optuna.distributions.IntDistribution(
                    int(value.low), int(value.high), log=value.log
                )
            elif isinstance(value, Range):
                out[key] = optuna.distributions.FloatDistribution(
                    value.low, value.high, log=value.log
                )
            else:
                out[key] = optuna.distributions.CategoricalDistribution(value)
        return {k: v for k, v in out.items() if k in params}


INT_PARAMS = {"svd_rank"}
MAX_TRIALS_PER_EVALUATION = 10
"""A search budgeted in evaluations asks at most this many candidates per evaluation."""
"""Parameters searched as integers."""


def objectives_of(spec) -> list[Objective]:
    """The search's objectives: its own list (a Pareto search), else the sweep's objective."""
    search = spec.search
    if search.objectives and len(search.objectives) > 1:
        return [
            Objective.parse([t if isinstance(t, str) else t.model_dump(exclude_none=True)])
            for t in search.objectives
        ]
    if search.objectives:
        term = search.objectives[0]
        return [Objective.parse(term if isinstance(term, str) else term.model_dump())]
    evaluate = spec.evaluate
    return [Objective.parse(evaluate.objective_terms(), evaluate.objective_normalize())]


def startup_trials(budget: int, given: int | None = None) -> int:
    """Random trials TPE starts with: the spec's, else a quarter of the budget, from 3 to 10
    (Optuna's default of 10 leaves a budget of 13 three guided trials).

    >>> startup_trials(13), startup_trials(200), startup_trials(8, given=0)
    (3, 10, 0)
    """
    if given is not None:
        return given
    return min(10, max(3, budget // 4))


def make_sampler(
    name: str, seed: int, budget: int = 100, startup: int | None = None, liar: bool = True
):
    """The sampler of a search of `budget` trials. TPE's constant liar (`liar`) counts a
    candidate still being scored as a poor result, so that candidates out at once spread out."""
    optuna = _optuna()
    if name == "tpe":
        return optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=startup_trials(budget, startup), constant_liar=liar
        )
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    return optuna.samplers.RandomSampler(seed=seed)


def _pruner(spec: SearchSpec, racing):
    """Optuna's pruner for the search's candidates, scored in the race's rounds."""
    optuna = _optuna()
    if spec.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=racing.first, reduction_factor=max(2, round(racing.growth))
        )
    with warnings.catch_warnings():  # experimental in Optuna 4: the interface may change
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.pruners.WilcoxonPruner()  # Optuna's p_threshold (0.1)


def _resumed_seed(seed: int, told: int) -> int:
    """The sampler's seed after `told` earlier trials: the spec's seed for a fresh search.

    >>> _resumed_seed(7, 0)
    7
    >>> _resumed_seed(7, 3) != _resumed_seed(7, 4)
    True
    """
    if told == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{told}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


class Search:
    """The driver's side of a search: candidates out, scores in, up to the budget."""

    def __init__(self, plan, committed_lines: list[dict[str, Any]]):
        optuna = _optuna()
        self.plan = plan
        self.spec = plan.spec.search
        self.space = Space(self.spec, list(plan.spec.adapters))
        self.objectives = objectives_of(plan.spec)
        # A resumed study reseeds its sampler: with the first run's seed it would propose that
        # run's first candidates again, and each repeat would spend budget on a known score.
        seed = _resumed_seed(self.spec.seed, len(committed_lines))
        self.pruning = plan.spec.evaluate.racing is not None and self.spec.pruner != "none"
        self.pruning = self.pruning and len(self.objectives) == 1  # Optuna prunes one objective
        spec = self.spec
        sampler = make_sampler(
            spec.sampler_name(), seed, spec.budget, spec.startup_trials, spec.constant_liar
        )
        self.study = optuna.create_study(
            directions=[o.direction for o in self.objectives],
            sampler=sampler,
            pruner=_pruner(self.spec, plan.spec.evaluate.racing) if self.pruning else None,
        )
        self._reported: dict[int, set[int]] = {}  # trial number -> steps reported
        self._trials: dict[str, Any] = {}  # merge_id -> the pending trial(s) it answers
        self._values: dict[str, list[float] | None] = {}  # merge_id -> its values (done ones)
        self._retries: deque[MergeTask] = deque()
        self.asked = 0
        self.spent = 0.0  # full evaluations' worth of examples scored by finished candidates
        self._full = sum(entry.get("examples", 0) for entry in plan.eval_sets.values())
        self._resume(committed_lines)

    def _resume(self, lines: list[dict[str, Any]]) -> None:
        """Tell the sampler every trial an earlier run committed (in trial order)."""
        optuna = _optuna()
        for line in sorted(lines, key=lambda line: line["trial"]):
            params = line.get("search_params") or {}
            try:
                distributions = self.space.distributions(params)
            except (KeyError, ValueError):  # the space changed since: not this study's trial
                continue
            values = self.values(line.get("metrics") or {})
            done = line["status"] == "done" and values is not None
            state = optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL
            if line["status"] == "stopped":
                state = optuna.trial.TrialState.PRUNED
            self.study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=distributions,
                    values=values if done else None,
                    state=state,
                )
            )
            self.asked += 1
            self.spent += self._cost(line)
            if done:
                self._values[line["merge_id"]] = values

    def _cost(self, line: dict[str, Any]) -> float:
        """What a committed candidate cost, in full evaluations (a pruned one: its share)."""
        seen = line.get("examples_seen")
        if line["status"] != "stopped" or not seen or not self._full:
            return 1.0
        return sum(seen.values()) / self._full

    def values(self, metrics: dict[str, Any]) -> list[float] | None:
        self._apply_references()
        values = [o.value(metrics) for o in self.objectives]
        return None if any(math.isnan(v) for v in values) else values

    def _apply_references(self) -> None:
        if any(o.normalize == "references" for o in self.objectives):
            # The references are scored before any merge: their scales, read once.
            spec = self.plan.spec
            references = manifest.read_references(self.plan.output, spec.storage_options)
            self.objectives = [o.against(references) for o in self.objectives]

    def report(self, task: MergeTask, scores: tuple[dict, dict], positions) -> bool:
        """Tell the pruner a candidate's scores on the examples seen so far (metrics,
        per-example scores, and each set's example indices in that order); whether to prune it.
        Wilcoxon gets one value per example (step: the example), halving the objective on the
        examples seen (step: how many per set)."""
        from raymerge.score.racing import instance_values

        self._apply_references()
        objective = self.objectives[0]
        if self.spec.pruner == "wilcoxon":
            steps = instance_values(objective, scores[0], scores[1], positions)
        else:
            steps = [(max(len(p) for p in positions.values()), objective.value(scores[0]))]
        prune = False
        for trial in self._trials.get(task.merge_id, []):
            reported = self._reported.setdefault(trial.number, set())
            for step, value in steps:
                if step not in reported and math.isfinite(value):
                    trial.report(value, step)
                    reported.add(step)
            prune = prune or trial.should_prune()
        return prune

    def prune(self, task: MergeTask, share: float = 1.0) -> None:
        """The pruner stopped this candidate, scored on `share` of the examples."""
        optuna = _optuna()
        for trial in self._trials.pop(task.merge_id, []):
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        self.spent += share

    def _may_ask(self) -> bool:
        """Whether the budget allows another candidate: in evaluations, each one out counts as a
        full evaluation until it is pruned or done."""
        if self.spec.budget_unit == "trials":
            return self.asked < self.spec.budget
        out = len(self._trials)
        cap = MAX_TRIALS_PER_EVALUATION * self.spec.budget
        return self.spent + out + 1 <= self.spec.budget + 1e-9 and self.asked < cap

    @property
    def finished(self) -> bool:
        return not self._may_ask() and not self._retries

    @property
    def left(self) -> int:
        """Candidates the budget still allows, as far as can be told now."""
        if self.spec.budget_unit == "trials":
            return max(0, self.spec.budget - self.asked)
        return max(0, math.ceil(self.spec.budget - self.spent - len(self._trials) - 1e-9))

    def ask(self) -> MergeTask | None:
        """The next candidate, or None while the budget allows none."""
        if self._retries:
            return self._retries.popleft()
        while self._may_ask():
            trial = self.study.ask()
            self.asked += 1
            candidate = self.space.suggest(trial)
            task = self.plan.task(candidate, trial=trial.number)
            task = replace(task, search_params=dict(trial.params))
            known = self._values.get(task.merge_id)
            if known is not None:  # the same merge again: its score is known, tell it at once
                self.study.tell(trial, known)
                continue
            self._trials.setdefault(task.merge_id, []).append(trial)
            if len(self._trials[task.merge_id]) == 1:
                return task
            # Already out (asked twice before its result came): it answers both.
        return None

    def retry(self, task: MergeTask) -> None:
        self._retries.append(task)

    def out(self, merge_id: str) -> bool:
        """Whether this candidate is still waiting for its result."""
        return merge_id in self._trials

    def tell(self, task: MergeTask, metrics: dict[str, Any] | None) -> None:
        """A candidate's result: its metrics (None: it failed)."""
        optuna = _optuna()
        values = self.values(metrics) if metrics is not None else None
        self.spent += 1.0
        for trial in self._trials.pop(task.merge_id, []):
            if values is None:
                self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                self.study.tell(trial, values)
        if values is not None:
            self._values[task.merge_id] = values

    def drain(self) -> list[MergeTask]:
        out = list(self._retries)
        self._retries.clear()
        return out


def importances(trials: list[tuple[dict[str, Any], float]]) -> dict[str, float]:
    """Which parameters mattered: Optuna's fANOVA importance over (params, objective value)
    pairs; parameters present in every trial only."""
    optuna = _optuna()
    names = set.intersection(*(set(params) for params, _ in trials))
    if not names:
        return {}
    study = optuna.create_study(direction="maximize")
    for params, value in trials:
        if math.isnan(value):
            continue
        shown = {k: params[k] for k in names}
        distributions = {}
        for key, val in shown.items():
            if isinstance(val, str | bool):
                choices = sorted({p[key] for p, _ in trials}, key=str)
                distributions[key] = optuna.distributions.CategoricalDistribution(choices)
            else:
                values = [p[key] for p, _ in trials]
                distributions[key] = optuna.distributions.FloatDistribution(
                    min(values), max(values) if max(values) > min(values) else min(values) + 1
                )
        study.add_trial(
            optuna.trial.create_trial(params=shown, distributions=distributions, value=value)
        )
    try:
        result = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError):
        return {}
    return {k: round(float(v), 3) for k, v in result.items()}
