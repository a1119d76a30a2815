"""raymerge: merge LoRA adapters at scale on a Ray cluster.

Example:
    >>> from raymerge.sweep.expand import candidates
    >>> from raymerge.sweep.spec import parse_spec
    >>> spec = parse_spec({"base_model": "base", "adapters": {"math": "m", "code": "c"},
    ...     "output": "out", "combinations": [{"adapters": ["math", "code"],
    ...     "weights": [[0.5, 0.5], [0.7, 0.3]], "methods": [{"combination_type": "cat"}]}]})
    >>> len(list(candidates(spec)))
    2
"""

__version__ = "0.1.0"
