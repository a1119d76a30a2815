"""`raymerge bench plan` reports figures (the numbers themselves come from runs, not tests)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from raymerge.bench import simulate_dispatch, synthetic_plan
from raymerge.cli import app


def test_bench_plan_reports_its_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "plan", "--merges", "5000", "--json-out", str(out)])
    assert result.exit_code == 0, result.output
    figures = json.loads(out.read_text())
    assert figures["merges"] >= 5000 and figures["dispatched"] == figures["merges"]
    assert figures["peak_rss_mb"] > 0 and figures["total_seconds"] > 0
    assert figures["adapter_loads_locality"] < figures["adapter_loads_round_robin"]


def test_simulated_dispatch_hands_out_every_task_once():
    plan = synthetic_plan(3000, adapters=10)
    total = sum(1 for _ in plan.tasks())
    for kind in ("locality", "round_robin"):
        figures = simulate_dispatch(plan, kind, workers=3, cache=4)
        assert figures["dispatched"] == total
        assert figures["adapter_loads"] >= 10  # every adapter loaded at least once
