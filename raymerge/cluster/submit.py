"""Ray job submission: a sweep spec sent to a running cluster as a Ray job.

The spec travels with the job (a working_dir holding it); the job's entrypoint is
`python -m raymerge run <spec>` on the cluster, whose image has raymerge installed (or, with
`ship_raymerge`, the package is shipped as a py_module). S3 and Hub endpoint settings travel
as environment variables; credentials never do: the cluster's nodes have their own (a Secret, a
role). The cluster's token is found by Ray itself in its standard places (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); raymerge only turns token mode on when one exists, and
never reads, prints or ships it.

Usage (needs a cluster's job API)::

    job_id = submit("jobs/s3-sweep.yaml", "http://head:8265")
    wait(job_id, "http://head:8265", poll_seconds=5)   # 'SUCCEEDED'
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from raymerge.errors import ClusterError

FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "HF_ENDPOINT",
    "HF_HUB_OFFLINE",
)
"""Where S3 and the Hub are, not who may use them: these travel with the job; credentials
(AWS keys, HF_TOKEN, MLflow's user, password and token) never do."""
FORWARDED_URIS = ("MLFLOW_TRACKING_URI",)
"""Where the tracking server is: travels with the job without any `user:password@` in it."""
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _client(address: str | None):
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ClusterError("no cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "RAY_AUTH_MODE" not in os.environ and _token_available():
        # Ray sends the token only in token mode, which it reads when first imported.
        os.environ["RAY_AUTH_MODE"] = "token"
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise _explain(exc, address) from None


def job_env(environ) -> dict[str, str]:
    """The variables a submitted job takes from `environ`: where things are, never who may use
    them.

    >>> job_env({"HF_ENDPOINT": "https://hub", "HF_TOKEN": "hf_x",
    ...          "MLFLOW_TRACKING_URI": "https://me:pw@mlflow:5000"})
    {'HF_ENDPOINT': 'https://hub', 'MLFLOW_TRACKING_URI': 'https://mlflow:5000'}
    """
    from raymerge.sweep.spec.tracking import redact_uri

    forwarded = {k: environ[k] for k in FORWARDED_ENV if environ.get(k)}
    return forwarded | {k: redact_uri(environ[k]) for k in FORWARDED_URIS if environ.get(k)}


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or Path(path).is_file()


def _explain(exc: Exception, address: str) -> ClusterError:
    text = str(exc)
    if "Authentication" in type(exc).__name__ or "Unauthorized" in text or "401" in text:
        return ClusterError(
            f"the Ray cluster at {address} refused the request: it requires its authentication "
            "token. Set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH to a file holding it, or put it in "
            "~/.ray/auth_token); raymerge then turns on RAY_AUTH_MODE=token"
        )
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ClusterError(f"cannot reach the Ray job API at {address}: {first}")


def submit(
    spec_path: str | Path,
    address: str | None,
    *,
    ship_raymerge: bool = False,
    extra_args: list[str] | None = None,
) -> str:
    """Submit the sweep in `spec_path` as a Ray job; returns the job id.

    Everything that can be checked without reading the inputs is checked here first (keys,
    values, cross-key rules, credentials): an invalid spec, or one holding a credential, never
    leaves this machine. The job checks the inputs themselves on the cluster."""
    from raymerge.sweep.plan import validate_offline

    spec_path = Path(spec_path)
    validate_offline(spec_path)
    client = _client(address)
    staging = Path(tempfile.mkdtemp(prefix="raymerge-job-"))
    try:
        shutil.copy(spec_path, staging / spec_path.name)
        runtime_env: dict = {
            "working_dir": str(staging),
            "env_vars": job_env(os.environ),
        }
        if ship_raymerge:
            import raymerge

            runtime_env["py_modules"] = [str(Path(raymerge.__file__).parent)]
        entrypoint = " ".join(["python -m raymerge run", spec_path.name, *(extra_args or [])])
        try:
            return client.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                metadata={"raymerge_spec": spec_path.name},
            )
        except Exception as exc:
            raise _explain(exc, address or os.environ.get("RAY_ADDRESS", "")) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def status(job_id: str, address: str | None) -> dict:
    """The job's status and message."""
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise _explain(exc, address or "") from None
    return {"job_id": job_id, "status": str(info.status), "message": info.message or ""}


def logs(job_id: str, address: str | None) -> str:
    client = _client(address)
    try:
        return client.get_job_logs(job_id)
    except Exception as exc:
        raise _explain(exc, address or "") from None


def follow(job_id: str, address: str | None, write: Callable[[str], None]) -> str:
    """Stream the job's logs to `write` until it ends; returns its final status."""
    client = _client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as exc:
        raise _explain(exc, address or "") from None
    return wait(job_id, address, poll_seconds=0.5)


def wait(job_id: str, address: str | None, poll_seconds: float = 2.0) -> str:
    """Block until the job ends; returns its final status."""
    client = _client(address)
    while True:
        current = str(client.get_job_status(job_id))
        if current in TERMINAL:
            return current
        time.sleep(poll_seconds)
