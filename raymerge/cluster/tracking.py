"""MLflow tracking of a sweep, from the driver: one parent run per run of a spec (the spec file as
an artifact, a summary of it as params, the run's figures as metrics at the end) and one child
run per scored merge (its recipe as params, every metric with its `_stderr`, its status as tags;
what each holds is `tracking_content`'s).

Everything that talks to MLflow runs in one background thread fed by a bounded queue: the driver
only hands it the manifest lines it writes (`TrackedWriter.add`: no network, no waiting), so
tracking never slows the sweep; a server that is down, slow or refusing costs one warning and
the sweep goes on untracked. Every call has a deadline: the server's port is tried first
(CONNECT_SECONDS), and MLflow's own HTTP retries and timeout are bounded (CLIENT_ENV, unless the
user set those variables); `close` waits at most CLOSE_SECONDS (RAYMERGE_TRACKING_TIMEOUT).

Usage (the driver's; a no-op where the sweep is not tracked)::

    tracker = start_tracking(plan, out)   # out.writer now offers every line to the tracker
    ...                                    # the run
    tracker.seal()                         # keep top-k's last lines: updates of logged merges only
    tracker.close(summary)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

from raymerge.cluster.resume import Output
from raymerge.cluster.summary import RunSummary
from raymerge.cluster.tracking_content import (
    log_batch,
    merge_metrics,
    merge_params,
    merge_tags,
    spec_artifacts,
    spec_params,
)
from raymerge.score.failures import first_line
from raymerge.sweep.plan import Plan
from raymerge.sweep.plan import objective as objective_of
from raymerge.sweep.spec.tracking import (
    mlflow_installed,
    redact_uri,
    tracking_warning,
)
from raymerge.task import Status

log = logging.getLogger(__name__)

CLOSE_SECONDS = 30.0
"""How long the end of a run waits for tracking to catch up (RAYMERGE_TRACKING_TIMEOUT)."""
CONNECT_SECONDS = 5.0
"""How long the tracking server's port may take to accept a connection."""
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}
"""MLflow's client retries for minutes by default (7 retries, 120 s each): a sweep's tracking
gets ~35 s per call at most; and it would print two lines with URLs (after one more call) for
every run ended. Set while tracking runs, only where the user has not set them."""
QUEUE_LINES = 10_000
"""Lines waiting to be logged at most; beyond it a merge is not logged (and the run says so)."""
SECRETS = ("MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_END = "end"


class NoTracking:
    """What the driver holds where the sweep is not tracked."""

    def seal(self) -> None:
        pass

    def close(self, summary: RunSummary, error: BaseException | None = None) -> None:
        pass


def start_tracking(plan: Plan, out: Output) -> Tracker | NoTracking:
    """Start tracking the run in MLflow where its spec or MLFLOW_TRACKING_URI asks for it:
    `out.writer` then also offers every manifest line to the tracker."""
    target = plan.tracking_target()
    if target is None:
        return NoTracking()
    if not mlflow_installed():  # the spec asking for it is refused by load_plan
        log.warning(tracking_warning(plan.spec.tracking, os.environ))
        return NoTracking()
    tracker = Tracker(plan, target.uri, target.experiment, out.writer.run_id)
    out.writer.on_add = tracker.offer
    return tracker


class Tracker:
    """One run of a sweep in MLflow, logged from a background thread (see the module)."""

    def __init__(self, plan: Plan, uri: str, experiment: str, run_name: str):
        self.plan, self.uri, self.experiment, self.run_name = plan, uri, experiment, run_name
        self.objective = objective_of(plan.spec)
        self.best: dict[str, Any] | None = None
        self._offered: dict[str, str] = {}  # merge id -> the status it was offered with
        self._sealed = False
        self._dropped = 0
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_LINES)
        self._off = threading.Event()  # tracking failed: nothing more is queued
        self._stop = threading.Event()  # the run's end stopped waiting
        self._warned = threading.Lock()
        self._client = self._parent = self._experiment_id = None
        self._children: dict[str, str] = {}  # merge id -> its child run's id
        self._thread = threading.Thread(target=self._work, name="raymerge-tracking", daemon=True)
        self._thread.start()

    def offer(self, line: dict[str, Any]) -> None:
        """A manifest line (the driver's thread; never blocks): a scored merge becomes a child
        run, a later line of one (rescored, or its files dropped by keep top-k) updates it."""
        merge_id, status = line.get("merge_id"), line.get("status")
        if self._off.is_set() or status not in (Status.DONE, Status.STOPPED):
            return
        if merge_id not in self._offered and (self._sealed or not line.get("metrics")):
            return  # not scored, or made by an earlier run (keep top-k's last lines)
        if status == Status.DONE and self._offered.get(merge_id) != status:
            self._note_best(line)
        kind = "tags" if self._offered.get(merge_id) == status else "merge"
        self._offered[merge_id] = status
        try:
            self._queue.put_nowait((kind, line))
        except queue.Full:
            self._dropped += 1

    def seal(self) -> None:
        """From here on, lines of merges not offered yet are not this run's scored merges."""
        self._sealed = True

    def close(self, summary: RunSummary, error: BaseException | None = None) -> None:
        """The run's figures to the parent run and its end, waiting at most CLOSE_SECONDS (a
        few with Ctrl-C); what is not logged by then is not, with a warning."""
        try:
            timeout = max(0.0, float(os.environ.get("RAYMERGE_TRACKING_TIMEOUT", CLOSE_SECONDS)))
        except ValueError:
            timeout = CLOSE_SECONDS
        if isinstance(error, KeyboardInterrupt):
            status, timeout = "KILLED", min(timeout, 5.0)
        else:
            status = "FAILED" if error is not None or summary.stopped_by else "FINISHED"
        deadline = time.monotonic() + timeout
        ended = False
        with contextlib.suppress(queue.Full):
            if self._thread.is_alive():
                self._queue.put((_END, (summary.to_json(), status)), timeout=timeout)
                ended = True
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            self._stop.set()
            left = self._queue.qsize() - ended
            self._warn(
                f"MLflow tracking did not finish within {timeout:g} s: about {max(left, 0)} "
                "merges not logged, and the run stays RUNNING in MLflow "
                "(RAYMERGE_TRACKING_TIMEOUT sets the wait); the sweep itself is complete"
            )

    def _note_best(self, line: dict[str, Any]) -> None:
        value = line.get("objective")
        if not isinstance(value, int | float) or not math.isfinite(value) or self.objective is None:
            return  # a NaN would never be beaten: every comparison with it is False
        if self.best is None or self.objective.better(value, self.best["objective"]):
            self.best = line

    def _warn(self, message: str) -> None:
        """One warning per run, whatever went wrong how often."""
        self._off.set()
        if self._warned.acquire(blocking=False):
            log.warning("%s", _scrub(message, self.uri))

    def _work(self) -> None:
        with _client_env():
            try:
                self._open()
            except Exception as exc:
                self._warn(
                    f"MLflow tracking is off for this run: {redact_uri(self.uri)} "
                    f"{_why(exc)}; the sweep goes on untracked"
                )
                return
            while not self._stop.is_set():
                kind, item = self._queue.get()
                try:
                    if kind == _END:
                        self._finish(*item)
                        return
                    self._log_merge(item, update=kind == "tags")
                except Exception as exc:
                    self._warn(
                        f"MLflow tracking stopped: {redact_uri(self.uri)} {_why(exc)}; the "
                        "sweep goes on, and what was logged so far stays"
                    )
                    return

    def _open(self) -> None:
        """Reach the server, find or create the experiment, start the parent run."""
        _check_reachable(self.uri)
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        self._experiment_id = _experiment_id(client, self.experiment)
        tags = {"raymerge.output": self.plan.output, "raymerge.run_id": self.run_name}
        run = client.create_run(self._experiment_id, run_name=self.run_name, tags=tags)
        self._client, self._parent = client, run.info.run_id
        log_batch(client, self._parent, params=spec_params(self.plan))
        for name, text in spec_artifacts(self.plan).items():
            client.log_text(self._parent, text, name)

    def _log_merge(self, line: dict[str, Any], update: bool) -> None:
        """A scored merge's child run; a later line of it updates its tags (and, rescored, its
        metrics)."""
        client, merge_id = self._client, line["merge_id"]
        run_id = self._children.get(merge_id)
        if run_id is not None:
            metrics = {} if update else merge_metrics(line)
            tags = merge_tags(line)
            log_batch(client, run_id, metrics=metrics, tags=tags, step=1)
            if not update:  # stopped by a race, then scored in full: no longer stopped
                for key in {"stopped", "round"} - set(tags):
                    client.delete_tag(run_id, key)
            return
        tags = {"mlflow.parentRunId": self._parent, **merge_tags(line)}
        run = client.create_run(self._experiment_id, run_name=merge_id, tags=tags)
        run_id = self._children[merge_id] = run.info.run_id
        log_batch(client, run_id, metrics=merge_metrics(line), params=merge_params(line))
        client.set_terminated(run_id, "FINISHED")

    def _finish(self, summary: dict[str, Any], status: str) -> None:
        """The run's figures and best merge on the parent run, which ends."""
        keys = ("done", "failed", "stopped", "skipped", "not_run", "total")
        metrics = {f"merges_{key}": summary[key] for key in keys}
        for key in ("retries", "seconds", "merge_seconds", "merges_per_s", "examples_scored"):
            metrics[key] = summary[key]
        tags = {"raymerge.status": status.lower()}
        if self.best is not None:
            metrics["best_objective"] = self.best["objective"]
            metrics["best_objective_stderr"] = self.best.get("objective_stderr")
            tags["best_merge_id"] = self.best["merge_id"]
        if self._dropped:
            tags["merges_not_logged"] = str(self._dropped)
        log_batch(self._client, self._parent, metrics=metrics, tags=tags)
        self._client.log_text(self._parent, json.dumps(summary, indent=2), "summary.json")
        self._client.set_terminated(self._parent, status)
        if self._dropped:
            self._warn(
                f"MLflow tracking fell behind: {self._dropped} scored merges were not logged "
                "(they are in the manifest)"
            )


def _experiment_id(client, name: str) -> str:
    """The id of experiment `name`, created if missing (another sweep may create it first)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
    if found.lifecycle_stage != "active":
        raise RuntimeError(
            f"experiment {name!r} is deleted: restore it, or name another in "
            "tracking.mlflow.experiment"
        )
    return found.experiment_id


def _check_reachable(uri: str) -> None:
    """An http(s) server's port must accept a connection within CONNECT_SECONDS (MLflow's own
    first call would retry for much longer); one reached through a proxy is left to the client."""
    import urllib.request

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if parts.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(
        parts.hostname
    ):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=CONNECT_SECONDS).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConnectionError(f"cannot be reached ({reason})") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, ConnectionError) and str(exc).startswith("cannot be reached"):
        return str(exc)
    if isinstance(exc, ImportError):
        return f"needs a working MLflow client ({first_line(exc)})"
    text = first_line(exc)
    return f"failed: {type(exc).__name__}: {text if len(text) < 300 else text[:299] + '…'}"


def _scrub(text: str, uri: str) -> str:
    """`text` without the tracking URI's user name and password, or MLflow's secrets."""
    text = text.replace(uri, redact_uri(uri))
    userinfo = urlsplit(uri).netloc.rpartition("@")[0]
    if userinfo:
        text = text.replace(userinfo, "***")
    for name in SECRETS:
        if os.environ.get(name):
            text = text.replace(os.environ[name], "***")
    return text


_env_lock = threading.Lock()
_env_users = 0  # trackers running in this process
_env_added: dict[str, str] = {}  # what the first of them set


@contextlib.contextmanager
def _client_env():
    """CLIENT_ENV set while any tracker runs (what the user set stays as it is), and the HTTP
    library's "Retrying ..." warnings of this thread's calls kept quiet: one warning says it."""
    global _env_users
    with _env_lock:
        if _env_users == 0:
            _env_added.update({k: v for k, v in CLIENT_ENV.items() if k not in os.environ})
            os.environ.update(_env_added)
        _env_users += 1
    retries = logging.getLogger("urllib3.connectionpool")
    quiet = _NotFromThread(threading.get_ident())
    retries.addFilter(quiet)
    try:
        yield
    finally:
        retries.removeFilter(quiet)
        with _env_lock:
            _env_users -= 1
            if _env_users == 0:  # the last one to end restores the environment
                for key, value in _env_added.items():
                    if os.environ.get(key) == value:
                        del os.environ[key]
                _env_added.clear()


class _NotFromThread(logging.Filter):
    def __init__(self, thread: int):
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread
