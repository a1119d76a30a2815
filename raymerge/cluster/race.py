"""Racing a grid (`evaluate.racing`): every merge is scored on the first window of each eval set's
seeded order, those behind are stopped (`score.racing`'s rules), the rest go on to the next,
larger window, and the survivors of the last round are then merged, scored on everything and
written as any grid merge. Nothing of a stopped merge is written; its manifest line holds its
recipe, its partial metrics with their stderr, the examples it saw and where it stopped.

Each round is committed to the output's race journal once scored (`store.race_records`): a rerun
replays the committed rounds without scoring them again (the rules are deterministic in the
scores), and scores only what is missing. Racing holds the grid's tasks in memory.

Usage (in the driver, once the references are scored)::

    race = Race(plan, digests)
    survivors = race.run(objective, RoundScorer(workers, plan).score)
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import Any

from raymerge.cluster.executor import CALLS_PER_WORKER, WorkerDied
from raymerge.cluster.fleet import Fleet
from raymerge.score import racing, stats
from raymerge.score.objective import Objective
from raymerge.store import race_records
from raymerge.sweep.plan import Plan
from raymerge.task import MergeTask, SeenScores, Window, WindowScores

log = logging.getLogger(__name__)


@dataclass
class RaceRound:
    """One round's figures (in summary.json and the report)."""

    prefix: int
    """Examples per eval set seen once this round is scored (at most each set's size)."""
    candidates: int
    examples_scored: int
    """Example scorings done for it in this run."""
    examples_reused: int
    """Example scorings a committed round of an earlier run held."""
    stopped: int
    failed: int


def set_sizes(plan: Plan) -> dict[str, int]:
    """Examples per eval set (as the plan read them)."""
    return {name: entry["examples"] for name, entry in plan.eval_sets.items()}


def race_windows(plan: Plan) -> list[Window]:
    """The race's rounds as windows of each set's seeded order: [0, p1), [p1, p2), ..."""
    spec = plan.spec.evaluate.racing
    seed = spec.seed if spec.seed is not None else plan.spec.seed
    stops = racing.prefixes(spec.first, spec.growth, max(set_sizes(plan).values()))
    return [Window(seed, start, stop) for start, stop in zip([0, *stops], stops, strict=False)]


def window_size(sizes: dict[str, int], start: int, stop: int) -> int:
    """Example scorings of one merge on a window, over every set."""
    return sum(max(0, min(stop, size) - min(start, size)) for size in sizes.values())


class Race:
    """The grid's race: rounds, the journal, the stopped merges' lines."""

    def __init__(self, plan: Plan, digests: dict[str, str]):
        spec = plan.spec.evaluate.racing
        self.plan = plan
        self.spec = spec
        keep = plan.spec.keep
        self.top = spec.top or (keep.top if keep is not None else 1)
        self.sizes = set_sizes(plan)
        self.windows = race_windows(plan)
        self.tasks: dict[str, MergeTask] = {}
        for task in plan.tasks():
            self.tasks.setdefault(task.merge_id, task)
        self.header = {
            "base_model": plan.base_model,
            "inputs": dict(sorted(digests.items())),
            "sets": {
                name: {k: v for k, v in entry.items() if k != "uri"}
                for name, entry in sorted(plan.eval_sets.items())
            },
            "max_length": plan.spec.evaluate.max_length,
        }
        self.rounds: list[RaceRound] = []
        self.stopped_lines: list[dict[str, Any]] = []
        self.failures: dict[str, str] = {}
        self.survivors: list[MergeTask] | None = None
        """Set once the race is run: the merges to score fully and write."""

    def run(self, objective: Objective, score, note=None) -> list[MergeTask] | None:
        """The race's survivors, in plan order (all of them when `rescore_stopped`). `score`
        (tasks, window) -> ({merge_id: WindowScores}, {merge_id: error}) scores a round's missing
        merges; None: replay committed rounds only, and return None if any must be scored.
        `note` (a line of text) hears of each round."""
        self.rounds, self.stopped_lines, self.failures = [], [], {}
        alive = list(self.tasks)
        seen: dict[str, dict[str, dict[str, list]]] = {m: {} for m in alive}
        seen_to = dict.fromkeys(alive, 0)  # where each merge's race ended
        for index, window in enumerate(self.windows):
            if len(alive) <= self.top:
                break
            scores, figures = self._round_scores(alive, window, score)
            if scores is None:
                return None
            alive = [m for m in alive if m in scores]
            for merge_id in alive:
                racing.extend(seen[merge_id], scores[merge_id])
                seen_to[merge_id] = window.stop
            alive = self._decide(index, alive, seen, objective, figures)
            self.rounds.append(figures)
            line = (
                f"race round {index + 1}: {figures.candidates} merges on {window.stop} examples "
                f"per set; {figures.stopped} stopped, {len(alive)} go on"
            )
            log.info(line)
            if note is not None and score is not None:
                note(line)
        go_on = list(self.tasks) if self.spec.rescore_stopped else alive
        go_on = [m for m in go_on if m not in self.failures]
        return [self._with_seen(m, seen[m], seen_to[m]) for m in go_on]

    def _with_seen(self, merge_id: str, seen: dict, stop: int) -> MergeTask:
        """The task, carrying what the race scored of it (only the rest is scored again)."""
        task = self.tasks[merge_id]
        if not stop:
            return task
        largest = max(self.sizes.values())
        rest = Window(self.windows[0].seed, stop, largest)
        return replace(task, seen=SeenScores(rest, seen))

    def _round_scores(self, alive: list[str], window: Window, score):
        """Every alive merge's per-example scores on `window`: the journal's, then the rest
        scored (and the round committed); (None, None) if scoring is needed and not allowed."""
        name = race_records.window_name(window.seed, window.start, window.stop)
        options = self.plan.spec.storage_options
        known = race_records.read_window(self.plan.output, name, self.header, options)
        missing = [self.tasks[m] for m in alive if m not in known]
        per_merge = window_size(self.sizes, window.start, window.stop)
        figures = RaceRound(window.stop, len(alive), 0, per_merge * (len(alive) - len(missing)),
                            0, 0)  # fmt: skip
        if missing:
            if score is None:
                return None, None
            got, failed = score(missing, window)
            known.update({m: result.examples for m, result in got.items()})
            figures.examples_scored = per_merge * len(missing)
            figures.failed = len(failed)
            self.failures.update(failed)
            race_records.write_window(self.plan.output, name, self.header, known, options)
        return {m: known[m] for m in alive if m in known}, figures

    def _decide(self, index, alive, seen, objective, figures: RaceRound) -> list[str]:
        """Who goes on after round `index`; the others' manifest lines."""
        scores = {m: (racing.metrics_of(seen[m]), seen[m]) for m in alive}
        if self.spec.rule == "halving":
            keep, standings = racing.halving_survivors(
                objective, scores, self.top, self.spec.growth
            )
        else:
            keep, standings = racing.bound_survivors(
                objective, scores, self.top, self.spec.confidence
            )
        kept = set(keep)
        for merge_id in alive:
            if merge_id in kept:
                continue
            metrics, examples = scores[merge_id]
            stderr = stats.objective_stderr(objective, metrics, examples)
            standing = {
                k: round(v, 6) if isinstance(v, float) else v
                for k, v in asdict(standings[merge_id]).items()
                if k != "merge_id"
            }
            self.stopped_lines.append(
                race_records.stopped_line(
                    self.tasks[merge_id],
                    self.plan.adapter_uris(),
                    stopped="racing",
                    round_index=index + 1,
                    metrics=metrics,
                    examples_seen=racing.seen_count(examples),
                    objective=round(objective.value(metrics), 6),
                    objective_stderr=round(stderr, 6) if math.isfinite(stderr) else None,
                    standing={"rule": self.spec.rule, **standing},
                )
            )
        figures.stopped = len(alive) - len(kept)
        return [m for m in alive if m in kept]


class RoundScorer:
    """Scores merges on a window across the workers: `adapters_per_pass` merges per call, pulled
    by workers as they free up. A worker that dies goes through the fleet as in dispatch (probed,
    given work again once Ray has restarted it, or dropped); its call goes again (up to
    `task_retries`) on whichever worker is up."""

    NOTE_EVERY_S = 10.0

    def __init__(self, fleet: Fleet, plan: Plan, note=None):
        self.fleet = fleet
        self.workers = fleet.executor
        self.per_call = plan.spec.evaluate.adapters_per_pass
        self.retries = plan.spec.task_retries
        self.note = note
        """Hears a line of progress at most every NOTE_EVERY_S seconds while a round runs."""

    def score(
        self, tasks: list[MergeTask], window: Window
    ) -> tuple[dict[str, WindowScores], dict[str, str]]:
        calls = deque(tasks[i : i + self.per_call] for i in range(0, len(tasks), self.per_call))
        attempts: dict[str, int] = {}
        in_flight: dict[Any, tuple[int, list[MergeTask]]] = {}
        got: dict[str, WindowScores] = {}
        failed: dict[str, str] = {}

        def top_up(index: int) -> None:
            busy = sum(1 for i, _ in in_flight.values() if i == index)
            worker = self.fleet.workers[index]
            while calls and busy < CALLS_PER_WORKER and worker.alive and not worker.down:
                chunk = calls.popleft()
                in_flight[self.workers.submit(index, "score_window", chunk, window)] = (
                    index,
                    chunk,
                )
                busy += 1

        for worker in self.fleet.up():
            top_up(worker.index)
        last_note = time.monotonic()
        while in_flight or (calls and self.fleet.wait_for_restarts()):
            if self.note is not None and time.monotonic() - last_note >= self.NOTE_EVERY_S:
                last_note = time.monotonic()
                self.note(
                    f"  scoring {len(tasks)} merges on examples {window.start + 1}-{window.stop} "
                    f"of each set: {len(got) + len(failed)} done"
                )
            call = self.fleet.first_done(list(in_flight))
            if call is None:
                continue
            if self.fleet.is_probe(call):
                if (worker := self.fleet.probed(call)) is not None:  # back after a restart
                    top_up(worker.index)
                continue
            index, chunk = in_flight.pop(call)
            try:
                results = self.workers.result(call)
            except WorkerDied as exc:
                self._died(chunk, exc, attempts, calls, failed)
                self.fleet.went_down(index, exc)
                for worker in self.fleet.up():
                    top_up(worker.index)
                continue
            for result in results:
                if result.error is not None:
                    failed[result.merge_id] = result.error
                else:
                    got[result.merge_id] = result
            top_up(index)
        for chunk in calls:  # every worker gone
            for task in chunk:
                failed[task.merge_id] = "not scored: every merge worker died"
        return got, failed

    def _died(self, chunk, exc, attempts, calls, failed) -> None:
        """A call whose worker died goes again (first in line), up to `task_retries` times."""
        key = chunk[0].merge_id
        attempts[key] = attempts.get(key, 0) + 1
        if attempts[key] > self.retries:
            for task in chunk:
                failed[task.merge_id] = f"worker died {attempts[key]} times scoring it: {exc}"
        else:
            calls.appendleft(chunk)


class TrialRounds:
    """A search's candidates scored in the race's windows, one round at a time, for the pruner:
    what each has seen, and which examples that is."""

    def __init__(self, plan: Plan):
        self.windows = race_windows(plan)
        self.sizes = set_sizes(plan)
        self.full = window_size(self.sizes, 0, max(self.sizes.values()))
        self.seen: dict[str, dict[str, dict[str, list]]] = {}

    def add(self, merge_id: str, examples: dict[str, dict[str, list]]) -> tuple[dict, dict]:
        """A window's scores added to what the candidate saw: (metrics, examples) so far."""
        seen = self.seen.setdefault(merge_id, {})
        racing.extend(seen, examples)
        return racing.metrics_of(seen), seen

    def with_seen(self, task: MergeTask, index: int) -> MergeTask:
        """The candidate after its last round, carrying what those rounds scored."""
        stop = self.windows[index].stop
        rest = Window(self.windows[0].seed, stop, max(self.sizes.values()))
        return replace(task, seen=SeenScores(rest, self.seen.get(task.merge_id, {})))

    def positions(self, examples: dict[str, dict[str, list]]) -> dict[str, list[int]]:
        """Each set's example indices, in the order of `examples` (a race prefix)."""
        seed = self.windows[0].seed
        counts = racing.seen_count(examples)
        return {
            name: racing.example_order(seed, name, self.sizes[name])[: counts[name]]
            for name in examples
        }

    def full_positions(self) -> dict[str, list[int]]:
        return {name: list(range(size)) for name, size in self.sizes.items()}
