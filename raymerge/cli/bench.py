"""`raymerge bench`: each command measures in one run (raymerge.bench) and prints the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from raymerge.cli import render
from raymerge.cli.console import consoles
from raymerge.cli.errors import exit_on_error, usage

bench_app = typer.Typer(help="Benchmarks: figures measured in one run on this machine.")


def parse_sizes(text: str, option: str = "--merges") -> list[int]:
    """Sizes given as one number or several separated by commas; `_` may group digits.

    >>> parse_sizes("1_000,4096")
    [1000, 4096]
    """
    try:
        sizes = [int(part.replace("_", "")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise usage(f"{option} {text!r}: give a number, or numbers separated by commas") from None
    if not sizes or min(sizes) < 1:
        raise usage(f"{option} {text!r}: sizes must be at least 1")
    return sizes


def _names(text: str) -> tuple[str, ...]:
    """Comma-separated names, empty ones dropped."""
    return tuple(name for name in text.split(",") if name)


def _write_json(path: Path | None, figures: Any) -> None:
    if path is not None:
        path.write_text(json.dumps(figures, indent=2))


@bench_app.command("plan")
def bench_plan(
    merges: str = typer.Option("1000000", help="Sweep size, or sizes (comma-separated)."),
    workers: int = typer.Option(8, help="Simulated workers pulling tasks."),
    cache: int = typer.Option(8, help="Adapters each simulated worker keeps loaded."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """Time and peak memory of the driver planning and dispatch-ordering a huge sweep."""
    from raymerge.bench.plan import bench_plans

    with exit_on_error():
        sizes = parse_sizes(merges)
        figures = bench_plans(sizes, workers, cache)
        render.print_rows("raymerge bench plan", figures, [str(n) for n in sizes])
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

    with exit_on_error():
        figures = measure((out / "manifest").resolve(), lines, flush_every)
        render.print_rows("raymerge bench manifest", [figures], ["value"])
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

    with exit_on_error():
        if shape != "default" and shape not in SHAPES:
            raise usage(f"--shape {shape!r}: use default or one of {', '.join(SHAPES)}")
        figures = measure(
            out.resolve(),
            shape=shape,
            hidden_size=hidden_size,
            layers=layers,
            rank=rank,
            adapters=adapters,
            targets=_names(targets),
            types=_names(types),
            threads=threads,
            steady_seconds=steady_seconds,
            log=consoles.out.print,
        )
        render.print_merge_figures(figures)
        _write_json(json_out, figures)


@bench_app.command("eval")
def bench_eval(
    out: Path = typer.Option(Path("raymerge-bench"), help="Folder for the world and outputs."),
    world: str = typer.Option(
        "generated",
        help="generated, demo (the tiny demo's adapters), or real (SmolLM2-135M, merges of the "
        "real demo's adapters, scored by raymerge and by lm-evaluation-harness).",
    ),
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

    with exit_on_error():
        if world not in ("generated", "demo", "real"):
            raise usage(f"--world {world!r}: use generated, demo or real")
        if world == "real":
            from raymerge.bench.harness_race import bench_eval_real

            figures = bench_eval_real(
                (out / "eval-real").resolve(), threads=threads, log=consoles.out.print
            )
            render.print_harness_race(figures)
            _write_json(json_out, figures)
            return
        figures = measure(
            (out / f"eval-{world}").resolve(),
            world=world,
            hidden_size=hidden_size,
            layers=layers,
            adapters=adapters,
            weightings=weightings,
            samples=samples,
            threads=threads,
            log=consoles.out.print,
        )
        render.print_eval_figures(figures)
        _write_json(json_out, figures)


@bench_app.command("search")
def bench_search(
    out: Path = typer.Option(Path("raymerge-bench"), help="Folder for the demo world and runs."),
    seeds: int = typer.Option(3, help="Seeds per sampler."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """The demo's grid against random search, TPE and CMA-ES at budgets of 13, 20 and 30."""
    from raymerge.bench.search import bench_search as measure

    with exit_on_error():
        figures = measure((out / "search").resolve(), seeds=seeds, log=consoles.out.print)
        render.print_search_race(figures, seeds)
        _write_json(json_out, figures)


@bench_app.command("methods")
def bench_methods(
    hidden_sizes: str = typer.Option("1024,4096", help="Hidden sizes (comma-separated)."),
    types: str = typer.Option(
        "core_ta,core_ties,core_dare,knots_ties,knots_dare_ties,knots_dare_linear,tsv,iso_c",
        help="Types to time.",
    ),
    rank: int = typer.Option(16, help="LoRA rank of the two inputs."),
    threads: int = typer.Option(2, help="CPU threads."),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """The low-rank methods against svd and their dense definitions, as the size grows."""
    from raymerge.bench.methods import bench_methods as measure

    with exit_on_error():
        sizes = parse_sizes(hidden_sizes, "--hidden-sizes")
        figures = measure(sizes, _names(types), rank, threads, log=consoles.out.print)
        names = list(figures["types"])
        render.print_rows("seconds per module merge", [figures["types"][n] for n in names], names)
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

    with exit_on_error():
        figures = measure(
            (out / "cluster").resolve(),
            merges=merges,
            nodes=nodes,
            gpus_per_node=gpus_per_node,
            log=consoles.out.print,
        )
        render.print_rows("raymerge bench cluster", [figures], ["value"])
        _write_json(json_out, figures)


@bench_app.command("racing")
def bench_racing(
    root: Path | None = typer.Option(None, help="Scratch folder (default: a temporary one)."),
    seeds: int = typer.Option(10, help="Seeds of the example order: one race each."),
    workers: int = typer.Option(1, help="Workers (1: in this process, without Ray)."),
    rules: str = typer.Option("bound", help="Racing rules to run (bound, halving)."),
    first: int | None = typer.Option(None, help="evaluate.racing.first (default: its own)."),
    growth: float | None = typer.Option(None, help="evaluate.racing.growth."),
    confidence: float | None = typer.Option(None, help="evaluate.racing.confidence."),
    search: bool = typer.Option(True, help="Also search the grid's world at a budget of 13."),
    world: str = typer.Option(
        "tiny", help="tiny (the 64-wide world's 216 merges) or real (SmolLM2-135M, 48 merges)."
    ),
    examples: int | None = typer.Option(
        None, help="Examples per eval set (default: 256 tiny, 64 real)."
    ),
    json_out: Path | None = typer.Option(None, "--json-out", help="Also write the figures here."),
) -> None:
    """Racing a grid against scoring it fully (the top-1 found, the scorings used), then TPE
    with pruning at a budget of 13 on the same world."""
    import tempfile

    from raymerge.bench.racing import bench_racing as measure
    from raymerge.bench.racing_world import EXAMPLES, World

    with exit_on_error():
        if world not in ("tiny", "real"):
            raise usage(f"--world {world!r}: use tiny or real")
        default = EXAMPLES if world == "tiny" else 64
        the_world = World(model=world, examples=examples or default)
        names = _names(rules)
        if not names or set(names) - {"bound", "halving"}:
            raise usage(f"--rules {rules!r}: use bound, halving, or both")
        if seeds < 1:
            raise usage("--seeds: at least 1")
        given = {"first": first, "growth": growth, "confidence": confidence}
        racing = {k: v for k, v in given.items() if v is not None}
        with tempfile.TemporaryDirectory(prefix="raymerge-bench-racing-") as scratch:
            figures = measure(
                (root or Path(scratch)).resolve(),
                seeds=seeds,
                workers=workers,
                rules=names,
                racing=racing,
                world=the_world,
                search=search,
                log=consoles.out.print,
            )
        render.print_racing(figures)
        _write_json(json_out, figures)
