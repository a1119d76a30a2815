"""`raymerge bench racing` on a small grid: its figures are those of the runs it made (the race's
pick judged against the full run's ranking and records, the fraction its own scorings over the
full run's), and the printer shows them. The numbers themselves come from `raymerge bench
racing`, not from here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from raymerge.bench.racing import bench_racing, ranked
from raymerge.bench.racing_world import NOISE, World
from raymerge.cli import render
from raymerge.cli.console import consoles
from raymerge.store.manifest import read_manifest, read_references
from raymerge.sweep.plan import load_plan, objective

SMALL = World(
    examples=48,
    weights=([0.5, 0.5], [1.0, 1.0], [0.2, 0.8]),
    methods=({"combination_type": "linear"}, {"combination_type": "cat"}),
    sets=("upper", "upper_choice"),
)
"""6 pairs x 3 weightings x 2 types = 36 merges, two eval sets of 48 examples."""


def test_bench_racing_judges_each_race_against_the_full_run(demo_dir, tmp_path):
    shutil.copytree(demo_dir / "world", tmp_path / "demo" / "world")  # trained: no training here
    figures = bench_racing(
        tmp_path, seeds=2, racing={"first": 8}, world=SMALL, search=False, log=lambda _: None
    )
    assert "search" not in figures

    world = figures["world"]
    assert world["merges"] == 36 and world["adapters"] == 4
    assert world["examples_per_set"] == {"upper": 48, "upper_choice": 48}
    assert not figures["target"]["world_sized"]  # below the targets' sizes: said so
    assert (tmp_path / "demo" / "world" / "adapters" / NOISE / "adapter_config.json").exists()

    full = str(tmp_path / "demo" / "racing-full")
    lines = read_manifest(full)
    assert len(lines) == 36 and all(line["status"] == "done" for line in lines)
    plan = load_plan(tmp_path / "demo" / "racing-full.yaml")
    truth = ranked(objective(plan.spec, read_references(full)), lines)
    by_id = {line["merge_id"]: line for line in lines}
    assert figures["full"]["top1"] == truth[0]
    assert figures["full"]["examples_scored"] == 36 * 2 * 48

    rows = figures["rules"]["bound"]["by_seed"]
    assert [row["seed"] for row in rows] == [0, 1]
    for row in rows:
        race = read_manifest(str(tmp_path / "demo" / f"racing-bound-{row['seed']}"))
        done = [line for line in race if line["status"] == "done"]
        assert row["top1"] == ranked(objective(plan.spec, read_references(full)), done)[0]
        assert row["stopped"] == len(race) - len(done) > 0  # the race stopped some merges
        # the pick is judged on the full run's scores, and its race scored it fully alike
        assert row["rank"] == truth.index(row["top1"]) + 1
        assert row["equal"] == (row["top1"] == truth[0]) == (row["rank"] == 1)
        assert row["objective"] == by_id[row["top1"]]["objective"] == row["objective_as_raced"]
        assert row["found"] == row["tied"] and (row["tied"] or not row["equal"])
        assert row["examples_if_full"] == figures["full"]["examples_scored"]
        assert 0 < row["examples_fraction"] < 1
        assert row["examples_fraction"] == round(
            row["examples_scored"] / row["examples_if_full"], 4
        )
    result = figures["rules"]["bound"]
    assert result["found"] == sum(row["found"] for row in rows)
    assert result["fraction_max"] == max(row["examples_fraction"] for row in rows)

    with consoles.out.capture() as captured:
        render.print_racing(figures)
    text = captured.get()
    assert "Racing (bound) against full evaluation" in text
    assert f"{rows[0]['examples_fraction']:.1%}" in text
    assert "world below target size" in text and "NOT met" in text
    assert figures["racing"]["first"] == 8 and "first 8, growth 2.0" in text
    json.dumps(figures)  # what --json-out writes


def test_a_tie_is_judged_on_the_full_sets(demo_dir, tmp_path):
    """The best merge is tied with itself; the worst of the grid (far behind on the choice set,
    on the same 48 examples) is not."""
    shutil.copytree(demo_dir / "world", tmp_path / "demo" / "world")
    from raymerge.bench.racing import Truth, run_grid
    from raymerge.bench.racing_world import racing_spec

    tiny = World(
        examples=48,
        weights=([0.5, 0.5], [1.0, 1.0]),
        methods=({"combination_type": "linear"},),
        sets=("upper_choice",),
    )
    full, _ = run_grid(tmp_path, racing_spec(tmp_path, tiny, 1, log=lambda _: None), "full")
    truth = Truth.read(full)
    assert truth.tied(truth.ranking[0])
    assert not truth.tied(truth.ranking[-1])
    assert Path(truth.lines[truth.ranking[-1]]["path"], "merge.json").exists()


def test_the_search_leg_reports_each_seed_against_the_grid(demo_dir, tmp_path):
    """One seed per budget unit on a small world: in evaluations, pruning buys more candidates
    than in trials, for no more than the budget's examples; the best is the best done line."""
    shutil.copytree(demo_dir / "world", tmp_path / "demo" / "world")
    from raymerge.bench.racing import SEARCH_BUDGET, Truth, run_grid, search_figures
    from raymerge.bench.racing_world import racing_spec

    spec = racing_spec(tmp_path, SMALL, 1, log=lambda _: None)
    full, _ = run_grid(tmp_path, spec, "full")
    truth = Truth.read(full)
    figures = search_figures(tmp_path, spec, truth, log=lambda _: None, seeds=1)
    assert figures["grid_best"] == truth.lines[truth.ranking[0]]["objective"]
    [trials], [evaluations] = figures["trials"]["by_seed"], figures["evaluations"]["by_seed"]
    assert trials["candidates"] == SEARCH_BUDGET
    assert evaluations["candidates"] > SEARCH_BUDGET
    assert evaluations["evaluations"] <= SEARCH_BUDGET
    for unit, row in (("trials", trials), ("evaluations", evaluations)):
        lines = read_manifest(str(tmp_path / "demo" / f"racing-search-{unit}-0"))
        done = [line["objective"] for line in lines if line["status"] == "done"]
        assert row["best"] == max(done) and row["pruned"] == len(lines) - len(done)
        assert figures[unit]["median_best"] == row["best"]
        assert figures[unit]["reached"] == (row["best"] >= figures["grid_best"])
    with consoles.out.capture() as captured:
        render.print_racing({**_figures_stub(), "search": figures})
    assert f"median best {trials['best']:.4f}" in captured.get()


def _figures_stub() -> dict:
    """The smallest `bench racing` figures the printer takes (no rule run)."""
    world = {"merges": 1, "adapters": 4, "examples_per_set": {"a": 1}, "objective": "x"}
    full = {"top1_recipe": "linear a+b 1/1", "top1_objective": 0.0, "tied_with_top1": 0}
    return {
        "world": {**world, "seeds": 1},
        "full": {**full, "examples_scored": 1, "seconds": 0.0},
        "racing": {},
        "rules": {},
        "target": {"fraction": 0.25, "found": 1, "world_sized": False, "met": {}},
    }
