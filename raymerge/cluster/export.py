"""`raymerge export`: one recorded merge as a full model, the base model with the merged adapter
folded in (PEFT's `merge_and_unload`), written as sharded safetensors with the base model's
tokenizer, for `from_pretrained` (serving stacks without LoRA, GGUF conversion, fine-tuning).

The merged adapter's files come from the sweep's output, checked against the digests in its
merge.json; a merge whose files keep top-k dropped is rebuilt first, as `raymerge materialize`
does, and refused if the rebuilt files differ from the record. The fold runs in float32 on the
host (the whole model is held there once, plus the adapter); the weights are then saved in the
base model's own dtype or the one asked for. Everything is written into a temporary folder beside
DIR and moved into place at the end, so a failed export leaves nothing half-written.

Usage::

    raymerge export s3://bucket/sweeps/run-1 5d1c0a9be2f4417e --to ./best-model --dtype bfloat16
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymerge.cluster import materialize
from raymerge.cluster.worker import library_versions
from raymerge.errors import InputError, MergeError, SpecError
from raymerge.score.failures import first_line
from raymerge.store import manifest, publish, storage
from raymerge.sweep.preflight import TOKENIZER_FILES

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""What `--dtype` accepts; auto: the base model's own (its config's dtype)."""
FOLD_DTYPE = "float32"
"""The dtype the adapter is folded in, whatever the base model's (rounding once, at the end)."""
DEFAULT_SHARD_SIZE = "5GB"
"""The largest safetensors shard unless told (huggingface_hub's default)."""
PROVENANCE = "raymerge-export.json"
"""What the exported folder is: the merge, its recipe, its base model and how it was saved."""
ADAPTER_NAME = "merged"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class Exported:
    """What `export` wrote."""

    merge_id: str
    path: str
    """The folder holding the full model."""
    model_class: str
    """The transformers class that loads it (AutoModelForCausalLM for a causal LM's adapters)."""
    dtype: str
    """The dtype its weights were saved in."""
    shards: int
    """Safetensors files written (more than one: with model.safetensors.index.json)."""
    rebuilt: bool
    """Whether the merged adapter was rebuilt from its record (keep top-k had dropped it)."""
    tokenizer: bool
    """Whether the base model's tokenizer was saved with it."""
    notes: tuple[str, ...] = ()


def shard_size(value: str | int) -> int:
    """Bytes of a `--max-shard-size`: a number of bytes, or one with a unit (KB, MB, GB, TB as
    powers of 10, KiB, MiB, GiB, TiB as powers of 2).

    >>> shard_size("5GB"), shard_size("1.5MiB"), shard_size(4096)
    (5000000000, 1572864, 4096)
    """
    match = _SIZE.match(str(value))
    size = int(float(match[1]) * _UNITS[(match[2] or "").lower()]) if match else 0
    if size <= 0:
        raise SpecError(
            f"--max-shard-size {value!r}: not a size; give a positive number with a unit, "
            "e.g. 5GB, 500MB or 2GiB"
        )
    return size


def check_dtype(dtype: str) -> str:
    """The `--dtype` asked for, if it is one of DTYPES."""
    if dtype not in DTYPES:
        raise SpecError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def export(
    output: str,
    merge_id: str,
    to: str,
    *,
    dtype: str = "auto",
    max_shard_size: str | int = DEFAULT_SHARD_SIZE,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
) -> Exported:
    """Write merge `merge_id` of the sweep at `output` (local or s3://) as a full model to the
    local folder `to`: base model + merged adapter folded in, in `dtype`, sharded at
    `max_shard_size`, with the base model's tokenizer and raymerge-export.json. A non-empty `to`
    is replaced only with `overwrite`."""
    check_dtype(dtype)
    shard_bytes = shard_size(max_shard_size)
    record = materialize.read_record(output, merge_id, storage_options)
    target = check_target(to, overwrite, keep=[output, record["base_model"]])
    with tempfile.TemporaryDirectory(prefix="raymerge-export-adapter-") as scratch:
        adapter, rebuilt = adapter_folder(output, record, Path(scratch), storage_options)
        with _staging(target) as staging:
            base = _base_model(record, storage_options)
            saved_dtype = _fold_and_save(base, adapter, record, staging, dtype, shard_bytes)
            note = save_tokenizer(base.local_location(), record["base_model"], staging)
            info = _provenance(output, record, base, saved_dtype, shard_bytes, rebuilt, note)
            (staging / PROVENANCE).write_text(json.dumps(info, indent=2) + "\n")
            shards = len(list(staging.glob("*.safetensors")))
    return Exported(
        merge_id=record["merge_id"],
        path=str(target),
        model_class=info["model_class"],
        dtype=saved_dtype,
        shards=shards,
        rebuilt=rebuilt,
        tokenizer=note is None,
        notes=() if note is None else (note,),
    )


def check_target(to: str, overwrite: bool, keep: list[str] = ()) -> Path:
    """The local folder to write to: absent or empty, or any folder with `overwrite`, but never
    one holding a location in `keep` (the sweep's output, the base model), which replacing it
    would delete."""
    if storage.is_remote(to):
        raise InputError(
            f"--to {to}: export writes a local folder; write it here, then copy it to the store "
            "(e.g. `aws s3 sync`)"
        )
    target = Path(to).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise InputError(f"--to {target} is a file: give a folder")
    for location in keep:
        if not storage.is_remote(location) and Path(location).is_absolute():
            held = Path(location).resolve()
            if held == target or target in held.parents:
                raise InputError(
                    f"--to {target}: replacing it would delete {held}, which the export reads; "
                    "choose another folder"
                )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise InputError(
            f"--to {target} is not empty: choose another folder, or pass --overwrite to replace it"
        )
    return target


def adapter_folder(
    output: str, record: dict[str, Any], scratch: Path, storage_options=None
) -> tuple[Path, bool]:
    """A local folder holding the merged adapter's files, and whether they were rebuilt: read
    from the output and checked against the record's digests, or, where keep top-k dropped them,
    rebuilt by `materialize` into `scratch` and refused unless they match the record."""
    merge_id = record["merge_id"]
    files = record.get("files", {})
    if files and not any(entry.get("kept", True) for entry in files.values()):
        (result,) = materialize.materialize(output, [merge_id], str(scratch), storage_options)
        if not result.matches_record:
            why = f" ({result.note})" if result.note else ""
            raise MergeError(
                f"merge {merge_id}: keep top-k dropped its files, and rebuilding them gave files "
                f"that differ from its merge.json{why}; nothing exported (export it on a machine "
                "like the one that made it)"
            )
        return Path(result.path), True
    folder = manifest.merge_dir(output, merge_id)
    rebuild = f"rebuild its files with `raymerge materialize {output} {merge_id}`"
    uris = {name: storage.join(folder, name) for name in files}
    try:
        read = storage.read_many(list(uris.values()), storage_options)
    except FileNotFoundError as exc:
        raise InputError(
            f"merge {merge_id} is not committed: a file its merge.json lists is missing ({exc}); "
            f"{rebuild}"
        ) from None
    data = {name: read[uri] for name, uri in uris.items()}
    found = publish.digests(data)
    for name, entry in files.items():
        if found[name] != entry.get("sha256"):
            raise InputError(
                f"merge {merge_id}: {uris[name]} differs from its merge.json (sha256); {rebuild}"
            )
        (scratch / name).write_bytes(data[name])
    return scratch, False


@contextlib.contextmanager
def _staging(target: Path) -> Iterator[Path]:
    """A temporary folder beside `target`, moved into its place if the block succeeds and
    removed whatever happens (so is any folder `target` replaces)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.export-"))
    try:
        yield staging
        _as_if_created(staging)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.replaced-{secrets.token_hex(4)}")
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            if old is not None:  # what was there goes back
                os.replace(old, target)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _as_if_created(folder: Path) -> None:
    """The permissions a plain mkdir and write would give (mkdtemp's folder, and some writers'
    files, are private to their owner: a server running as another user could not read them)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _base_model(record: dict[str, Any], storage_options):
    """The record's base model (its config read now, its weights in float32 when used)."""
    from raymerge.load.base_model import BaseModel

    location = record["base_model"]
    try:
        return BaseModel(
            location, storage_options, task_type=record.get("task_type"), torch_dtype=FOLD_DTYPE
        )
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(
            f"base model {location} (merge.json's base_model): cannot read its config "
            f"({type(exc).__name__}: {first_line(exc)}); make it readable from here"
        ) from None


def base_dtype(config) -> str:
    """The dtype a base model's config says its weights are in (float32 if it says none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else "float32"


def _fold_and_save(
    base, adapter: Path, record: dict[str, Any], staging: Path, dtype: str, shard_bytes: int
) -> str:
    """Fold the merged adapter into the base model (float32) and save the model in `dtype`
    (auto: the base's own); returns the dtype saved."""
    import torch

    merge_id = record["merge_id"]
    try:
        peft = base.load_adapter(adapter, ADAPTER_NAME)
        model = peft.merge_and_unload(safe_merge=True)  # safe: refuses NaNs it would fold in
    except (RuntimeError, ValueError, OSError, KeyError) as exc:
        raise MergeError(
            f"merge {merge_id}: its adapter cannot be folded into the base model "
            f"{record['base_model']} ({type(exc).__name__}: {first_line(exc)})"
        ) from None
    saved = base_dtype(base.config) if dtype == "auto" else dtype
    model.to(getattr(torch, saved))
    model.save_pretrained(staging, max_shard_size=shard_bytes)
    return saved


def save_tokenizer(local: str, location: str, staging: Path) -> str | None:
    """Save the tokenizer of the base model (at `local`: its folder, or a hub id) beside the
    weights; None if saved, else a note saying why not."""
    from transformers import AutoTokenizer

    folder = Path(local)
    if folder.is_dir() and not any((folder / name).exists() for name in TOKENIZER_FILES):
        return (
            f"the base model {location} has no tokenizer: none written (copy yours into the folder)"
        )
    try:
        AutoTokenizer.from_pretrained(local).save_pretrained(staging)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return (
            f"the base model's tokenizer ({location}) cannot be loaded "
            f"({type(exc).__name__}: {first_line(exc)}): none written"
        )
    return None


def _provenance(
    output: str,
    record: dict[str, Any],
    base,
    dtype: str,
    shard_bytes: int,
    rebuilt: bool,
    tokenizer_note: str | None,
) -> dict[str, Any]:
    """raymerge-export.json: which merge this is, of what, and how it was written."""
    return {
        "output": output,
        "merge_id": record["merge_id"],
        "base_model": record["base_model"],
        "task_type": record.get("task_type"),
        "model_class": base.layout.model_class,
        "adapters": [
            {key: a.get(key) for key in ("name", "uri", "weights_sha256")}
            for a in record["adapters"]
        ],
        "weights": record["weights"],
        "combination_type": record["combination_type"],
        "params": record["params"],
        "adapter_files": {name: f.get("sha256") for name, f in record["files"].items()},
        "rebuilt": rebuilt,
        "folded_in": FOLD_DTYPE,
        "dtype": dtype,
        "max_shard_size": shard_bytes,
        "tokenizer": tokenizer_note is None,
        **({"tokenizer_note": tokenizer_note} if tokenizer_note else {}),
        "versions": library_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
