"""The combination types' reference (reference/methods.md): every type of the method registry,
its parameters and defaults, rank rule, form and randomness; the parameters; the rank rules and
forms; the renamed types."""

from __future__ import annotations

from collections.abc import Mapping

from reference_text import WORDS, as_yaml, attribute_docs, cell, paragraphs, table


def param_text(name: str, default: object, required: object) -> str:
    """A method's parameter and its default (`required`: the registry's mark for none)."""
    if default is required:
        return f"`{name}` **required**"
    return f"`{name}`" + (f" = `{as_yaml(default)}`" if default is not None else "")


def method_rows(methods: list, required: object) -> list[list[str]]:
    """One row per combination type: name, what it does, parameters, rank, form, randomness."""
    rows = []
    for m in methods:
        params = [param_text(p, d, required) for p, d in m.params.items()]
        rows.append(
            [
                f"`{m.name}`",
                cell(m.doc),
                "<br>".join(params) or "—",
                f"[{m.rank.value}](#rank-rules)",
                f"[{m.form.value}](#forms)",
                "yes" if m.random else "no",
            ]
        )
    return rows


def enum_table(enum: type, title: str, slug: str) -> str:
    docs = attribute_docs(enum)
    rows = [[f"`{member.value}`", cell(docs.get(member.name))] for member in enum]
    return f"## {title} {{#{slug}}}\n\n{paragraphs(enum.__doc__)}\n\n" + table(
        ["Value", "Meaning"], rows
    )


def methods_page(methods: Mapping | None = None, params: Mapping | None = None) -> str:
    """The combination types (default: the registry's) and their parameters."""
    from raymerge.merge import registry

    methods = registry.METHODS if methods is None else methods
    params = registry.PARAMS if params is None else params
    header = ["Type", "What it does", "Parameters (default)", "Rank", "Form", "Random"]
    parts = [
        "# Combination types\n\nEvery `combination_type` a `methods` entry may name, generated "
        "from the method registry (`raymerge.merge.registry`) when this site is built. A "
        "parameter given as a list in a grid is swept over; in a search it may be a range.",
        "## PEFT's types {#peft-types}\n\nPEFT's `add_weighted_adapter` implements these, so "
        "`engine: peft` can run them as well as the fast engine.\n\n"
        + table(header, method_rows([m for m in methods.values() if m.peft], registry.REQUIRED)),
        "## raymerge's own types {#own-types}\n\nMerged in the adapters' own low-rank space "
        "(PEFT lacks them; `engine: peft` runs them with the fast engine).\n\n"
        + table(
            header, method_rows([m for m in methods.values() if not m.peft], registry.REQUIRED)
        ),
        "## Parameters {#parameters}\n\n"
        + table(
            ["Parameter", "Type", "Meaning", "Taken by"],
            [
                [
                    f"`{p.name}`",
                    WORDS.get(p.kind, p.kind.__name__),
                    cell(p.doc),
                    ", ".join(f"`{m.name}`" for m in methods.values() if m.takes(p.name)) or "—",
                ]
                for p in params.values()
            ],
        ),
        enum_table(registry.RankRule, "Rank rules", "rank-rules"),
        enum_table(registry.Form, "Forms", "forms"),
        "## Renamed types {#renamed}\n\nNames that no longer exist (a name never gets a second "
        "meaning):\n\n"
        + table(
            ["Old name", "Write instead"],
            [[f"`{k}`", cell(v)] for k, v in registry.RENAMED.items()],
        ),
    ]
    return "\n\n".join(parts) + "\n"
