"""`raymerge bench` commands report consistent figures (the numbers themselves come from runs,
not tests: these check what they count, at small sizes)."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from raymerge.bench.plan import simulate_dispatch, synthetic_plan
from raymerge.cli import app


def test_bench_plan_reports_its_figures_for_each_size(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app, ["bench", "plan", "--merges", "3000,6000", "--json-out", str(out)]
    )
    assert result.exit_code == 0, result.output
    small, large = json.loads(out.read_text())
    for figures, wanted in ((small, 3000), (large, 6000)):
        expected = sum(1 for _ in synthetic_plan(wanted).tasks())
        assert figures["merges"] == figures["dispatched"] == expected >= wanted
        # Each adapter is loaded at least once, and locality loads far fewer than round-robin.
        assert 64 <= figures["adapter_loads_locality"] < figures["adapter_loads_round_robin"] / 2
    assert "bench plan" in result.output


def test_bench_plan_refuses_a_bad_size():
    result = CliRunner().invoke(app, ["bench", "plan", "--merges", "many"])
    assert result.exit_code == 2 and "--merges 'many'" in result.output


def test_simulated_dispatch_hands_out_every_task_once():
    plan = synthetic_plan(3000, adapters=10)
    total = sum(1 for _ in plan.tasks())
    assert total == plan.total() == math.comb(10, 2) * 10 * math.ceil(3000 / (45 * 10))
    for kind in ("locality", "round_robin"):
        figures = simulate_dispatch(plan, kind, workers=3, cache=4)
        assert figures["dispatched"] == total
        assert figures["adapter_loads"] >= 10  # every adapter loaded at least once


def test_bench_manifest_counts_uploads_linear_in_the_sweep(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "manifest", "--out", str(tmp_path), "--lines", "20000", "--flush-every", "500",
         "--json-out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    # Segments once plus the compacted manifest once: twice the final size, not 40 flushes' worth.
    assert 1.9 <= figures["append_only_over_final_size"] <= 2.05
    assert figures["republishing_over_final_size"] > 15
    assert figures["resume_lines_carried"] == 20000
