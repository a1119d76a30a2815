"""The append-only manifest (segments while a run goes, one compacted file at its end) and the
plan's de-duplication by definition (no set of every merge id in the driver)."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

from raymerge.store import manifest
from raymerge.sweep.expand import candidates, group_names
from raymerge.sweep.identity import canonical_key as _canonical
from raymerge.sweep.spec import ChooseGroup, parse_spec


def _line(merge_id: str, status: str = "done") -> dict:
    return {"merge_id": merge_id, "status": status, "adapters": [], "weights": [1.0]}


def test_a_killed_run_leaves_segments_that_every_reader_includes(tmp_path):
    output = str(tmp_path / "out")
    first = manifest.ManifestWriter(output)
    first.add(_line("0" * 16))
    first.add(_line("1" * 16, "failed"))
    first.flush()
    first._pending.result()
    first.add(_line("2" * 16))  # not flushed: lost with the run, rebuilt from merge.json later
    first.discard()  # the driver was killed: no compaction

    segments = list(Path(output, manifest.SEGMENTS).iterdir())
    assert len(segments) == 1 and not Path(output, manifest.MANIFEST).exists()
    assert [line["merge_id"] for line in manifest.iter_lines(output)] == ["0" * 16, "1" * 16]

    second = manifest.ManifestWriter(output)  # a rerun: 1 is done now
    second.add(_line("1" * 16))
    second.flush()
    second._pending.result()
    lines = {line["merge_id"]: line["status"] for line in manifest.read_manifest(output)}
    assert lines == {"0" * 16: "done", "1" * 16: "done"}  # done wins over an earlier failure

    second.carry([_line("0" * 16)])
    second.close()
    assert not any(Path(output, manifest.SEGMENTS).iterdir())  # compacted, segments removed
    compacted = Path(output, manifest.MANIFEST).read_text().splitlines()
    assert sorted(json.loads(line)["merge_id"] for line in compacted) == ["0" * 16, "1" * 16]


def test_flushes_upload_only_new_lines(tmp_path, monkeypatch):
    """Bytes uploaded over a long sweep are O(merges): each flush sends only its new lines."""
    from raymerge.store import storage

    uploads = []
    real_write = storage.write

    def counting_write(uri, source, options=None):
        uploads.append(len(source) if isinstance(source, bytes) else Path(source).stat().st_size)
        return real_write(uri, source, options)

    monkeypatch.setattr(storage, "write", counting_write)
    writer = manifest.ManifestWriter(str(tmp_path / "out"))
    for i in range(3000):
        writer.add(_line(f"{i:016x}"))
        if i % 100 == 99:
            writer.flush()
            writer._pending.result()
    writer.close()
    final = Path(tmp_path, "out", manifest.MANIFEST).stat().st_size
    assert len(uploads) == 31  # 30 segments, then the compacted manifest
    assert sum(uploads) == 2 * final  # every line once in a segment, once compacted
    assert max(uploads[:-1]) < final / 25  # no flush republishes the whole manifest


def _brute_force(spec) -> list[tuple]:
    """Every merge once, remembering every one seen (what the plan must equal without doing)."""
    seen, out = set(), []
    for group in spec.combinations:
        names = list(dict.fromkeys(group_names(group, spec)))
        sets = (
            itertools.combinations(names, group.choose)
            if isinstance(group, ChooseGroup)
            else [tuple(names)]
        )
        for adapters in sets:
            for weights in group.weights:
                for method in group.methods:
                    for combination_type, params in method.expand():
                        key = _canonical([adapters, [float(w) for w in weights],
                                          combination_type, params])  # fmt: skip
                        if key not in seen:
                            seen.add(key)
                            out.append(key)
    return out


def test_a_rerun_carries_the_last_line_of_each_merge(tmp_path):
    """keep top-k appends a later line (`kept: false`) for a merge whose files it removed: a
    rerun carries that one, not the first, so its top k is not seeded with files that are gone."""
    from types import SimpleNamespace

    from raymerge.cluster.resume import carried_lines

    output = str(tmp_path / "out")
    writer = manifest.ManifestWriter(output)
    kept, dropped = "a" * 16, "b" * 16
    for merge_id in (kept, dropped):
        writer.add({**_line(merge_id), "kept": True})
    writer.add({**_line(dropped), "kept": False})
    writer.close()
    plan = SimpleNamespace(output=output, spec=SimpleNamespace(storage_options={}))
    carried = {line["merge_id"]: line["kept"] for line in carried_lines(plan, {kept, dropped})}
    assert carried == {kept: True, dropped: False}


def test_overlapping_groups_drop_exactly_the_duplicates():
    rng = random.Random(0)
    names = ["a", "b", "c", "d"]
    for _ in range(150):
        groups = []
        for _ in range(rng.randint(1, 4)):
            weights = [[rng.choice([0.5, 1.0, -0.0, 0.0])] * 2 for _ in range(rng.randint(1, 3))]
            methods = [
                rng.choice(
                    [
                        {"combination_type": ["linear", "cat"]},
                        {"combination_type": "ties", "density": rng.sample([0.3, 0.5, 0.7], 2)},
                        {"combination_type": ["ties", "dare_ties"], "density": 0.5},
                        {"combination_type": "svd", "svd_rank": [2, 4]},
                        {"combination_type": "svd"},
                    ]
                )
                for _ in range(rng.randint(1, 3))
            ]
            if rng.random() < 0.5:
                group = {"choose": 2, "from": rng.sample(names, rng.randint(2, 4))}
            else:
                group = {"adapters": rng.sample(names, 2)}
            groups.append({**group, "weights": weights, "methods": methods})
        spec = parse_spec(
            {
                "base_model": "b",
                "adapters": {n: n for n in names},
                "output": "o",
                "combinations": groups,
            }
        )
        planned = [
            _canonical([list(c.adapters), list(c.weights), c.combination_type, c.params])
            for c in candidates(spec)
        ]
        expected = [json.dumps(json.loads(k)) for k in _brute_force(spec)]
        assert [json.dumps(json.loads(k)) for k in planned] == expected, groups
