"""raymerge: merge LoRA adapters at scale on a Ray cluster.

Example:
    >>> from raymerge.plan import load_plan
    >>> plan = load_plan("jobs/demo.yaml")  # doctest: +SKIP
    >>> plan.counts()  # doctest: +SKIP
    {'linear': 4, 'cat': 2}
"""

__version__ = "0.1.0"
