"""What the commands run beyond one call: a sweep under the progress bar, the demo's grid and
search. Lower layers are imported when a command runs."""

from __future__ import annotations

from pathlib import Path

import typer

from raymerge.cli import render
from raymerge.cli.console import consoles
from raymerge.cli.progress import ProgressBar


def location(where: str) -> str:
    """A store URI as given; a local path made absolute (the workers may run elsewhere).

    >>> location("s3://bucket/sweep")
    's3://bucket/sweep'
    """
    from raymerge.store import storage

    return where if storage.is_remote(where) else str(Path(where).resolve())


def run_and_report(
    the_plan,
    address: str | None,
    fail_fast: bool = False,
    rebuild_changed: bool = False,
    use_ray: bool | None = None,
) -> None:
    """Run THE_PLAN with a progress bar and print its summary; exit 1 if a merge failed or
    was not run."""
    from raymerge.cluster.driver import run_sweep

    with ProgressBar() as bar:
        summary = run_sweep(
            the_plan,
            address=address,
            progress=bar,
            fail_fast=fail_fast,
            rebuild_changed=rebuild_changed,
            use_ray=use_ray,
        )
    render.print_summary(summary.to_json())
    if summary.not_run:
        consoles.err.print(f"Stopped at the first failure: {summary.not_run} merges not run.")
    if summary.failed or summary.not_run:
        raise typer.Exit(1)


def run_demo(the_plan, spec: Path, address: str | None) -> None:
    """The demo's grid, its verdict, then its search, each with its leaderboard."""
    from raymerge.report.report import build_report
    from raymerge.sweep.plan import load_plan

    run_and_report(the_plan, address)
    result = build_report(the_plan.output)
    render.print_leaderboard(result, top=10)
    consoles.out.print(render.verdict(result))
    consoles.out.print(f"\nSearching the same space with TPE ({spec.parent / 'search.yaml'}):")
    search_plan = load_plan(spec.parent / "search.yaml")
    run_and_report(search_plan, address)
    searched = build_report(search_plan.output)
    render.print_leaderboard(searched, top=3)
    best, grid = searched.rows[0]["objective"], result.rows[0]["objective"]
    consoles.out.print(
        f"Grid: best objective {grid:.4f} after {len(result.rows)} evaluations; search: "
        f"{best:.4f} after {len(searched.rows)}"
    )
    consoles.out.print(f"\nSpec: {spec}\nMerged adapters: {the_plan.output}/merges/<merge_id>/")
    render.print_outputs(result)


def run_real_demo(the_plan, spec: Path, address: str | None) -> None:
    """The real-model demo: one sweep (a raced grid, then a search), its leaderboard and
    verdict, the grid's best against the search's, and what the best merge keeps of each
    adapter's own skill."""
    from raymerge.demo.real_demo import kept_skills
    from raymerge.report.report import build_report

    run_and_report(the_plan, address)
    result = build_report(the_plan.output)
    render.print_leaderboard(result, top=10)
    consoles.out.print(render.verdict(result))
    render.print_grid_and_search(result)
    render.print_kept_skills(result.rows[0], kept_skills(result.rows[0], result.references))
    consoles.out.print(f"\nSpec: {spec}\nMerged adapters: {the_plan.output}/merges/<merge_id>/")
    render.print_outputs(result)
    consoles.out.print(
        "The best merge as a full model: raymerge export "
        f"{the_plan.output} {result.rows[0]['merge_id']} --to ./best-model"
    )
