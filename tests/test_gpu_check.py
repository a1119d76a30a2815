"""The prepared GPU check runs to its table on the CPU (`--device cpu --small`) without importing
any package the GPU machine lacks, so it cannot rot before a GPU machine is lent."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from raymerge.merge.registry import METHODS, Form

ABSENT_THERE = ("ray", "pydantic", "optuna", "s3fs", "aiobotocore", "lm_eval")
"""raymerge's dependencies the GPU machine lacks (tenacity, which the store needs, travels there
as a wheel; boto3, which accelerate imports where it is installed, is optional to it)."""


def test_the_gpu_check_runs_to_its_table_without_the_packages_the_gpu_machine_lacks(tmp_path):
    # Importing them is not blocked (libraries probe for optional packages with find_spec and
    # expect an answer): the check must simply never import them.
    runner = textwrap.dedent(
        """
        import json, sys
        from raymerge.bench.gpu_check import main
        code = main(sys.argv[1:])
        print("IMPORTED", json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
        sys.exit(code)
        """
    )
    out = tmp_path / "check"
    done = subprocess.run(
        [sys.executable, "-c", runner, "--device", "cpu", "--small", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "all ok" in done.stdout
    imported = json.loads(done.stdout.split("IMPORTED", 1)[1])
    assert not set(ABSENT_THERE) & set(imported), set(ABSENT_THERE) & set(imported)
    figures = json.loads((out / "gpu-check.json").read_text())
    fast = {row["type"] for row in figures["types"] if row["engine"] == "fast"}
    peft = {row["type"] for row in figures["types"] if row["engine"] == "peft"}
    assert fast == set(METHODS)
    assert peft == {name for name, method in METHODS.items() if method.peft}
    assert all(row["ok"] and row["repeatable"] for row in figures["types"])
    assert [row["adapters_per_pass"] for row in figures["scoring"]] == [1, 4, 16]
    # On the CPU, K merges per pass score exactly as one at a time.
    assert all(row["max_loss_diff_vs_1"] == 0.0 for row in figures["scoring"])
    shares = figures["merge_bench"][0]
    assert 0.99 < sum(v for k, v in shares.items() if k.endswith("_share")) < 1.01
    # The profiler's count of one merge: one value read (its finiteness; the factorising types'
    # linear algebra also reads each call's status, inside torch), and on the CPU no CUDA
    # launch or synchronisation at all.
    for row in figures["merge_bench"]:
        reads = row["value_reads_per_merge"]
        factorising = METHODS[row["type"]].form in (Form.DELTA_SVD, Form.LOWRANK)
        assert reads >= 1 if factorising else reads == 1, row
        assert row["launches_per_merge"] == row["syncs_per_merge"] == 0, row
