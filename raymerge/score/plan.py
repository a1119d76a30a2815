"""What a set's scoring passes run, planned once per set and batch size (pure Python, no model).

- Each distinct request runs once: rows (token ids, first scored token) that repeat, and prompts
  that repeat, are computed once and their results put back at every place they appear.
- Longest first, as the harness sorts its requests: a pass pads to its first row, and rows of
  like lengths pad little. A pass holds as many rows as fit `budget` tokens with their padding
  (the scorer's: `batch_size` rows of `max_length`), so short rows share fewer, larger passes.
- **choice**: the rows that share a context (every choice of a question; the same prompt in
  several questions) become one row: the context once, then each choice's tokens; the
  context's last position gives each choice's first token.
- A plan depends only on the set's rows and the budget, never on how many merges share a
  pass: each row is padded alike whether it is scored for 1 merge or 16, which keeps K merges
  per pass equal to one at a time.

Example:
    >>> rows = [([1, 5, 6], 2), ([1, 5, 7, 8], 2), ([1, 5, 6], 2), ([1, 9, 6], 2)]
    >>> plan = choice_plan(rows, budget=64)  # 3 distinct rows, 2 contexts
    >>> plan.where, plan.contexts, plan.continuations
    ([0, 1, 0, 2], [(1, 5), (1, 9)], [(6,), (7, 8), (6,)])
    >>> [(batch.groups, batch.members) for batch in plan.batches]
    [([0, 1], [(0, 0), (1, 0), (2, 1)])]
"""

from __future__ import annotations

from dataclasses import dataclass

Row = tuple[list[int], int]
"""A scored row: token ids, and the index of the first scored token (every later one is)."""


@dataclass(frozen=True)
class RowPlan:
    """`batches` of distinct rows (indices into `rows`), longest first; `where` each of the
    set's rows is among the distinct ones."""

    rows: list[Row]
    batches: list[list[int]]
    where: list[int]


def row_plan(rows: list[Row], budget: int) -> RowPlan:
    """Rows run whole but for their last token (whose logits nothing reads)."""
    distinct: dict[tuple, int] = {}
    where = [distinct.setdefault((tuple(ids), first), len(distinct)) for ids, first in rows]
    keys = list(distinct)
    order = sorted(range(len(keys)), key=lambda u: (-len(keys[u][0]), keys[u]))
    unique = [(list(ids), first) for ids, first in keys]
    return RowPlan(unique, passes(order, [len(ids) - 1 for ids, _ in unique], budget), where)


@dataclass(frozen=True)
class PromptBatch:
    """One pass: `groups` (indices into the plan's `contexts`), one row each; `members`: the
    distinct rows scored in it (those with a non-empty continuation), each with its group's
    position in `groups`."""

    groups: list[int]
    members: list[tuple[int, int]]


def split(batch: PromptBatch, size: int) -> list[PromptBatch]:
    """`batch` as passes of `size` rows (contexts) at most, members with them.

    >>> [(b.groups, b.members) for b in split(PromptBatch([4, 7, 9], [(0, 0), (2, 2)]), 2)]
    [([4, 7], [(0, 0)]), ([9], [(2, 0)])]
    """
    out = []
    for start in range(0, len(batch.groups), size):
        members = [(u, row - start) for u, row in batch.members if start <= row < start + size]
        out.append(PromptBatch(batch.groups[start : start + size], members))
    return out


@dataclass(frozen=True)
class ChoicePlan:
    """The distinct rows of a choice set as (context, continuation) pairs; `where` each of the
    set's rows is among them; the prompt batches that score them."""

    contexts: list[tuple[int, ...]]
    continuations: list[tuple[int, ...]]
    context_of: list[int]
    where: list[int]
    batches: list[PromptBatch]

    def width(self, group: int) -> int:
        """The tokens of a context's row: the context, then each choice's but its last."""
        extra = sum(max(len(self.continuations[u]) - 1, 0)
                    for u, g in enumerate(self.context_of) if g == group)  # fmt: skip
        return len(self.contexts[group]) + extra

    def tokens(self) -> int:
        """The tokens the plan runs through the model per merge: each context once, each
        continuation but its last token (whose logits nothing reads)."""
        return sum(map(len, self.contexts)) + sum(max(len(c) - 1, 0) for c in self.continuations)


def choice_plan(rows: list[Row], budget: int) -> ChoicePlan:
    """Rows split at their first scored token: the context before it is exact whatever the row
    (a left-truncated row's context depends on its continuation's length, and only rows with
    the very same context share a prompt's cache)."""
    distinct: dict[tuple, int] = {}
    where = [distinct.setdefault((tuple(ids), first), len(distinct)) for ids, first in rows]
    contexts: dict[tuple[int, ...], int] = {}
    continuations, context_of = [], []
    for ids, first in distinct:
        context_of.append(contexts.setdefault(ids[:first], len(contexts)))
        continuations.append(ids[first:])
    context_list = list(contexts)
    # Longest first by the row's whole width: the context and its choices' tokens.
    width = [len(c) for c in context_list]
    for u, g in enumerate(context_of):
        width[g] += max(len(continuations[u]) - 1, 0)
    order = sorted(range(len(context_list)), key=lambda g: (-width[g], context_list[g]))
    rows_of: list[list[int]] = [[] for _ in context_list]
    for u, g in enumerate(context_of):
        if continuations[u]:  # an empty continuation scores 0 and runs nothing
            rows_of[g].append(u)
    batches = []
    for groups in passes(order, width, budget):
        members = [(u, position) for position, g in enumerate(groups) for u in rows_of[g]]
        batches.append(PromptBatch(groups, members))
    return ChoicePlan(context_list, continuations, context_of, where, batches)


@dataclass(frozen=True)
class GeneratePlan:
    """Distinct prompts (as generated from: truncated), longest first, in batches; `where` each
    example's prompt is among them."""

    prompts: list[tuple[int, ...]]
    batches: list[list[int]]
    where: list[int]


def generate_plan(prompts: list[list[int]], new_tokens: int, budget: int) -> GeneratePlan:
    distinct: dict[tuple[int, ...], int] = {}
    where = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    keys = list(distinct)
    order = sorted(range(len(keys)), key=lambda u: (-len(keys[u]), keys[u]))
    width = [len(p) + new_tokens for p in keys]
    return GeneratePlan(keys, passes(order, width, budget), where)


def passes(order: list[int], width: list[int], budget: int) -> list[list[int]]:
    """`order` (longest first) cut into passes of at most `budget` tokens each, padding
    included (every row of a pass is as wide as its first); a row wider than the budget runs
    alone.

    >>> passes([0, 1, 2, 3], [10, 6, 5, 5], budget=20)
    [[0, 1], [2, 3]]
    """
    out: list[list[int]] = []
    for u in order:
        if out and (len(out[-1]) + 1) * width[out[-1][0]] <= budget:
            out[-1].append(u)
        else:
            out.append([u])
    return out
