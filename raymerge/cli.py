"""The `raymerge` command: parse, call one function, print, exit (0 ok, 1 failures, 2 bad input)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from raymerge.errors import RaymergeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Merge LoRA adapters at scale: a sweep spec in, merged adapters out, on Ray.",
)
# soft_wrap: paths and URIs stay whole on one line, for copying and for logs.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan, tasks included, as JSON."),
) -> None:
    """Expand SPEC into merge tasks and check every input; writes nothing."""
    from raymerge.plan import load_plan

    with _exit_on_error():
        the_plan = load_plan(spec)
        if as_json:
            tasks = [task.to_json() for task in the_plan.tasks()]
            print(json.dumps({**the_plan.summary(), "tasks": tasks}, indent=2))
            return
        _print_plan(the_plan.summary())


@app.command()
def run(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML)."),
    output: str | None = typer.Option(None, help="Override the spec's `output`."),
    workers: int | None = typer.Option(None, help="Override the spec's `workers`."),
    gpus_per_worker: float | None = typer.Option(None, help="Override `gpus_per_worker`."),
    address: str | None = typer.Option(
        None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)."
    ),
) -> None:
    """Run every merge of SPEC on Ray; merges already done in the output are skipped."""
    from raymerge.plan import load_plan

    with _exit_on_error():
        overrides = {"output": output, "workers": workers, "gpus_per_worker": gpus_per_worker}
        the_plan = load_plan(spec, overrides)
        _run_and_report(the_plan, address)


@app.command()
def demo(
    out: Path = typer.Option(Path("raymerge-demo"), help="Folder for the demo world and merges."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), help="Merge workers."),
    address: str | None = typer.Option(None, help="Ray cluster to join (default: local)."),
) -> None:
    """Build a tiny base model and adapters locally, then run a small sweep over them."""
    from raymerge.demo import prepare_demo
    from raymerge.plan import load_plan

    with _exit_on_error():
        console.print(f"Building a tiny Llama-architecture world in {out}/world …")
        spec = prepare_demo(out, workers)
        the_plan = load_plan(spec)
        _print_plan(the_plan.summary())
        _run_and_report(the_plan, address)
        console.print(f"\nSpec: {spec}\nMerged adapters: {the_plan.output}/merges/<merge_id>/")
        console.print(f"Manifest: {the_plan.output}/manifest.jsonl")


def _run_and_report(the_plan, address: str | None) -> None:
    from raymerge.driver import run_sweep

    with _ProgressBar() as bar:
        summary = run_sweep(the_plan, address=address, progress=bar)
    _print_summary(summary.to_json())
    if summary.failed:
        raise typer.Exit(1)


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} merges/s", style="cyan")


class _ProgressBar:
    """Done/total, rate and ETA while the sweep runs."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]merging"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self._task = None

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            console.print(f"Skipping {skipped} merges already done in the output.")
        self._task = self._progress.add_task("merge", total=total)

    def advance(self, result: dict[str, Any]) -> None:
        self._progress.advance(self._task)
        if result["status"] != "done":
            console.print(Text(f"merge {result['merge_id']} failed: {result['error']}", "red"))


def _print_plan(summary: dict[str, Any]) -> None:
    console.print(f"Plan: {summary['total']} merges → {summary['output']}")
    table = Table()
    table.add_column("combination type")
    table.add_column("merges", justify="right")
    for name, count in summary["by_type"].items():
        table.add_row(name, str(count))
    console.print(table)
    adapters = Table(title="Adapters")
    for column in ("name", "r", "lora_alpha"):
        adapters.add_column(column)
    adapters.add_column("location", overflow="fold")
    for name, info in summary["adapters"].items():
        adapters.add_row(name, str(info["r"]), str(info["lora_alpha"]), info["uri"])
    console.print(adapters)


def _print_summary(summary: dict[str, Any]) -> None:
    table = Table(title="Sweep summary", show_header=False)
    table.add_column()
    table.add_column(overflow="fold")
    keys = ("done", "skipped", "failed", "not_run", "retries", "total", "seconds", "merge_seconds")
    for key in (*keys, "merges_per_s", "adapter_loads", "bytes_written"):
        table.add_row(key.replace("_", " "), str(summary[key]))
    per_worker = ", ".join(
        f"w{k}: {w['done']} merges, {w['adapter_loads']} loads"
        for k, w in summary["workers"].items()
    )
    table.add_row("per worker", per_worker)
    table.add_row("output", summary["output"])
    console.print(table)
    for failure in summary["failures"][:10]:
        err_console.print(Text(f"failed {failure['merge_id']}: {failure['error']}", "red"))


class _exit_on_error:
    """Map raymerge's errors to a message on stderr and the error's exit code."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, RaymergeError):
            err_console.print(Text(f"error: {exc}", style="red"))
            raise typer.Exit(exc.exit_code)
        return False


if __name__ == "__main__":
    app()
