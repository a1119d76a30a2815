"""raymerge's eval sets as lm-evaluation-harness tasks: local task YAMLs over the same JSONL
files (one per kind), for the bench against the harness and the tests that compare with it.

Example:
    >>> text = task_yaml("h_gen", "generate", "gen.jsonl", "cache", max_new_tokens=8)
    >>> print(text)  # doctest: +ELLIPSIS
    task: h_gen
    ...
      max_gen_toks: 8
    ...
"""

from __future__ import annotations

from pathlib import Path

HEADER = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
"""
"""Every task here: a local JSONL file as its one test split."""
CHOICE_TASK = (
    HEADER
    + """output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
{extra}metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""
)
TEXT_TASK = (
    HEADER
    + """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - {{metric: bits_per_byte}}
  - {{metric: word_perplexity}}
  - {{metric: byte_perplexity}}
metadata: {{version: 1.0}}
"""
)
GENERATE_TASK = (
    HEADER
    + """output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]
metadata: {{version: 1.0}}
"""
)
"""raymerge's generate kind as a harness task: greedy until the newline, exact match after
surrounding white space is stripped (raymerge's normalisation, for one-line answers)."""

TEMPLATES = {"choice": CHOICE_TASK, "text": TEXT_TASK, "generate": GENERATE_TASK}


def task_yaml(
    name: str,
    kind: str,
    data: str | Path,
    cache: str | Path,
    extra: str = "",
    max_new_tokens: int = 8,
) -> str:
    """The task `name` over the JSONL file `data` of a raymerge set of `kind` (`extra`: more
    YAML lines for a choice task, such as a target delimiter)."""
    return TEMPLATES[kind].format(
        name=name, data=data, cache=cache, extra=extra, max_gen_toks=max_new_tokens
    )
