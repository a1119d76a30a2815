"""The spec's `tracking` section: where a sweep is logged besides its output (MLflow).

Tracking is on when `tracking.mlflow` is given, or when MLFLOW_TRACKING_URI is set; the spec's
`uri` wins over the variable. Credentials never go in the spec: MLflow reads them from its own
variables (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN).

Example:
    >>> spec = TrackingSpec.model_validate({"mlflow": {"uri": "http://mlflow:5000"}})
    >>> mlflow_target(spec, {}).uri, mlflow_target(None, {"MLFLOW_TRACKING_URI": "http://m"}).uri
    ('http://mlflow:5000', 'http://m')
    >>> mlflow_target(None, {}) is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator

from raymerge.sweep.spec.types import FrozenModel

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
MLFLOW_CREDENTIALS = {
    "username": "MLFLOW_TRACKING_USERNAME",
    "user": "MLFLOW_TRACKING_USERNAME",
    "password": "MLFLOW_TRACKING_PASSWORD",
    "token": "MLFLOW_TRACKING_TOKEN",
}
"""Keys a user might write for a credential, and the MLflow variable that carries it instead."""


class MlflowSpec(FrozenModel):
    """Log the sweep to MLflow: one parent run (the spec, its summary), one child run per scored
    merge (`pip install 'raymerge[mlflow]'`)."""

    uri: str | None = Field(default=None, min_length=1)
    """Tracking server (http(s)://HOST:PORT, databricks, ...); default: MLFLOW_TRACKING_URI."""
    experiment: str | None = Field(default=None, min_length=1, max_length=500)
    """Experiment name, created if missing (default: the output folder's name)."""
    enabled: bool = True
    """false: no tracking, even where MLFLOW_TRACKING_URI is set."""

    @model_validator(mode="before")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key in value:
                variable = MLFLOW_CREDENTIALS.get(str(key).lower())
                if variable is not None:
                    raise ValueError(
                        f"{key} would put a credential in the spec; remove it and set "
                        f"{variable} where the sweep runs (MLflow reads it from there)"
                    )
        return value

    @field_validator("uri")
    @classmethod
    def _no_userinfo(cls, value: str | None) -> str | None:
        if value is not None and "@" in urlsplit(value.strip()).netloc:
            # never echo the value: it holds a password
            raise ValueError(
                "the URI holds a user name or password, which would put a credential in the "
                "spec; write it without `user:password@` and set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) where the sweep runs"
            )
        return value


class TrackingSpec(FrozenModel):
    """Where the sweep is tracked besides its output."""

    mlflow: MlflowSpec | None = None
    """An MLflow tracking server (on with defaults, too, where MLFLOW_TRACKING_URI is set)."""


@dataclass(frozen=True)
class MlflowTarget:
    """Where a tracked sweep goes: its tracking URI and experiment (None: the default)."""

    uri: str | None
    """None: neither the spec nor MLFLOW_TRACKING_URI names a server."""
    experiment: str | None
    source: str
    """What turned tracking on: "spec" (tracking.mlflow) or the variable's name."""


def mlflow_target(tracking: TrackingSpec | None, environ: Mapping[str, str]) -> MlflowTarget | None:
    """Where the sweep is tracked in MLflow, or None where it is not: `tracking.mlflow` given
    (and not disabled), or MLFLOW_TRACKING_URI set in `environ`; the spec's uri wins."""
    spec = tracking.mlflow if tracking is not None else None
    from_env = environ.get(TRACKING_URI_ENV, "").strip() or None
    if spec is not None and not spec.enabled:
        return None
    if spec is None:
        return None if from_env is None else MlflowTarget(from_env, None, TRACKING_URI_ENV)
    return MlflowTarget(spec.uri or from_env, spec.experiment, "spec")


def redact_uri(uri: str) -> str:
    """`uri` without a user name or password in it, as it may be printed.

    >>> redact_uri("https://user:secret@mlflow.example.com:5000/path")
    'https://mlflow.example.com:5000/path'
    """
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


MLFLOW_INSTALL = "pip install 'raymerge[mlflow]'"


def mlflow_installed() -> bool:
    """Whether MLflow's client can be imported here (`mlflow` or `mlflow-skinny`)."""
    import importlib.util

    return importlib.util.find_spec("mlflow") is not None


def default_experiment(output: str) -> str:
    """The experiment a sweep is logged to when the spec names none: its output folder's name.

    >>> default_experiment("s3://bucket/sweeps/run-1/"), default_experiment("/data/out")
    ('run-1', 'out')
    """
    name = output.rstrip("/").rpartition("/")[2]
    return name or "raymerge"


def tracking_problems(tracking: TrackingSpec | None, environ: Mapping[str, str]) -> list[str]:
    """What stops a sweep from being tracked as `tracking.mlflow` asks: MLflow not installed, no
    server named. (Tracking turned on by MLFLOW_TRACKING_URI alone is a warning instead.)"""
    target = mlflow_target(tracking, environ)
    if target is None or target.source != "spec":
        return []
    problems = []
    if not mlflow_installed():
        problems.append(f"tracking.mlflow needs MLflow: {MLFLOW_INSTALL}")
    if target.uri is None:
        problems.append(
            f"tracking.mlflow: no tracking server: give `uri` or set {TRACKING_URI_ENV}"
        )
    return problems


def tracking_warning(tracking: TrackingSpec | None, environ: Mapping[str, str]) -> str | None:
    """Tracking that MLFLOW_TRACKING_URI alone turns on, where MLflow is not installed."""
    target = mlflow_target(tracking, environ)
    if target is None or target.source == "spec" or mlflow_installed():
        return None
    return (
        f"{TRACKING_URI_ENV} is set but MLflow is not installed: this sweep is not tracked "
        f"({MLFLOW_INSTALL}; `tracking: {{mlflow: {{enabled: false}}}}` turns this off)"
    )
