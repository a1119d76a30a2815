"""The spec reference (reference/spec.md): every key of SweepSpec and of each section below it,
found by walking the pydantic models' fields and annotations (unions, lists and maps included),
with its type, limits, default and description.

A key's description is the docstring written under it (read from the source, as pydantic's
`use_attribute_docstrings` does), or the field's own description (the fields that the method
registry makes for `methods` entries).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel, StringConstraints
from reference_text import WORDS, as_yaml, attribute_docs, cell, paragraphs, table

from raymerge.sweep.spec.types import as_grid

NONE = type(None)


def anchor(model: type) -> str:
    return model.__name__.lower()


def is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def unwrap(tp: Any) -> Any:
    """`Annotated[T, ...]` as T (a union member's Tag, say); any other type as it is."""
    return get_args(tp)[0] if get_origin(tp) is Annotated else tp


def key(name: str, field) -> str:
    """A field's key in the spec (its alias, e.g. `from`, where it has one)."""
    return field.alias or name


def field_type(field) -> Any:
    """A field's whole annotation, its constraints (Field(ge=...)) put back as Annotated."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def limits(meta: list[Any]) -> list[str]:
    """Constraints (Field(ge=1), min_length, a pattern) in words."""
    words = []
    for m in meta:
        pairs = [(at.Ge, "ge", "≥"), (at.Gt, "gt", ">"), (at.Le, "le", "≤"), (at.Lt, "lt", "<")]
        words += [f"{sign} {getattr(m, attr)}" for kind, attr, sign in pairs if isinstance(m, kind)]
        if isinstance(m, at.MinLen):
            words.append("not empty" if m.min_length == 1 else f"length ≥ {m.min_length}")
        if isinstance(m, at.MaxLen):
            words.append(f"length ≤ {m.max_length}")
        if isinstance(m, StringConstraints) and m.pattern:
            words.append(f"matching `{m.pattern}`")
    return words


def variant_keys(models: list[type]) -> dict[type, str]:
    """For each model of a union, the first required key that no other member has: how a spec
    says which member it writes (`adapters` or `choose` for a grid group)."""
    required = {
        m: {key(n, f) for n, f in m.model_fields.items() if f.is_required()} for m in models
    }
    unique = {
        m: sorted(keys - set().union(*(required[o] for o in models if o is not m)))
        for m, keys in required.items()
    }
    return {m: keys[0] for m, keys in unique.items() if keys}


def union_members(tp: Any) -> list[Any]:
    """The members of a union (None left out), or [tp] for any other type."""
    if get_origin(tp) in (Union, types.UnionType):
        return [a for a in get_args(tp) if a is not NONE]
    return [tp]


def type_text(tp: Any, words: list[str] | None = None) -> str:
    """A type as the reference writes it: words, models linked to their section, and the limits
    `words` (a field's constraints) beside the type they constrain."""
    origin, args = get_origin(tp), get_args(tp)
    limited = f" ({', '.join(words)})" if words else ""
    if origin is Annotated:
        inner, *meta = args
        if any(getattr(m, "func", None) is as_grid for m in meta):  # a value or a list of them
            listed = next(a for a in union_members(inner) if get_origin(a) is list)
            return f"{type_text(get_args(listed)[0])}, or a list of them"
        return type_text(inner, [*(words or []), *limits(meta)])
    if origin in (Union, types.UnionType):
        members = union_members(tp)
        models = [unwrap(a) for a in members if is_model(unwrap(a))]
        marks = variant_keys(models) if len(models) > 1 else {}
        return " or ".join(
            type_text(a, words) + (f" (with `{marks[unwrap(a)]}`)" if unwrap(a) in marks else "")
            for a in members
        )
    if origin is Literal:
        return "one of " + ", ".join(f"`{v}`" for v in args)
    if origin is list:
        return f"list{limited} of {type_text(args[0])}"
    if origin is dict:
        return f"map{limited} of {type_text(args[0])} to {type_text(args[1])}"
    if is_model(tp):
        return f"[{tp.__name__}](#{anchor(tp)})"
    return WORDS.get(tp, getattr(tp, "__name__", str(tp))) + limited


def nested_models(tp: Any, path: str) -> Iterator[tuple[type, str]]:
    """Every model in an annotation, with the spec path where it is written."""
    origin, args = get_origin(tp), get_args(tp)
    if is_model(tp):
        yield tp, path
    elif origin is list:
        yield from nested_models(args[0], f"{path}[]")
    elif origin is dict:
        yield from nested_models(args[1], f"{path}.<name>")
    elif origin is Annotated:
        yield from nested_models(args[0], path)
    else:
        for arg in args:
            yield from nested_models(arg, path)


@dataclass
class Section:
    """A model's section: the paths where the spec writes it (the first names the section) and,
    for one member of a union of models, the key that tells it from the others."""

    paths: list[str] = field(default_factory=list)
    variant: str | None = None


def spec_sections(root: type[BaseModel]) -> dict[type, Section]:
    """Every model reachable from `root`, in spec order (depth first, a union's members
    together), with its section."""
    found = {root: Section([""])}

    def visit(model: type[BaseModel], path: str) -> None:
        for name, info in model.model_fields.items():
            here = f"{path}.{key(name, info)}".lstrip(".")
            nested = list(nested_models(field_type(info), here))
            first: dict[type, str] = {}
            for m, where in nested:
                first.setdefault(m, where)
            new = [(m, where) for m, where in first.items() if m not in found]
            for m, where in nested:
                section = found.setdefault(m, Section())
                section.paths += [] if where in section.paths else [where]
            for m, variant in variant_keys([m for m, _ in new]).items():
                found[m].variant = variant if len(new) > 1 else None
            for m, where in new:
                visit(m, where)

    visit(root, "")
    return found


def default_text(info) -> str:
    if info.is_required():
        return "**required**"
    value = info.get_default(call_default_factory=True, validated_data={})
    if value is None:
        return "not set"
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True, mode="json")
    return cell(f"`{as_yaml(value)}`")


def model_section(model: type[BaseModel], section: Section) -> str:
    """A model's keys as a table, under a heading that names where the spec writes it."""
    first, *others = section.paths
    heading = f"`{first}`" if first else "The top level"
    heading += f" with `{section.variant}`" if section.variant else ""
    lines = [f"## {heading} {{#{anchor(model)}}}", "", f"**{model.__name__}**"]
    own_doc = model.__dict__.get("__doc__")
    if own_doc:
        lines[-1] += ": " + paragraphs(own_doc)
    if others:
        lines += ["", "Also written at " + ", ".join(f"`{p}`" for p in others) + "."]
    if model.model_config.get("extra") == "allow":
        lines += ["", "Keys besides these are taken as well: see the description above."]
    docs = attribute_docs(model)
    rows = [
        [
            f"`{key(name, info)}`",
            cell(type_text(field_type(info))),
            default_text(info),
            cell(info.description or docs.get(name)),
        ]
        for name, info in model.model_fields.items()
    ]
    return "\n".join([*lines, "", table(["Key", "Type", "Default", "Description"], rows)])


def spec_page(root: type[BaseModel] | None = None) -> str:
    """The spec reference: a section per model reachable from `root` (default: SweepSpec)."""
    from raymerge.sweep.spec import SweepSpec

    sections = spec_sections(root or SweepSpec)
    intro = (
        "# Sweep spec reference\n\n"
        "Every key of the sweep spec, generated from its pydantic models (`raymerge.sweep.spec`) "
        "when this site is built. Keys not listed here are refused, as are values outside the "
        "limits given. A section's type links to the section that lists its keys; the methods' "
        "parameters are described with the [combination types](methods.md)."
    )
    return "\n\n".join([intro, *(model_section(m, s) for m, s in sections.items())]) + "\n"
