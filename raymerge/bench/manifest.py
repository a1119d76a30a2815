"""`raymerge bench manifest`: what the manifest costs a long sweep.

- Bytes uploaded: a simulated sweep of `lines` merges whose manifest is flushed every
  `flush_every` lines, published as append-only segments and compacted once at the end, against
  republishing the whole manifest at each flush (computed, not uploaded: it is quadratic).
- A rerun's resume over that manifest: the driver streams it, keeping only the ids of committed
  merges; its time and peak memory are measured in a process of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

LINE = {
    "merge_id": "",
    "status": "done",
    "weights": [0.5, 0.5],
    "combination_type": "ties",
    "params": {"density": 0.5, "majority_sign_method": "total"},
    "seed": 0,
    "adapters": [
        {
            "name": "adapter001",
            "uri": "s3://bucket/adapters/adapter001",
            "weights_sha256": "0" * 64,
        },
        {
            "name": "adapter002",
            "uri": "s3://bucket/adapters/adapter002",
            "weights_sha256": "1" * 64,
        },
    ],
    "path": "s3://bucket/sweeps/run/merges/0000000000000000",
    "kept": True,
    "seconds": 0.05,
    "worker": 3,
    "adapter_loads": 0,
    "load_seconds": 0.0,
    "bytes": 4_200_000,
}
"""A manifest line of a typical size (~520 bytes)."""


def merge_ids(count: int):
    return (f"{i:016x}" for i in range(count))


def bench_manifest(root: Path, lines: int = 1_000_000, flush_every: int = 833) -> dict[str, Any]:
    from raymerge.store.manifest import MANIFEST, ManifestWriter

    output = root / "output"
    writer = ManifestWriter(str(output))
    republished = written = 0
    started = time.perf_counter()
    for i, merge_id in enumerate(merge_ids(lines), start=1):
        line = json.dumps({**LINE, "merge_id": merge_id}) + "\n"
        writer.add({**LINE, "merge_id": merge_id})
        written += len(line)
        if i % flush_every == 0:
            writer.flush()
            writer.wait_for_flush()  # one at a time, as a slow store would make them
            republished += written  # the old way: the whole manifest again at each flush
    writer.close()
    seconds = time.perf_counter() - started
    final = (output / MANIFEST).stat().st_size
    resume = _resume_in_subprocess(output, lines)
    return {
        "lines": lines,
        "flush_every_lines": flush_every,
        "flushes": lines // flush_every,
        "manifest_mb": round(final / 2**20, 1),
        "uploaded_mb_append_only": round(writer.bytes_uploaded / 2**20, 1),
        "uploaded_mb_republishing": round((republished + final) / 2**20, 1),
        "append_only_over_final_size": round(writer.bytes_uploaded / final, 2),
        "republishing_over_final_size": round((republished + final) / final, 1),
        "write_seconds": round(seconds, 1),
        **resume,
    }


def _resume_in_subprocess(output: Path, lines: int) -> dict[str, Any]:
    code = (
        "import json; from pathlib import Path; from raymerge.bench.manifest import resume; "
        f"print(json.dumps(resume(Path({str(output)!r}), {lines})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def resume(output: Path, lines: int) -> dict[str, Any]:
    """What a rerun does with the manifest: every merge is committed, its line carried over."""
    import resource
    from types import SimpleNamespace

    from raymerge.cluster.resume import carried_lines
    from raymerge.store.manifest import ManifestWriter

    started = time.perf_counter()
    committed = set(merge_ids(lines))
    plan = SimpleNamespace(output=str(output), spec=SimpleNamespace(storage_options={}))
    writer = ManifestWriter(str(output))
    writer.carry(carried_lines(plan, committed))
    carried = writer.lines
    writer.discard()
    return {
        "resume_lines_carried": carried,
        "resume_seconds": round(time.perf_counter() - started, 1),
        "resume_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
