"""Inputs are what the records say: the digests of the adapters an output's merges were made
from (`<output>/inputs.json`, by location), checked before a rerun adds to it.

An adapter replaced in place between two runs would leave an output holding merges of two
versions of it under one name. A rerun therefore compares each input's current digests with the
recorded ones and stops before any work where they differ, naming the adapter and the merges made
from the old version — unless told to rebuild exactly those merges.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from raymerge.errors import InputError, MergeError
from raymerge.merge.format import ADAPTER_FILES, CONFIG_FILE
from raymerge.store import hub, input_cache, manifest, storage


def current_digests(plan) -> dict[str, dict[str, Any]]:
    """Name -> uri, weights file and the sha256 of its weights and config, for every adapter a
    merge of the plan uses (remote ones through the node's input cache). A Hub input is recorded
    under its location as given, with `resolved`: the commit-pinned location its merges read."""
    options = plan.spec.storage_options
    digests = {}
    for name in plan.adapters_used():
        info = plan.adapters[name]
        folder = input_cache.local_copy(info.uri, options)
        digests[name] = {
            "uri": info.source or info.uri,
            **({"resolved": info.uri, "commit": hub.commit_of(info.uri)} if info.source else {}),
            "weights_file": info.weights_file,
            "weights_sha256": file_sha256(folder / info.weights_file),
            "config_sha256": file_sha256(folder / CONFIG_FILE),
        }
    return digests


def inputs_record(plan, digests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """inputs.json's content: the recorded inputs, updated with this plan's, by location."""
    recorded = manifest.read_inputs(plan.output, plan.spec.storage_options) or {}
    adapters = dict(recorded.get("adapters", {}))
    for name, entry in digests.items():
        adapters[entry["uri"]] = {"name": name, **{k: v for k, v in entry.items() if k != "uri"}}
    base = base_record(plan) or recorded.get("base_model")
    return {"adapters": adapters, **({"base_model": base} if base else {})}


def base_record(plan) -> dict[str, Any] | None:
    """A Hub base model as inputs.json records it: its location as written and the commit its
    merges were made and scored with (None for any other base model)."""
    if not hub.is_hub(plan.base_model):
        return None
    written = storage.resolve(plan.spec.base_model, plan.spec_path.parent)
    return {"uri": written, "resolved": plan.base_model, "commit": hub.commit_of(plan.base_model)}


def check_base_unchanged(plan, committed: set[str]) -> None:
    """A scored sweep's Hub base model must be the commit its committed merges were scored on:
    a moved branch would rank new merges scored on other weights beside them."""
    recorded = (manifest.read_inputs(plan.output, plan.spec.storage_options) or {}).get(
        "base_model"
    )
    now = base_record(plan)
    if not (recorded and now and committed and plan.spec.evaluate is not None):
        return
    if recorded.get("uri") != now["uri"] or recorded.get("resolved") == now["resolved"]:
        return
    raise InputError(
        f"base_model {now['uri']} moved since the merges in {plan.output} were scored: it "
        f"pointed at {recorded.get('commit')}, it now points at {now['commit']}; "
        f"{len(committed)} committed merge(s) were scored on the old weights. Pin the old "
        f"commit (base_model: {recorded.get('resolved')}) to go on, or write to a new `output`"
    )


def check_unchanged(
    plan, digests: dict[str, dict[str, Any]], committed: set[str], rebuild: bool
) -> set[str]:
    """The committed merges to redo because an input changed (empty unless `rebuild`); raises
    InputError naming each changed adapter and its merges when not rebuilding."""
    options = plan.spec.storage_options
    recorded = (manifest.read_inputs(plan.output, options) or {}).get("adapters", {})
    changed = {}
    for name, entry in digests.items():
        before = recorded.get(entry["uri"])
        if before and (
            before.get("weights_sha256") != entry["weights_sha256"]
            or before.get("config_sha256") != entry["config_sha256"]
        ):
            changed[entry["uri"]] = (name, before, entry)
    if not changed or not committed:
        return set()
    # A Hub input's old merges name the commit-pinned location its old version was read from.
    read_from = {uri: before.get("resolved", "") for uri, (_, before, _) in changed.items()}
    using = _merges_using(plan, read_from, committed)
    if not rebuild:
        problems = []
        for uri, (name, before, now) in changed.items():
            count = len(using[uri])
            problems.append(
                f"adapter {name!r} ({uri}) changed since the merges in {plan.output} were made"
                f"{_moved(before, now)}: {count} committed merge(s) used the version with "
                "weights sha256 "
                f"{before.get('weights_sha256', '?')[:12]}…, it is now "
                f"{now['weights_sha256'][:12]}…. Write to a new `output`, or run again with "
                f"--rebuild-changed to redo exactly those {count} merge(s)"
            )
        raise InputError(problems)
    redo = set().union(*using.values())
    for merge_id in sorted(redo):  # uncommit first: an interrupted rebuild lists none of them
        folder = manifest.merge_dir(plan.output, merge_id)
        storage.delete(storage.join(folder, manifest.MERGE_JSON), options)
        storage.remove([storage.join(folder, f) for f in ADAPTER_FILES], options)
    return redo


def _moved(before: dict[str, Any], now: dict[str, Any]) -> str:
    """For a Hub input: which commits its revision named then and now."""
    old, new = before.get("resolved"), now.get("resolved")
    if not (old and new and old != new):
        return ""
    return f" (its revision pointed at {hub.commit_of(old)}, it now points at {hub.commit_of(new)})"


def _merges_using(plan, read_from: dict[str, str], committed: set[str]) -> dict[str, set[str]]:
    """Committed merge ids per input location, from the manifest (streamed) and the records of
    committed merges it does not list. A merge uses an input when it names its location or the
    location the recorded version was read from (`read_from`)."""
    options = plan.spec.storage_options
    using: dict[str, set[str]] = {uri: set() for uri in read_from}
    owner = {uri: uri for uri in read_from} | {r: uri for uri, r in read_from.items() if r}
    listed = set()
    for line in manifest.iter_lines(plan.output, options):
        merge_id = line.get("merge_id")
        if merge_id not in committed or line.get("status") != "done":
            continue
        listed.add(merge_id)
        for adapter in line.get("adapters", []):
            if adapter.get("uri") in owner:
                using[owner[adapter["uri"]]].add(merge_id)
    for record in manifest.read_records(plan.output, sorted(committed - listed), options):
        for adapter in record.get("adapters", []):
            if adapter.get("uri") in owner:
                using[owner[adapter["uri"]]].add(record["merge_id"])
    return using


def check_digest(name: str, uri: str, expected: str | None, found: str) -> None:
    """A worker's check, at load: an input replaced while the sweep ran is refused (its merges
    would mix two versions of it)."""
    if expected and expected != found:
        raise MergeError(
            f"adapter {name!r} ({uri}) changed while the sweep ran: its weights' sha256 is "
            f"{found[:12]}…, the sweep started with {expected[:12]}…; run the spec again "
            "(with --rebuild-changed to redo the merges made from the old version)"
        )


def file_sha256(path: Path) -> str:
    """The sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
