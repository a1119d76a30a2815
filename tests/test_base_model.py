"""The held base model's resources, without a GPU: a worker's device follows the GPUs it holds,
the memory budget accelerate gets (from each card's (free, total) figures, passed in), and a load
that runs out of memory is named as such, not as a broken checkpoint."""

from __future__ import annotations

import errno
import shutil
from types import SimpleNamespace

import pytest
import torch
from helpers import base_spec, write_spec
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM

from raymerge.cluster.materialize import worker_config as materialize_config
from raymerge.cluster.merger import Merger
from raymerge.errors import ClusterError, InputError, is_out_of_memory
from raymerge.load.base_model import (
    GB,
    BaseModel,
    check_fits,
    check_placement,
    compute_device,
    gpu_memory_budget,
    load_error,
    weight_bytes,
)
from raymerge.merge.layout import layout_from_config
from raymerge.sweep.plan import load_plan

HINTS = ("gpus_per_worker", "gpu_headroom_gb", "torch_dtype")

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(
    ("gpus", "cuda", "device"),
    [(0, True, CPU), (0, False, CPU), (1, True, CUDA), (0.5, True, CUDA), (2, False, CPU)],
)
def test_a_worker_computes_on_cuda_only_when_it_holds_gpus_and_cuda_is_there(gpus, cuda, device):
    assert compute_device(gpus, cuda) == device


def test_the_plan_gives_each_worker_its_gpus_and_the_base_model_keeps_them(world, tmp_path):
    spec = base_spec(world, tmp_path / "out", gpus_per_worker=0.5)
    config = load_plan(write_spec(tmp_path, spec)).worker_config()
    assert config.gpus == 0.5
    base = Merger(config).base
    assert base.gpus == 0.5
    assert base.device == compute_device(0.5, torch.cuda.is_available())
    zero = load_plan(write_spec(tmp_path, base_spec(world, tmp_path / "o2", gpus_per_worker=0)))
    assert zero.worker_config().gpus == 0 and Merger(zero.worker_config()).base.device == CPU


@pytest.mark.parametrize(("device", "gpus"), [("cuda:0", 1), ("cpu", 0), (None, 0)])
def test_materialize_rebuilds_on_cuda_only_what_ran_on_cuda(device, gpus):
    record = {
        "base_model": "/base",
        "adapters": [{"name": "a", "uri": "/a"}],
        "engine": "fast",
        "worker": {"threads": 2} | ({"device": device} if device else {}),
    }
    config = materialize_config(record)
    assert config.gpus == gpus and config.num_threads == 2


def test_the_budget_is_free_memory_less_headroom_with_a_cpu_entry_and_no_disk():
    devices = [(30 * GB, 80 * GB), (80 * GB, 80 * GB)]  # another process holds 50 GB of GPU 0
    budget = gpu_memory_budget(devices, headroom_gb=2, gpus=2, host_available=100 * GB)
    assert budget == {0: 28 * GB, 1: 78 * GB, "cpu": 90 * GB}  # host: a tenth kept back
    assert "disk" not in budget


def test_a_fraction_of_a_gpu_budgets_its_share_of_the_card_not_the_whole_card():
    whole = gpu_memory_budget([(80 * GB, 80 * GB)], 2, 1, 10 * GB)
    half = gpu_memory_budget([(80 * GB, 80 * GB)], 2, 0.5, 10 * GB)
    quarter = gpu_memory_budget([(80 * GB, 80 * GB)], 2, 0.25, 10 * GB)
    assert (whole[0], half[0], quarter[0]) == (78 * GB, 38 * GB, 18 * GB)
    # the card's other worker already holds more than its half: what is free is the limit
    assert gpu_memory_budget([(24 * GB, 80 * GB)], 2, 0.5, 10 * GB)[0] == 22 * GB


def test_the_budget_is_never_negative_and_keeps_at_least_2_gib_of_host_memory():
    budget = gpu_memory_budget([(1 * GB, 24 * GB)], 4, 1, 3 * GB)
    assert budget == {0: 0, "cpu": 1 * GB}
    assert gpu_memory_budget([], 2, 0, 1 * GB) == {"cpu": 0}


def test_weights_that_exceed_gpus_and_host_together_are_refused_clearly():
    budget = {0: 38 * GB, 1: 38 * GB, "cpu": 20 * GB}
    check_fits("s3://b/llama-70b", 96 * GB, budget)  # exactly what there is: fits
    with pytest.raises(ClusterError) as caught:
        check_fits("s3://b/llama-70b", 140 * GB, budget)
    message = str(caught.value)
    assert caught.value.exit_code == 1 and not isinstance(caught.value, InputError)
    assert "s3://b/llama-70b" in message and "140.0 GB" in message
    assert "GPU 0: 38.0 GB, GPU 1: 38.0 GB, cpu: 20.0 GB" in message
    assert all(hint in message for hint in HINTS) and "save_pretrained" not in message


def test_weight_bytes_counts_the_models_parameters_in_the_dtype_it_is_loaded_in(world):
    config = AutoConfig.from_pretrained(world.base_model)
    model = AutoModelForCausalLM.from_pretrained(world.base_model, dtype=torch.float32)
    count = sum(p.numel() for p in model.parameters())
    parameters = layout_from_config(config, "CAUSAL_LM").parameters  # counted on the meta model
    assert parameters == count
    assert weight_bytes(parameters, config, "float32") == 4 * count
    assert weight_bytes(parameters, config, "bfloat16") == 2 * count
    config.dtype = torch.float32  # auto: the dtype the checkpoint's config names
    assert weight_bytes(parameters, config, "auto") == 4 * count
    config.dtype = None  # none named: the least a float checkpoint takes, never an overestimate
    assert weight_bytes(parameters, config, "auto") == 2 * count


def _raised_from(cause: BaseException) -> RuntimeError:
    try:
        try:
            raise cause
        except BaseException as exc:
            raise RuntimeError("Error(s) while loading the checkpoint") from exc
    except RuntimeError as wrapped:
        return wrapped


OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: out of memory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory"),
    ValueError("Not enough space on 0 to put model.layers.3 (space available 1.2GB)"),
    MemoryError(),
    _raised_from(torch.OutOfMemoryError("CUDA out of memory")),
    # torch's mmap of a checkpoint under a memory limit (ENOMEM), as a run under `ulimit -v` got.
    RuntimeError(
        "unable to mmap 337719464 bytes from file <m.safetensors>: Cannot allocate memory"
    ),
    OSError(errno.ENOMEM, "Cannot allocate memory"),
]
NOT_OUT_OF_MEMORY = [
    SafetensorError("Error while deserializing header: HeaderTooLarge"),
    OSError("no file named model.safetensors found in directory /base"),
    OSError(errno.ENOSPC, "There is not enough space on the disk"),
    ValueError("Unrecognized configuration class"),
]


@pytest.mark.parametrize("exc", OUT_OF_MEMORY, ids=lambda e: type(e).__name__)
def test_an_out_of_memory_load_is_a_resource_error_that_says_what_to_change(exc):
    assert is_out_of_memory(exc)
    error = load_error("/models/big", exc, {0: 38 * GB, "cpu": 8 * GB})
    assert isinstance(error, ClusterError) and error.exit_code == 1
    message = str(error)
    assert message.startswith("base_model /models/big: out of memory while loading its weights")
    assert "GPU 0: 38.0 GB, cpu: 8.0 GB" in message
    assert all(hint in message for hint in HINTS) and "save_pretrained" not in message
    assert "\n" not in message  # Ray reports a worker's start failure by its first line


@pytest.mark.parametrize("exc", NOT_OUT_OF_MEMORY, ids=lambda e: type(e).__name__)
def test_any_other_load_failure_is_still_an_unusable_checkpoint(exc):
    assert not is_out_of_memory(exc)
    error = load_error("/models/big", exc)
    assert isinstance(error, InputError) and error.exit_code == 2
    assert "save_pretrained" in str(error) and "gpus_per_worker" not in str(error)


def test_weights_placed_on_disk_are_refused_and_on_the_host_allowed():
    budget = {0: 10 * GB, "cpu": 4 * GB}
    check_placement("/m", SimpleNamespace(hf_device_map={"model": 0}), budget)
    check_placement("/m", SimpleNamespace(hf_device_map={"model": 0, "lm_head": "cpu"}), budget)
    check_placement("/m", SimpleNamespace(), None)  # one device: no map
    with pytest.raises(ClusterError, match="offloaded to disk") as caught:
        check_placement("/m", SimpleNamespace(hf_device_map={"a": 0, "b": "disk"}), budget)
    assert all(hint in str(caught.value) for hint in HINTS)


def test_a_corrupt_checkpoint_still_says_save_it_again(world, tmp_path):
    base = shutil.copytree(world.base_model, tmp_path / "base")
    [weights] = base.glob("*.safetensors")
    weights.write_bytes(b"\xff" * 64)
    model = BaseModel(str(base), gpus=0)
    with pytest.raises(InputError, match="save it again with save_pretrained"):
        _ = model.model


CHILD_UNDER_A_MEMORY_LIMIT = """
import resource, sys
import peft, torch, transformers  # what a worker holds before it loads the weights
import ray
from raymerge.cli import app
from raymerge.cluster import driver
from raymerge.score import scorer
from raymerge.sweep.plan import load_plan
load_plan(sys.argv[1])  # every import a run makes before loading the weights, made here
status = open("/proc/self/status").read()
used = int(status.split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (used + int(sys.argv[2]), resource.RLIM_INFINITY))
sys.argv = ["raymerge", "run", sys.argv[1]]
app()
"""


def test_running_out_of_memory_loading_the_base_model_is_one_line_exit_1(tmp_path):
    """A real load under an address-space limit well below the checkpoint's size (the worker runs
    in this process: one CPU worker): named as out of memory with what to change, exit 1, no
    traceback; never "save it again"."""
    import subprocess
    import sys

    from raymerge.demo.world import AdapterShape, build_world

    world = build_world(
        tmp_path / "w", dict.fromkeys("ab", AdapterShape()), hidden_size=1024, layers=6
    )
    checkpoint = sum(p.stat().st_size for p in world.base_model.glob("*.safetensors"))
    (tmp_path / "t.jsonl").write_text('{"text": "hello world"}\n{"text": "another line"}\n')
    spec = base_spec(world, tmp_path / "out", evaluate={"datasets": {"t": "t.jsonl"}})
    headroom = checkpoint // 2  # half the checkpoint's bytes: its mmap cannot fit
    spec_path = write_spec(tmp_path, spec)
    result = subprocess.run(
        [sys.executable, "-c", CHILD_UNDER_A_MEMORY_LIMIT, str(spec_path), str(headroom)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "save_pretrained" not in output
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    assert "out of memory while loading its weights" in line and "more host memory" in line
    assert "gpu_headroom_gb" not in line  # a CPU worker: no GPU advice beyond giving it GPUs
