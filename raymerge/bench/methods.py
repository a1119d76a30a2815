"""`raymerge bench methods`: the merging methods PEFT lacks, merged in the adapters' low-rank space
(the merge core on the fast engine: `raymerge.merge.engines.lowrank`), against `svd` and against
their dense definitions (`raymerge.merge.engines.reference`: every delta formed, full SVDs), for one
square module of each hidden size: seconds per module merge. The low-rank path should grow about
linearly in the hidden size, the dense one about cubically.
"""

from __future__ import annotations

import time
from typing import Any

DEFAULT_TYPES = (
    "core_ta",
    "core_ties",
    "core_dare",
    "knots_ties",
    "knots_dare_ties",
    "knots_dare_linear",
    "tsv",
    "iso_c",
)


def bench_methods(
    hidden_sizes=(1024, 4096), types=DEFAULT_TYPES, rank: int = 16, threads: int = 2, log=print
) -> dict[str, Any]:
    import torch
    from peft import LoraConfig

    from raymerge.merge.core import AdapterTensors, merge
    from raymerge.merge.engines.fast import FastEngine
    from raymerge.merge.engines.reference import dense_reference
    from raymerge.merge.registry import METHODS
    from raymerge.task import MergeTask

    torch.set_num_threads(threads)
    figures: dict[str, Any] = {"rank": rank, "threads": threads, "types": {}}
    for d in hidden_sizes:
        generator = torch.Generator().manual_seed(d)
        adapters = []
        for i in range(2):
            config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["m"])
            factors = {"m": (torch.randn(rank, d, generator=generator) / d**0.5,
                             torch.randn(d, rank, generator=generator))}  # fmt: skip
            adapters.append(AdapterTensors(f"in{i}", config, factors))
        for name in ("svd", *types):
            method = METHODS[name]
            params = {**method.defaults(), "svd_rank": rank}
            if "density" in method.required():
                params["density"] = 0.5
            log(f"hidden {d}: {name}")
            recipe = MergeTask("0" * 16, ("in0", "in1"), (0.6, 0.4), name, params, 0, 0, "float32")
            engine = FastEngine(["m"])
            repeats = 5
            started = time.perf_counter()
            for _ in range(repeats):
                merge(recipe, adapters, engine)
            lowrank = (time.perf_counter() - started) / repeats
            row = figures["types"].setdefault(name, {})
            row[f"lowrank_s_{d}"] = round(lowrank, 5)
            if name == "svd":
                continue
            factors = [(a.factors["m"][1], a.factors["m"][0], w * a.scaling("m"))
                       for a, w in zip(adapters, [0.6, 0.4], strict=True)]  # fmt: skip
            started = time.perf_counter()
            delta = dense_reference(name, factors, params, rank)
            torch.linalg.svd(delta, full_matrices=False)  # the truncation to svd_rank
            row[f"dense_s_{d}"] = round(time.perf_counter() - started, 4)
            row[f"dense_over_lowrank_{d}"] = round(row[f"dense_s_{d}"] / lowrank, 1)
    if len(hidden_sizes) == 2:
        small, large = hidden_sizes
        for row in figures["types"].values():
            row["lowrank_growth"] = round(row[f"lowrank_s_{large}"] / row[f"lowrank_s_{small}"], 1)
            if f"dense_s_{large}" in row:
                row["dense_growth"] = round(row[f"dense_s_{large}"] / row[f"dense_s_{small}"], 1)
    return figures
