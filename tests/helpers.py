"""Shared test helpers: specs on disk, reference merges through PEFT, tensor comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml
from peft import PeftModel, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from raymerge.demo.world import World
from raymerge.merge.registry import METHODS, Form, RankRule

PEFT_TYPES = [m.name for m in METHODS.values() if m.peft]
"""PEFT's combination types, from the registry: a new entry is covered by every test using it."""
EQUAL_RANK_TYPES = [name for name in PEFT_TYPES if METHODS[name].rank is RankRule.EQUAL]
RANK_CHANGING_TYPES = [name for name in PEFT_TYPES if METHODS[name].rank is not RankRule.EQUAL]
PRUNED_SVD_TYPES = [
    name
    for name in PEFT_TYPES
    if METHODS[name].form is Form.DELTA_SVD and "density" in METHODS[name].required()
]


def methods_for(types: list[str], **params: Any) -> list[dict[str, Any]]:
    """One `methods` entry per type, each with the given parameters it takes."""
    return [
        {"combination_type": name, **{k: v for k, v in params.items() if METHODS[name].takes(k)}}
        for name in types
    ]


EQUAL_RANK_GROUP = {
    "adapters": ["a", "b", "c"],
    "weights": [[0.6, -0.3, 0.5]],
    "methods": methods_for(EQUAL_RANK_TYPES, density=0.6, majority_sign_method="frequency"),
}
"""The equal-rank types over three adapters with different lora_alpha and a negative weight."""


def wait_for_http(url: str, process, timeout: float, what: str, accept_http_errors=False) -> None:
    """Poll `url` until the server answers; fail if `process` exits or time runs out. With
    `accept_http_errors`, an HTTP error (a 401 asking for a token) also means it is up."""
    import time
    import urllib.error
    import urllib.request

    import pytest

    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:
            if accept_http_errors:
                return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{what} did not start")
        time.sleep(0.3)


def wait_for_commits(count_commits, count: int, running, timeout: float = 120) -> None:
    """Until `count_commits()` reaches `count` while the sweep runs (`running()`: it must not end
    first, nor stall)."""
    import time

    deadline = time.monotonic() + timeout
    while count_commits() < count:
        assert running(), "the sweep ended before it could be disturbed"
        assert time.monotonic() < deadline, "the sweep made no progress"
        time.sleep(0.1)


class SweepThread:
    """run_sweep in a background thread of this process (on the session's Ray instance), so that
    a test can disturb the store while it runs."""

    def __init__(self, plan):
        import threading

        from raymerge.cluster.driver import run_sweep

        self.summary = self.error = None

        def target():
            try:
                self.summary = run_sweep(plan)
            except Exception as exc:  # the test inspects it
                self.error = exc

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the sweep still runs after {timeout:.0f} s"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_spec(folder: Path, spec: dict[str, Any], name: str = "sweep.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def base_spec(world: World, output: str | Path, **overrides: Any) -> dict[str, Any]:
    """A valid spec over the world's adapters; `overrides` replace top-level keys."""
    spec = {
        "base_model": str(world.base_model),
        "adapters": {name: str(path) for name, path in world.adapters.items()},
        "combinations": [
            {
                "adapters": ["a", "b"],
                "weights": [[0.5, 0.5]],
                "methods": [{"combination_type": "linear"}],
            }
        ],
        "output": str(output),
        "workers": 1,  # each worker is a process importing torch and PEFT: 2 where a test needs it
        # None: a CPU test never takes a real GPU on a CUDA host (and its DARE and svd_driver
        # expectations are the CPU's); tests of GPU scheduling ask for logical ones explicitly.
        "gpus_per_worker": 0,
        "seed": 0,
    }
    spec.update(overrides)
    return spec


def demo_merge_spec(
    demo_dir: Path,
    output,
    weights: list[list[float]],
    evaluate: dict[str, Any],
    adapters: tuple[str, str] = ("upper", "sums"),
    **extra: Any,
) -> dict[str, Any]:
    """Linear merges of two of the demo world's adapters at `weights`, scored as `evaluate`
    says, on one CPU worker; `extra` adds or replaces top-level keys."""
    folder = demo_dir / "world" / "adapters"
    spec = {
        "base_model": str(demo_dir / "world" / "base"),
        "adapters": {name: str(folder / name) for name in adapters},
        "combinations": [
            {
                "adapters": list(adapters),
                "weights": weights,
                "methods": [{"combination_type": "linear"}],
            }
        ],
        "output": str(output),
        "workers": 1,
        "gpus_per_worker": 0,
        "seed": 0,
        "evaluate": evaluate,
    }
    spec.update(extra)
    return spec


def many_merges_plan(world: World, output, options, folder: Path, weightings: int, **overrides):
    """A plan of `weightings` cat merges of a and b (cheap ones) writing to `output`."""
    from raymerge.sweep.plan import load_plan

    spec = base_spec(
        world,
        output,
        storage_options=options,
        combinations=[
            {
                "adapters": ["a", "b"],
                "weights": [[0.5, round(0.1 * i, 2)] for i in range(1, weightings + 1)],
                "methods": [{"combination_type": "cat"}],
            }
        ],
        **overrides,
    )
    return load_plan(write_spec(folder, spec))


def reference_merge(
    base_model: Path,
    adapter_dirs: list[Path],
    weights: list[float],
    combination_type: str,
    params: dict[str, Any],
    seed: int,
) -> dict[str, torch.Tensor]:
    """What calling add_weighted_adapter directly on a PeftModel gives (the user's own loop).

    Computed on one thread, as each test worker merges, so that float32 SVDs agree bit for bit
    rather than to LAPACK's thread-dependent rounding.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _reference_merge(base_model, adapter_dirs, weights, combination_type, params, seed)
    finally:
        torch.set_num_threads(threads)


def _reference_merge(base_model, adapter_dirs, weights, combination_type, params, seed):
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_model), adapter_dirs[0], adapter_name="in0"
    )
    for i, path in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(path, adapter_name=f"in{i}")
    torch.manual_seed(seed)
    model.add_weighted_adapter(
        [f"in{i}" for i in range(len(adapter_dirs))],
        weights,
        "merged",
        combination_type=combination_type,
        **params,
    )
    return get_peft_model_state_dict(model, adapter_name="merged")


def reload_merged(base_model: Path, merged_dir: Path) -> PeftModel:
    """A written merge, loaded the way a user would: PeftModel.from_pretrained on a fresh base."""
    base = AutoModelForCausalLM.from_pretrained(base_model)
    return PeftModel.from_pretrained(base, merged_dir, adapter_name="merged")


def assert_tensors_match(
    actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rel: float
) -> None:
    """Same tensor names and shapes, and per-tensor relative error ||a - e|| / ||e|| <= rel."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, name
        err = (got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)
        assert err <= rel, f"{name}: relative error {err:.3e} > {rel}"


def lora_deltas(model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    """Each LoRA module's delta weight (scaling included), as PEFT applies it."""
    from peft.tuners.lora import LoraLayer

    return {
        key: module.get_delta_weight(adapter).float()
        for key, module in model.named_modules()
        if isinstance(module, LoraLayer)
        and (adapter in module.lora_A or adapter in module.lora_embedding_A)
    }


def weighted_sum(inputs: list[dict[str, torch.Tensor]], weights: list[float], key: str):
    """sum_i w_i * delta_i for one module (adapters that do not target it contribute nothing)."""
    return sum(w * deltas[key] for w, deltas in zip(weights, inputs, strict=True) if key in deltas)


def best_rank_k(matrix: torch.Tensor, k: int) -> torch.Tensor:
    """The best rank-k approximation (Eckart-Young), in float64."""
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return ((u[:, :k] * s[:k]) @ vh[:k]).float()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def cast_adapter_file(src: Path, dst: Path, dtype: torch.dtype) -> Path:
    """A copy of an adapter folder with its weights stored in `dtype`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(src / "adapter_model.safetensors")
    save_file(
        {k: v.to(dtype) for k, v in tensors.items()},
        dst / "adapter_model.safetensors",
        metadata={"format": "pt"},
    )
    return dst


def is_low_rank_svd(record: dict) -> bool:
    """Merges whose factors the fast engine computes by low-rank SVD: equal to PEFT's dense SVD
    up to each singular vector's sign, so they are compared through their deltas."""
    return (
        record["engine"] == "fast"
        and record["combination_type"] == "svd"
        and record["params"].get("svd_clamp") is None
        and record["params"].get("svd_driver") is None
    )


def compare_merge(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    record: dict,
    *,
    rel: float,
    svd_delta_rel: float,
) -> None:
    """Tensor by tensor within `rel`; for low-rank svd merges, module by module on B @ A within
    `svd_delta_rel` (their factors may differ by the sign of each singular vector)."""
    if not is_low_rank_svd(record):
        assert_tensors_match(actual, expected, rel)
        return
    assert sorted(actual) == sorted(expected)
    for key in expected:
        if "lora_A" in key:
            b_key = key.replace("lora_A", "lora_B")
            want = expected[b_key].double() @ expected[key].double()
            got = actual[b_key].double() @ actual[key].double()
            assert relative_error(got, want) <= svd_delta_rel, key


def assert_matches_peft(
    base_model: Path,
    adapter_dirs: list[Path],
    record: dict,
    merged_dir: Path,
    *,
    rel: float,
    svd_delta_rel: float,
) -> None:
    """What raymerge wrote (reloaded with PeftModel.from_pretrained, as a user would) against
    add_weighted_adapter on a PeftModel holding the same inputs (the user's own loop)."""
    expected = reference_merge(
        base_model,
        adapter_dirs,
        record["weights"],
        record["combination_type"],
        record["params"],
        seed=record["merge_seed"],
    )
    actual = get_peft_model_state_dict(reload_merged(base_model, merged_dir), adapter_name="merged")
    compare_merge(actual, expected, record, rel=rel, svd_delta_rel=svd_delta_rel)


DENSE_PARAMS = {"density": 0.4, "alpha": 0.7, "k": 0.75, "svd_rank": 6}
"""Each new method's parameters in `check_dense`, where it takes them."""


def check_dense(name: str, adapters, weights, modules, rel: float = 1e-5, **given) -> torch.Tensor:
    """Merge with the fast engine, check each module against the method's dense reference;
    returns the merged delta of the first module (for comparisons between variants)."""
    from raymerge.merge.engines.fast import merge_tensors
    from raymerge.merge.engines.reference import dense_reference
    from raymerge.merge.format import PREFIX

    method = METHODS[name]
    params = {**method.defaults(), **{k: v for k, v in DENSE_PARAMS.items() if method.takes(k)}}
    assert all(method.takes(k) for k in given), given
    params.update(given)
    seed = 1234
    state, config = merge_tensors(adapters, weights, method, params, seed, modules)
    assert config.r == params["svd_rank"]
    torch.manual_seed(seed)  # the engine's draws, in its order: module by module, input by input
    for module in modules:
        factors = [
            (a.factors[module][1], a.factors[module][0], w * a.scaling(module))
            for a, w in zip(adapters, weights, strict=True)
        ]
        rank = params["svd_rank"]
        expected = best_rank_k(dense_reference(name, factors, params, rank), rank)
        lora_a = state[f"{PREFIX}{module}.lora_A.weight"].double()
        lora_b = state[f"{PREFIX}{module}.lora_B.weight"].double()
        assert lora_a.shape[0] == lora_b.shape[1] == params["svd_rank"]
        assert relative_error(lora_b @ lora_a, expected) <= rel, (name, module)
    first = modules[0]
    return (
        state[f"{PREFIX}{first}.lora_B.weight"].double()
        @ state[f"{PREFIX}{first}.lora_A.weight"].double()
    )


def adapter_tensors(folder: Path, modules: list[str]):
    """A saved adapter's factors on `modules` (float32) as the merge core takes them."""
    import json

    from peft import LoraConfig
    from safetensors.torch import load_file

    from raymerge.merge.format import PREFIX
    from raymerge.merge.tensors import AdapterTensors

    tensors = load_file(Path(folder) / "adapter_model.safetensors")
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    factors = {
        m: (tensors[f"{PREFIX}{m}.lora_A.weight"].float(),
            tensors[f"{PREFIX}{m}.lora_B.weight"].float())
        for m in modules
    }  # fmt: skip
    lora = LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], target_modules=["x"])
    return AdapterTensors(Path(folder).name, lora, factors)
