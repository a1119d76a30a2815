"""The `raymerge` command: parse, call one function, print, exit (0 ok, 1 failures, 2 bad input)."""

from __future__ import annotations

import json
import os
import sys
import time
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


def _width() -> int | None:
    """Off a terminal (job logs, pipes) tables get COLUMNS or 120 columns rather than rich's
    default 80; read when a command runs, not at import."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() else 120


class _Consoles:
    """stdout and stderr consoles, made on first use. soft_wrap: paths and URIs stay whole on one
    line, for copying and for logs."""

    def __getattr__(self, name: str) -> Console:
        if name not in ("out", "err"):
            raise AttributeError(name)
        console = Console(stderr=name == "err", soft_wrap=True, width=_width())
        setattr(self, name, console)
        return console


_consoles = _Consoles()


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan, tasks included, as JSON."),
) -> None:
    """Expand SPEC into merge tasks and check every input; writes nothing."""
    from raymerge.sweep.plan import load_plan

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
    engine: str | None = typer.Option(None, help="Override `engine`: fast or peft."),
    address: str | None = typer.Option(
        None, help="Ray cluster to join (default: RAY_ADDRESS, else a new local instance)."
    ),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first failed merge."),
    rebuild_changed: bool = typer.Option(
        False,
        "--rebuild-changed",
        help="Redo the committed merges made from an adapter that has changed since.",
    ),
) -> None:
    """Run every merge of SPEC on Ray; merges already done in the output are skipped."""
    from raymerge.sweep.plan import load_plan

    with _exit_on_error():
        overrides = {
            "output": output,
            "workers": workers,
            "gpus_per_worker": gpus_per_worker,
            "engine": engine,
        }
        the_plan = load_plan(spec, overrides)
        _run_and_report(the_plan, address, fail_fast, rebuild_changed)


@app.command()
def demo(
    out: Path = typer.Option(Path("raymerge-demo"), help="Folder for the demo world and merges."),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), help="Merge workers."),
    address: str | None = typer.Option(None, help="Ray cluster to join (default: local)."),
) -> None:
    """Train tiny adapters on synthetic tasks, merge every pair many ways, score and rank them."""
    from raymerge.cluster.driver import ray_session
    from raymerge.demo.demo import prepare_demo
    from raymerge.sweep.plan import load_plan

    with _exit_on_error():
        _consoles.out.print(f"Building a tiny Llama-architecture world in {out}/world …")
        spec = prepare_demo(out, workers, log=_consoles.out.print)
        the_plan = load_plan(spec)
        _print_plan(the_plan.summary())
        with ray_session(address):  # one Ray instance for the grid and the search
            _demo_runs(the_plan, spec, address)


def _demo_runs(the_plan, spec: Path, address: str | None) -> None:
    """The demo's grid, its verdict, then its search, each with its leaderboard."""
    from raymerge.report.report import build_report
    from raymerge.sweep.plan import load_plan

    _run_and_report(the_plan, address)
    result = build_report(the_plan.output)
    _print_leaderboard(result, top=10)
    _consoles.out.print(_verdict(result))
    _consoles.out.print(f"\nSearching the same space with TPE ({spec.parent / 'search.yaml'}):")
    search_plan = load_plan(spec.parent / "search.yaml")
    _run_and_report(search_plan, address)
    searched = build_report(search_plan.output)
    _print_leaderboard(searched, top=3)
    best, grid = searched.rows[0]["objective"], result.rows[0]["objective"]
    _consoles.out.print(
        f"Grid: best objective {grid:.4f} after {len(result.rows)} evaluations; search: "
        f"{best:.4f} after {len(searched.rows)}"
    )
    _consoles.out.print(f"\nSpec: {spec}\nMerged adapters: {the_plan.output}/merges/<merge_id>/")
    _consoles.out.print(f"Leaderboard: {result.csv_uri}\nReport: {result.html_uri}")


def _verdict(result) -> str:
    """Does the best merge beat every single adapter on the objective?"""
    if not result.references:
        return ""
    objective = result.objective
    singles = {
        name: objective.value(scores) for name, scores in result.references["adapters"].items()
    }
    name, single = min(singles.items(), key=lambda item: objective.sort_key(item[1]))
    best = result.rows[0]
    value = best["objective"]
    what = (
        f"{objective.name} ({'lower' if objective.direction == 'minimize' else 'higher'} is better)"
    )
    if objective.better(value, single):
        return (
            f"The best merge ({best['adapters']}, {best['combination_type']}, weights "
            f"{best['weights']}) reaches {value:.4f} on the objective {what}, beating the best "
            f"single adapter ({name}: {single:.4f})."
        )
    return (
        f"No merge beats the best single adapter ({name}: {single:.4f}) on the objective {what};"
        f" the best merge reaches {value:.4f}."
    )


@app.command()
def report(
    output: str = typer.Argument(..., help="A sweep's output (local path or s3://)."),
    metric: str | None = typer.Option(
        None,
        help="Rank by this metric (SET.METRIC, e.g. qa.accuracy, or mean_loss) instead of the "
        "sweep's objective.",
    ),
    out: str | None = typer.Option(None, help="Where to write (default: beside the manifest)."),
    top: int = typer.Option(10, help="Rows shown here (the CSV has them all)."),
) -> None:
    """Leaderboard of a sweep with evaluation: a table here, leaderboard.csv and report.html."""
    from raymerge.report.report import build_report
    from raymerge.store import storage

    with _exit_on_error():
        location = output if storage.is_remote(output) else str(Path(output).resolve())
        result = build_report(location, out=out, metric=metric)
        _print_leaderboard(result, top)
        _print_search(result)
        _consoles.out.print(f"Leaderboard: {result.csv_uri}\nReport: {result.html_uri}")


def _print_leaderboard(result, top: int) -> None:
    from raymerge.report.report import primary_metrics

    objective = result.objective
    direction = "lower" if objective.direction == "minimize" else "higher"
    shown = primary_metrics(result.metrics)
    table = Table(title=f"Best merges by {objective.name} ({direction} is better)")
    for column in ("#", "adapters", "weights", "type", "objective", *shown):
        left = column in ("adapters", "type")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    for rank, row in enumerate(result.rows[:top], start=1):
        values = [_number(row[m]) for m in shown]
        table.add_row(
            str(rank), row["adapters"], row["weights"], row["combination_type"],
            _number(row["objective"]), *values,
        )  # fmt: skip
    if result.references:
        references = [("base model", result.references["base"])]
        references += [(f"{n} alone", s) for n, s in result.references["adapters"].items()]
        for label, scores in references:
            values = [_number(scores.get(m.rpartition(".")[0], {}).get(m.rpartition(".")[2]))
                      for m in shown]  # fmt: skip
            table.add_row(
                "ref", label, "", "", _number(objective.value(scores)), *values, style="dim"
            )
    _consoles.out.print(table)


def _print_search(result) -> None:
    search = result.search
    if not search:
        return
    best, grid = search["search_best"], search["grid_best"]
    line = f"Search: best {result.objective.name} {_number(best[-1])} after {len(best)} evaluations"
    if grid:
        line += f" (grid: {_number(grid[-1])} after {len(grid)})"
    _consoles.out.print(line)
    if search.get("importances"):
        ranked = sorted(search["importances"].items(), key=lambda kv: -kv[1])
        _consoles.out.print(
            "Parameters that mattered: " + ", ".join(f"{k} {v:.2f}" for k, v in ranked)
        )


def _number(value) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command()
def materialize(
    output: str = typer.Argument(..., help="A sweep's output (local path or s3://)."),
    merge_ids: list[str] = typer.Argument(..., help="Merge ids (16 hex digits) to rebuild."),
    to: str | None = typer.Option(
        None, help="Write them to DIR/<merge_id>/ (default: back into the sweep's own folders)."
    ),
    address: str | None = typer.Option(
        None, help="Rebuild on this Ray cluster (default: in this process)."
    ),
) -> None:
    """Rebuild recorded merges from their merge.json and check them against its digests."""
    from raymerge.cluster.materialize import materialize as rebuild
    from raymerge.store import storage

    with _exit_on_error():
        location = output if storage.is_remote(output) else str(Path(output).resolve())
        target = to if to is None or storage.is_remote(to) else str(Path(to).resolve())
        if address:
            import ray

            ray.init(address=address, log_to_driver=False)
            results = ray.get(
                ray.remote(rebuild).options(num_cpus=1).remote(location, merge_ids, target)
            )
        else:
            results = rebuild(location, merge_ids, target)
        mismatched = False
        for result in results:
            status = "matches its record" if result.matches_record else "DIFFERS from its record"
            mismatched |= not result.matches_record
            note = f" ({result.note})" if result.note else ""
            _consoles.out.print(f"{result.merge_id}: {result.path} — {status}{note}")
        if mismatched:
            raise typer.Exit(1)


@app.command("submit")
def submit_job(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML); it travels with the job."),
    address: str | None = typer.Option(
        None, help="Ray job API, e.g. http://HEAD:8265 (default: RAY_ADDRESS)."
    ),
    follow: bool = typer.Option(False, "--follow", help="Stream the job's logs until it ends."),
    ship_raymerge: bool = typer.Option(
        False, help="Ship this raymerge package with the job (when the image lacks it)."
    ),
) -> None:
    """Submit SPEC to a Ray cluster as a job (`raymerge run` on the cluster)."""
    from raymerge.cluster import submit as jobs

    with _exit_on_error():
        job_id = jobs.submit(spec, address, ship_raymerge=ship_raymerge)
        _consoles.out.print(f"Submitted job {job_id}")
        if not follow:
            _consoles.out.print(f"Follow it with: raymerge logs {job_id} --follow")
            return
        final = jobs.follow(job_id, address, lambda text: print(text, end="", flush=True))
        _consoles.out.print(f"Job {job_id} {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@app.command("status")
def job_status(
    job_id: str = typer.Argument(..., help="Job id printed by `raymerge submit`."),
    address: str | None = typer.Option(None, help="Ray job API (default: RAY_ADDRESS)."),
) -> None:
    """Print a submitted sweep's status; exits 1 if it failed or was stopped."""
    from raymerge.cluster import submit as jobs

    with _exit_on_error():
        info = jobs.status(job_id, address)
        _consoles.out.print(f"{info['job_id']}: {info['status']} {info['message']}".rstrip())
        if info["status"] in ("FAILED", "STOPPED"):
            raise typer.Exit(1)


@app.command("logs")
def job_logs(
    job_id: str = typer.Argument(..., help="Job id printed by `raymerge submit`."),
    address: str | None = typer.Option(None, help="Ray job API (default: RAY_ADDRESS)."),
    follow: bool = typer.Option(False, "--follow", help="Stream until the job ends."),
) -> None:
    """Print a submitted sweep's logs."""
    from raymerge.cluster import submit as jobs

    with _exit_on_error():
        if follow:
            final = jobs.follow(job_id, address, lambda text: print(text, end="", flush=True))
            if final != "SUCCEEDED":
                raise typer.Exit(1)
        else:
            print(jobs.logs(job_id, address), end="")


bench_app = typer.Typer(help="Benchmarks: figures measured in one run on this machine.")
app.add_typer(bench_app, name="bench")


@bench_app.command("plan")
def bench_plan(
    merges: str = typer.Option("1000000", help="Sweep size, or sizes (comma-separated)."),
    workers: int = typer.Option(8, help="Simulated workers pulling tasks."),
    cache: int = typer.Option(8, help="Adapters each simulated worker keeps loaded."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """Time and peak memory of the driver planning and dispatch-ordering a huge sweep."""
    from raymerge.bench.plan import bench_plans

    with _exit_on_error():
        sizes = _sizes(merges)
        figures = bench_plans(sizes, workers, cache)
        _print_rows("raymerge bench plan", figures, [str(n) for n in sizes])
        _write_json(json_out, figures if len(figures) > 1 else figures[0])


@bench_app.command("manifest")
def bench_manifest(
    out: Path = typer.Option(Path("raymerge-bench"), help="Folder for the simulated output."),
    lines: int = typer.Option(1_000_000, help="Merges of the simulated sweep."),
    flush_every: int = typer.Option(833, help="Lines between flushes (30 s at 28 merges/s)."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """Bytes the manifest uploads over a long sweep, and a rerun's resume memory."""
    from raymerge.bench.manifest import bench_manifest as measure

    with _exit_on_error():
        figures = measure((out / "manifest").resolve(), lines, flush_every)
        _print_rows("raymerge bench manifest", [figures], ["value"])
        _write_json(json_out, figures)


@bench_app.command("merge")
def bench_merge(
    out: Path = typer.Option(Path("raymerge-bench"), help="Folder for the world and outputs."),
    shape: str = typer.Option("default", help="default, or llama-8b (a real size, no weights)."),
    hidden_size: int = typer.Option(1024, help="Hidden size of the default world."),
    layers: int = typer.Option(4, help="Decoder layers of the default world."),
    rank: int = typer.Option(8, help="LoRA rank of the default world's adapters."),
    adapters: int = typer.Option(6, help="Adapters; each sweep merges every pair."),
    targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", help="Default world's targets."),
    types: str = typer.Option(
        "linear,cat,ties,dare_linear,magnitude_prune,svd", help="Combination types to time."
    ),
    threads: int = typer.Option(2, help="CPU threads for each way of merging."),
    steady_seconds: float = typer.Option(
        30.0, help="About how long the larger sweep's extra merges take (steady state)."
    ),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """A whole `raymerge run` per type against the plain PEFT loop and the I/O floor."""
    from raymerge.bench.merge import bench_merge as measure
    from raymerge.demo.world import SHAPES

    with _exit_on_error():
        if shape != "default" and shape not in SHAPES:
            raise _usage(f"--shape {shape!r}: use default or one of {', '.join(SHAPES)}")
        figures = measure(
            out.resolve(),
            shape=shape,
            hidden_size=hidden_size,
            layers=layers,
            rank=rank,
            adapters=adapters,
            targets=tuple(t for t in targets.split(",") if t),
            types=tuple(t for t in types.split(",") if t),
            threads=threads,
            steady_seconds=steady_seconds,
            log=_consoles.out.print,
        )
        rows = list(figures["types"].values())
        _print_rows("merges/s, whole raymerge run (steady state)", rows, list(figures["types"]))
        _consoles.out.print(f"driver peak RSS: {figures['driver_peak_rss_mb']} MB")
        _write_json(json_out, figures)


@bench_app.command("eval")
def bench_eval(
    out: Path = typer.Option(Path("raymerge-bench"), help="Folder for the world and outputs."),
    world: str = typer.Option("generated", help="generated, or demo (the demo's adapters)."),
    hidden_size: int = typer.Option(64, help="Hidden size of the generated model."),
    layers: int = typer.Option(2, help="Decoder layers of the generated model."),
    adapters: int = typer.Option(4, help="Generated adapters; every pair is merged."),
    weightings: int = typer.Option(8, help="Weightings of each pair."),
    samples: int = typer.Option(64, help="Examples per eval set (three text sets)."),
    threads: int = typer.Option(2, help="CPU threads."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """Scored merges/s with 1, 4 and 16 merges per forward pass, merge-only, and a plain loop."""
    from raymerge.bench.eval import bench_eval as measure

    with _exit_on_error():
        if world not in ("generated", "demo"):
            raise _usage(f"--world {world!r}: use generated or demo")
        figures = measure(
            (out / f"eval-{world}").resolve(),
            world=world,
            hidden_size=hidden_size,
            layers=layers,
            adapters=adapters,
            weightings=weightings,
            samples=samples,
            threads=threads,
            log=_consoles.out.print,
        )
        ways = ["plain_loop", "merge_only", "per_pass_1", "per_pass_4", "per_pass_16"]
        _print_rows("raymerge bench eval", [figures[w] for w in ways], ways)
        _consoles.out.print(
            f"{figures['merges']} merges; 16 per pass / 1 per pass: "
            f"{figures['per_pass_16_over_1']}x merges/s, eval seconds per merge "
            f"{figures['eval_per_merge_1_over_16']}x lower"
        )
        _write_json(json_out, figures)


@bench_app.command("search")
def bench_search(
    out: Path = typer.Option(Path("raymerge-bench"), help="Folder for the demo world and runs."),
    seeds: int = typer.Option(3, help="Seeds per sampler."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """The demo's grid against random search, TPE and CMA-ES at budgets of 10, 20 and 30."""
    from raymerge.bench.search import bench_search as measure

    with _exit_on_error():
        figures = measure((out / "search").resolve(), seeds=seeds, log=_consoles.out.print)
        budgets = figures["budgets"]
        table = Table(title=f"Best {figures['objective']} reached (median over {seeds} seeds)")
        table.add_column("way")
        for budget in budgets:
            table.add_column(f"{budget} evaluations", justify="right")
        grid = figures["grid"]
        table.add_row(f"grid ({grid['evaluations']} evaluations)", *([f"{grid['best']:.4f}"]
                      + [""] * (len(budgets) - 1)))  # fmt: skip
        for sampler in ("random", "tpe", "cmaes"):
            if sampler in figures:
                table.add_row(sampler, *(f"{v:.4f}" for v in figures[sampler]["median_best"]))
        _consoles.out.print(table)
        target = figures["target"]
        _consoles.out.print(
            f"At {target['budget']} evaluations (half the grid's or fewer), reaching the grid's "
            f"best ({target['grid_best']:.4f}): {', '.join(target['met_by']) or 'none'}"
        )
        _write_json(json_out, figures)


@bench_app.command("methods")
def bench_methods(
    hidden_sizes: str = typer.Option("1024,4096", help="Hidden sizes (comma-separated)."),
    types: str = typer.Option(
        "core_ta,core_ties,core_dare,knots_ties,knots_dare,tsv,iso_c", help="Types to time."
    ),
    rank: int = typer.Option(16, help="LoRA rank of the two inputs."),
    threads: int = typer.Option(2, help="CPU threads."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """The low-rank methods against svd and their dense definitions, as the size grows."""
    from raymerge.bench.methods import bench_methods as measure

    with _exit_on_error():
        figures = measure(
            _sizes(hidden_sizes, "--hidden-sizes"),
            tuple(t for t in types.split(",") if t),
            rank,
            threads,
            log=_consoles.out.print,
        )
        names = list(figures["types"])
        _print_rows("seconds per module merge", [figures["types"][n] for n in names], names)
        _write_json(json_out, figures)


@bench_app.command("cluster")
def bench_cluster(
    out: Path = typer.Option(Path("raymerge-bench"), help="Folder for the world and outputs."),
    merges: int = typer.Option(100_000, help="Merges of the sweep."),
    nodes: int = typer.Option(4, help="Simulated nodes."),
    gpus_per_node: int = typer.Option(2, help="Logical GPUs per node (one worker each)."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """A large sweep on a simulated multi-node cluster: utilisation and the driver's cost."""
    from raymerge.bench.cluster import bench_cluster as measure

    with _exit_on_error():
        figures = measure(
            (out / "cluster").resolve(),
            merges=merges,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            log=_consoles.out.print,
        )
        _print_rows("raymerge bench cluster", [figures], ["value"])
        _write_json(json_out, figures)


def _sizes(text: str, option: str = "--merges") -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise _usage(f"{option} {text!r}: give a number, or numbers separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise _usage(f"{option} {text!r}: sizes must be at least 1")
    return sizes


def _usage(message: str):
    from raymerge.errors import SpecError

    return SpecError(message)


def _print_rows(title: str, rows: list[dict[str, Any]], names: list[str]) -> None:
    """Figures as a table: one column per row given, one line per figure."""
    table = Table(title=title)
    table.add_column("figure")
    for name in names:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        values = [row.get(key, "") for row in rows]
        if any(isinstance(v, dict) for v in values):
            values = [json.dumps(v) if isinstance(v, dict) else v for v in values]
        table.add_row(key.replace("_", " "), *(str(v) for v in values))
    _consoles.out.print(table)


def _write_json(path: Path | None, figures: Any) -> None:
    if path is not None:
        path.write_text(json.dumps(figures, indent=2))


def _run_and_report(
    the_plan, address: str | None, fail_fast: bool = False, rebuild_changed: bool = False
) -> None:
    from raymerge.cluster.driver import run_sweep

    with _ProgressBar() as bar:
        summary = run_sweep(
            the_plan,
            address=address,
            progress=bar,
            fail_fast=fail_fast,
            rebuild_changed=rebuild_changed,
        )
    _print_summary(summary.to_json())
    if summary.not_run:
        _consoles.err.print(f"Stopped at the first failure: {summary.not_run} merges not run.")
    if summary.failed or summary.not_run:
        raise typer.Exit(1)


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        return Text(f"{task.speed or 0:.1f} merges/s", style="cyan")


class _ProgressBar:
    """Done/total, rate, ETA and each worker's rate while the sweep runs; on a terminal a live
    bar, elsewhere (job logs) a line every LOG_EVERY_S seconds."""

    LOG_EVERY_S = 15.0

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]merging"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[workers]}"),
            console=_consoles.out,
            disable=not _consoles.out.is_terminal,
        )
        self._task = None
        self._total = 0
        self._done = 0
        self._per_worker: dict[int, int] = {}
        self._started = self._last_log = time.monotonic()

    def __enter__(self):
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def start(self, total: int, skipped: int) -> None:
        if skipped:
            _consoles.out.print(f"Skipping {skipped} merges already done in the output.")
        self._total = total
        self._started = self._last_log = time.monotonic()
        self._task = self._progress.add_task("merge", total=total, workers="")

    def advance(self, result) -> None:
        self._done += 1
        if result.worker is not None:
            self._per_worker[result.worker] = self._per_worker.get(result.worker, 0) + 1
        self._progress.update(self._task, advance=1, workers=self._worker_rates())
        if not result.done:
            _consoles.out.print(Text(f"merge {result.merge_id} failed: {result.error}", "red"))
        now = time.monotonic()
        if not _consoles.out.is_terminal and now - self._last_log >= self.LOG_EVERY_S:
            self._last_log = now
            rate = self._done / (now - self._started)
            _consoles.out.print(
                f"merged {self._done}/{self._total} ({rate:.1f}/s) {self._worker_rates()}"
            )

    def _worker_rates(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        rates = [f"w{w} {n / elapsed:.1f}/s" for w, n in sorted(self._per_worker.items())]
        return " · ".join(rates[:8]) + (" …" if len(rates) > 8 else "")


def _print_plan(summary: dict[str, Any]) -> None:
    _consoles.out.print(f"Plan: {summary['total']} merges → {summary['output']}")
    table = Table()
    table.add_column("combination type")
    table.add_column("merges", justify="right")
    for name, count in summary["by_type"].items():
        table.add_row(name, str(count))
    _consoles.out.print(table)
    adapters = Table(title="Adapters")
    for column in ("name", "r", "lora_alpha"):
        adapters.add_column(column)
    adapters.add_column("location", overflow="fold")
    for name, info in summary["adapters"].items():
        adapters.add_row(name, str(info["r"]), str(info["lora_alpha"]), info["uri"])
    _consoles.out.print(adapters)


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
    _consoles.out.print(table)
    for failure in summary["failures"][:10]:
        _consoles.err.print(Text(f"failed {failure['merge_id']}: {failure['error']}", "red"))


class _exit_on_error:
    """Map raymerge's errors to a message on stderr and the error's exit code."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, RaymergeError):
            _consoles.err.print(Text(f"error: {exc}", style="red"))
            raise typer.Exit(exc.exit_code)
        if exc is not None and not isinstance(exc, typer.Exit):
            from raymerge.store import storage

            if isinstance(exc, storage.errors()):  # the store or disk, not a bug: one line
                _consoles.err.print(Text(f"error: storage: {storage.describe(exc)}", "red"))
                raise typer.Exit(1)
        return False


if __name__ == "__main__":
    app()
