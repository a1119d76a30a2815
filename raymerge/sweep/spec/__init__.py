"""The sweep spec: the one import path for its models and for reading it.

Each job has its own module, re-exported here so that callers need not know the split:

- models: SweepSpec and its grid groups (`combinations`)
- methods: a `methods` entry (MethodSpec), built from the merge registry
- evaluate: the `evaluate` section (eval sets, lm-eval tasks, objective)
- search: the `search` section (ranges, budget, sampler)
- tracking: the `tracking` section (MLflow), and where a sweep is tracked
- types: what the models share (frozen base, adapter names, grids, float32 limit)
- loader: strict YAML in (read_spec_file, parse_spec, load_spec)
- errors: pydantic's and PyYAML's errors as one-line SpecError messages

Example:
    >>> spec = parse_spec({
    ...     "base_model": "./base", "adapters": {"a": "./a", "b": "./b"}, "output": "./out",
    ...     "combinations": [{"adapters": ["a", "b"], "weights": [[0.5, 0.5]],
    ...                       "methods": [{"combination_type": "linear"}]}]})
    >>> spec.workers
    1
"""

from raymerge.sweep.spec.evaluate import EvalSetSpec, EvaluateSpec, LmEvalSpec, ObjectiveTerm
from raymerge.sweep.spec.loader import (
    MAX_SPEC_BYTES,
    MAX_SPEC_VALUES,
    load_spec,
    parse_spec,
    read_spec_file,
)
from raymerge.sweep.spec.methods import MethodSpec
from raymerge.sweep.spec.models import (
    CREDENTIAL_KEYS,
    ChooseGroup,
    ExplicitGroup,
    Group,
    KeepSpec,
    SweepSpec,
    WritesSpec,
)
from raymerge.sweep.spec.search import Range, SearchMethodSpec, SearchParam, SearchSpec
from raymerge.sweep.spec.tracking import MlflowSpec, TrackingSpec
from raymerge.sweep.spec.types import FLOAT32_MAX, SINGLE_ADAPTER_HINT, AdapterName, Grid

__all__ = [
    "CREDENTIAL_KEYS",
    "FLOAT32_MAX",
    "MAX_SPEC_BYTES",
    "MAX_SPEC_VALUES",
    "SINGLE_ADAPTER_HINT",
    "AdapterName",
    "ChooseGroup",
    "EvalSetSpec",
    "EvaluateSpec",
    "ExplicitGroup",
    "Grid",
    "Group",
    "KeepSpec",
    "LmEvalSpec",
    "MethodSpec",
    "MlflowSpec",
    "ObjectiveTerm",
    "Range",
    "SearchMethodSpec",
    "SearchParam",
    "SearchSpec",
    "SweepSpec",
    "TrackingSpec",
    "WritesSpec",
    "load_spec",
    "parse_spec",
    "read_spec_file",
]
