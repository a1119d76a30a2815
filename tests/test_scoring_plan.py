"""What a scoring pass runs: each distinct request once, longest first, and each example's score
put back in the set's order, equal to the score it gets where it appears only once."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import demo_merge_spec, write_spec

from raymerge.cluster.worker import MergeWorker
from raymerge.score import scorer
from raymerge.sweep.plan import load_plan


def _lines(path: Path, count: int) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:count]]


def _scores(demo_dir: Path, folder: Path, sets: dict[str, list[dict]], kinds: dict, monkeypatch):
    """Per-example scores of one merge of sums and upper on `sets`, and how many rows the model
    ran (all sets together)."""
    folder.mkdir()
    datasets = {}
    for name, examples in sets.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(example) + "\n" for example in examples))
        datasets[name] = {"path": str(path), "kind": kinds[name]}
    evaluate = {"datasets": datasets, "batch_size": 4, "max_length": 32}
    spec = demo_merge_spec(demo_dir, folder / "out", [[0.6, 0.8]], evaluate, ("sums", "upper"))
    plan = load_plan(write_spec(folder, spec))
    worker = MergeWorker(0, plan.worker_config())
    [task] = plan.tasks()
    merged = worker.merger.merge(task, worker.merger.inputs(task.adapters))
    rows = []
    run = scorer.target_logprobs

    def counted(model, batch, names):
        rows.append(batch[0].shape[0])
        return run(model, batch, names)

    monkeypatch.setattr(scorer, "target_logprobs", counted)
    [scores] = worker.scorer.score_merged([merged])
    monkeypatch.setattr(scorer, "target_logprobs", run)
    worker.close()
    return scores.examples, sum(rows)


def test_a_repeated_example_is_run_once_and_scored_as_where_it_appears_once(
    demo_dir, tmp_path, monkeypatch
):
    """The same 10 choice questions and 10 texts, once and twice over: the model runs the same
    rows either way, each copy's scores equal the single one's exactly, in the set's order."""
    choice = _lines(demo_dir / "eval" / "upper_choice.jsonl", 10)
    text = _lines(demo_dir / "eval" / "sums.jsonl", 10)
    kinds = {"qa": "choice", "lm": "text"}
    once, rows_once = _scores(
        demo_dir, tmp_path / "once", {"qa": choice, "lm": text}, kinds, monkeypatch
    )
    twice, rows_twice = _scores(
        demo_dir, tmp_path / "twice", {"qa": choice * 2, "lm": text * 2}, kinds, monkeypatch
    )
    assert rows_once == rows_twice == 10 * 4 + 10  # 4 choices a question, one row a text
    for name in ("qa", "lm"):
        for key, values in once[name].items():
            assert twice[name][key] == values * 2, (name, key)
