"""Session fixtures: one tiny model world, one local Ray instance, one S3 server on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import free_port, wait_for_http

from raymerge.world import AdapterShape, build_world

# Fake credentials for the local S3 server, set before Ray starts so its workers inherit them.
os.environ.update(
    AWS_ACCESS_KEY_ID="testing",
    AWS_SECRET_ACCESS_KEY="testing",
    AWS_DEFAULT_REGION="us-east-1",
)
os.environ.pop("AWS_ENDPOINT_URL", None)

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


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 protocol server (moto in server mode) on 127.0.0.1; yields its endpoint URL."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(f"{endpoint}/moto-api/", server, 30, "the moto S3 server")
    yield endpoint
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3(s3_endpoint):
    """An s3fs filesystem on the test server with a fresh bucket; yields (fs, bucket)."""
    import uuid

    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, use_listings_cache=False)
    bucket = f"test-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    return fs, bucket


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The demo's world, trained once: base model with tokenizer, task adapters, eval sets."""
    from raymerge.demo import prepare_demo

    folder = tmp_path_factory.mktemp("demo") / "raymerge-demo"
    prepare_demo(folder, workers=2, log=lambda _: None)
    return folder
