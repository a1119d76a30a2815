"""Checks across a spec's keys that read no input: names exist, sizes fit, objectives name sets.

These are what `raymerge submit` can run before anything leaves this machine; each returns the
problems it found (empty when there are none), so that all are reported together.

Example:
    >>> from raymerge.sweep.spec import parse_spec
    >>> spec = parse_spec({"base_model": "b", "adapters": {"x": "x", "y": "y"}, "output": "o",
    ...     "combinations": [{"adapters": ["x", "w"], "weights": [[1, 1]],
    ...                       "methods": [{"combination_type": "cat"}]}]})
    >>> offline_problems(spec)
    ["combinations[0].adapters: unknown adapter 'w'; the spec's adapters are: x, y"]
"""

from __future__ import annotations

from raymerge.score import evalsets
from raymerge.score.objective import MEAN_LOSS
from raymerge.sweep.expand import group_names, search_pool
from raymerge.sweep.spec import ChooseGroup, SweepSpec


def offline_problems(spec: SweepSpec) -> list[str]:
    """Every cross-key problem of a spec: its combination groups', then its search's."""
    return group_problems(spec) + search_problems(spec) + device_problems(spec)


def device_problems(spec: SweepSpec) -> list[str]:
    """Parameters that only a GPU worker can use, asked of workers without one: refused here, not
    failed merge by merge."""
    if spec.gpus_per_worker > 0:
        return []
    entries = [
        (f"combinations[{i}].methods[{j}]", method)
        for i, group in enumerate(spec.combinations)
        for j, method in enumerate(group.methods)
    ]
    if spec.search is not None:
        entries += [(f"search.methods[{j}]", m) for j, m in enumerate(spec.search.methods)]
    drivers = [(key, getattr(method, "svd_driver", None)) for key, method in entries]
    return [
        f"{key}.svd_driver: {', '.join(value) if isinstance(value, list) else value} names a "
        "cuSOLVER driver, which torch uses only on CUDA, and these workers have no GPU "
        "(gpus_per_worker: 0); remove svd_driver, or give the workers GPUs"
        for key, value in drivers
        if value is not None
    ]


def group_problems(spec: SweepSpec) -> list[str]:
    """Checks across keys: names exist, no duplicates, weights fit, choose fits."""
    problems = []
    known = ", ".join(spec.adapters)
    for i, group in enumerate(spec.combinations):
        key = f"combinations[{i}].{'from' if isinstance(group, ChooseGroup) else 'adapters'}"
        names = group_names(group, spec)
        for name in dict.fromkeys(names):
            if name not in spec.adapters:
                problems.append(
                    f"{key}: unknown adapter {name!r}; the spec's adapters are: {known}"
                )
            if names.count(name) > 1:
                problems.append(f"{key}: adapter {name!r} is listed twice; list each adapter once")
        size = group.choose if isinstance(group, ChooseGroup) else len(names)
        if isinstance(group, ChooseGroup) and group.choose > len(names):
            problems.append(
                f"combinations[{i}].choose: {group.choose} is more than the {len(names)} "
                f"adapters to choose from"
            )
        for j, weights in enumerate(group.weights):
            if len(weights) != size:
                problems.append(
                    f"combinations[{i}].weights[{j}]: {weights} has {len(weights)} weight(s) "
                    f"but each merge of this group has {size} adapters; give one weight per adapter"
                )
    return problems


def search_problems(spec: SweepSpec) -> list[str]:
    """A search's adapters exist and fit `choose`; its weights and objectives name what is
    there."""
    if spec.search is None:
        return []
    search, problems = spec.search, []
    known = ", ".join(spec.adapters)
    pool = search_pool(spec)
    key = "search.adapters" if search.adapters is not None else "search.from"
    for name in dict.fromkeys(pool):
        if name not in spec.adapters:
            problems.append(f"{key}: unknown adapter {name!r}; the spec's adapters are: {known}")
        if pool.count(name) > 1:
            problems.append(f"{key}: adapter {name!r} is listed twice; list each adapter once")
    if search.choose is not None and search.choose > len(pool):
        problems.append(
            f"search.choose: {search.choose} is more than the {len(pool)} adapters to choose from"
        )
    if isinstance(search.weights, dict):
        missing = [n for n in pool if n not in search.weights]
        if missing:
            problems.append(
                f"search.weights: no range for {', '.join(missing)}; give one per adapter, or one "
                "range for all ({low: 0, high: 1})"
            )
    if search.objectives and spec.evaluate is not None:
        terms = [t if isinstance(t, str) else t.model_dump() for t in search.objectives]
        problems += [
            p.replace("evaluate.objective", "search.objectives")
            for p in objective_problems(spec.evaluate.model_copy(update={"objective": terms}))
        ]
    return problems


def objective_problems(evaluate) -> list[str]:
    """Each objective metric names an eval set (or lm-eval task) and a metric it reports."""
    sets = evaluate.sets()
    tasks = set(evaluate.lm_eval.tasks) if evaluate.lm_eval else set()
    problems = []
    for term in evaluate.objective_terms():
        metric = term["metric"]
        if metric == MEAN_LOSS:
            if not any(s.kind == "text" for s in sets.values()):
                problems.append("evaluate.objective: mean_loss needs at least one text set")
            continue
        name, _, key = metric.rpartition(".")
        if name in sets:
            known = evalsets.METRICS[sets[name].kind]
            if key not in known:
                problems.append(
                    f"evaluate.objective: {metric!r}: a {sets[name].kind} set reports "
                    f"{', '.join(known)}"
                )
        elif name not in tasks:
            listed = ", ".join([*sets, *tasks]) or "none"
            problems.append(
                f"evaluate.objective: {metric!r} names no eval set or lm_eval task (they are: "
                f"{listed}); write SET.METRIC, e.g. {next(iter(sets), 'qa')}.loss, or mean_loss"
            )
    return problems
