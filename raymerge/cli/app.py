"""The `raymerge` command: parse, call one function, print, exit (0 ok, 1 failures, 2 bad input).

The sweep commands are here; `raymerge bench` is in bench.py, what they print in render.py,
the progress bar in progress.py, the error-to-exit-code mapping in errors.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer

from raymerge.cli import render
from raymerge.cli.bench import bench_app
from raymerge.cli.console import consoles
from raymerge.cli.errors import exit_on_error
from raymerge.cli.runs import location, run_and_report, run_demo, run_real_demo
from raymerge.quiet import hidden_warnings, quiet_libraries

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Merge LoRA adapters at scale: a sweep spec in, merged adapters out, on Ray.",
)


@app.callback()
def _quiet(ctx: typer.Context) -> None:
    """Library progress bars and warnings kept out of the output (before any library loads)."""
    quiet_libraries()
    ctx.call_on_close(_say_hidden_warnings)


def _say_hidden_warnings() -> None:
    if line := hidden_warnings():
        consoles.err.print(line, style="dim", highlight=False)


@app.command()
def plan(
    spec: Path = typer.Argument(..., help="Sweep spec (YAML)."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan, tasks included, as JSON."),
) -> None:
    """Expand SPEC into merge tasks and check every input; writes nothing."""
    from raymerge.sweep.plan import load_plan

    with exit_on_error():
        the_plan = load_plan(spec)
        if as_json:
            tasks = [task.to_json() for task in the_plan.tasks()]
            print(json.dumps({**the_plan.summary(), "tasks": tasks}, indent=2))
            return
        render.print_plan(the_plan.summary())


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
    use_ray: bool = typer.Option(
        False,
        "--ray",
        help="Start Ray even for one local CPU worker (which otherwise runs in this process).",
    ),
) -> None:
    """Run every merge of SPEC on Ray (one local CPU worker: in this process); merges already
    done in the output are skipped."""
    from raymerge.sweep.plan import load_plan

    with exit_on_error():
        overrides = {
            "output": output,
            "workers": workers,
            "gpus_per_worker": gpus_per_worker,
            "engine": engine,
        }
        the_plan = load_plan(spec, overrides)
        run_and_report(the_plan, address, fail_fast, rebuild_changed, True if use_ray else None)


@app.command()
def demo(
    out: Path = typer.Option(Path("raymerge-demo"), help="Folder for the demo world and merges."),
    tiny: bool = typer.Option(
        False, help="The 64-wide random world instead of the real model (a minute; for tests)."
    ),
    workers: int = typer.Option(min(2, os.cpu_count() or 1), help="Merge workers (--tiny)."),
    address: str | None = typer.Option(None, help="Ray cluster to join (default: local)."),
) -> None:
    """Merge adapters with real skills on a real model (SmolLM2-135M-Instruct, offline), score
    and rank every merge, search the same space, and say what the best merge keeps."""
    from raymerge.cluster.session import ray_session
    from raymerge.sweep.plan import load_plan

    with exit_on_error():
        if tiny:
            from raymerge.demo.demo import prepare_demo

            consoles.out.print(f"Building a tiny Llama-architecture world in {out}/world …")
            spec = prepare_demo(out, workers, log=consoles.out.print)
            the_plan = load_plan(spec)
            render.print_plan(the_plan.summary())
            with ray_session(address):  # one Ray instance for the grid and the search
                run_demo(the_plan, spec, address)
            return
        from raymerge.demo.real_demo import prepare_real_demo

        consoles.out.print(f"Laying out the real-model demo in {out} …")
        spec = prepare_real_demo(out, log=consoles.out.print)
        the_plan = load_plan(spec)
        render.print_plan(the_plan.summary())
        run_real_demo(the_plan, spec, address)


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

    with exit_on_error():
        result = build_report(location(output), out=out, metric=metric)
        render.print_leaderboard(result, top)
        if result.references and result.rows:
            consoles.out.print(render.verdict(result))
        render.print_search(result)
        render.print_outputs(result)


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
    from raymerge.cluster.materialize import materialize_on

    with exit_on_error():
        target = None if to is None else location(to)
        results = materialize_on(address, location(output), merge_ids, target)
        render.print_rebuilt(results)
        if not all(result.matches_record for result in results):
            raise typer.Exit(1)


@app.command()
def export(
    output: str = typer.Argument(..., help="A sweep's output (local path or s3://)."),
    merge_id: str = typer.Argument(..., help="The merge id (16 hex digits) to export."),
    to: str = typer.Option(..., metavar="DIR", help="Local folder to write the full model to."),
    dtype: str = typer.Option(
        "auto",
        help="Dtype of the saved weights: auto (the base model's own), float32, bfloat16 or "
        "float16. The adapter is folded in float32 either way.",
    ),
    max_shard_size: str = typer.Option(
        "5GB", help="Largest safetensors file, e.g. 5GB, 500MB or 2GiB (more: several shards)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace DIR if it is a non-empty folder."
    ),
) -> None:
    """Write a recorded merge as a full model: the base model with the merged adapter folded in
    (PEFT's merge_and_unload), as sharded safetensors with the tokenizer, for from_pretrained.
    A merge whose files keep top-k dropped is rebuilt first (as `materialize` does)."""
    from raymerge.cluster.export import export as export_model

    with exit_on_error():
        result = export_model(
            location(output),
            merge_id,
            location(to),
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
        )
        rebuilt = ", rebuilt from its merge.json" if result.rebuilt else ""
        tokenizer = " and its tokenizer" if result.tokenizer else ""
        consoles.out.print(
            f"{result.merge_id}: {result.path} — the full model in {result.dtype}, "
            f"{result.shards} shard{'s' if result.shards != 1 else ''}{tokenizer}{rebuilt}"
        )
        for note in result.notes:
            consoles.err.print(f"note: {note}", style="yellow", highlight=False)
        consoles.out.print(f"Load it with {result.model_class}.from_pretrained({result.path!r})")


def _echo(text: str) -> None:
    """A job's log text as it arrives: already has its newlines, shown at once."""
    print(text, end="", flush=True)


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

    with exit_on_error():
        job_id = jobs.submit(spec, address, ship_raymerge=ship_raymerge)
        consoles.out.print(f"Submitted job {job_id}")
        if not follow:
            consoles.out.print(f"Follow it with: raymerge logs {job_id} --follow")
            return
        final = jobs.follow(job_id, address, _echo)
        consoles.out.print(f"Job {job_id} {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@app.command("status")
def job_status(
    job_id: str = typer.Argument(..., help="Job id printed by `raymerge submit`."),
    address: str | None = typer.Option(None, help="Ray job API (default: RAY_ADDRESS)."),
) -> None:
    """Print a submitted sweep's status; exits 1 if it failed or was stopped."""
    from raymerge.cluster import submit as jobs

    with exit_on_error():
        info = jobs.status(job_id, address)
        consoles.out.print(f"{info['job_id']}: {info['status']} {info['message']}".rstrip())
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

    with exit_on_error():
        if follow:
            final = jobs.follow(job_id, address, _echo)
            if final != "SUCCEEDED":
                raise typer.Exit(1)
        else:
            print(jobs.logs(job_id, address), end="")


# Added last so that `bench` stays the last entry of `raymerge --help`.
app.add_typer(bench_app, name="bench")


if __name__ == "__main__":
    app()
