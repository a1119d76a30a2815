"""Evaluation of every merge on the held base model, references, and the report."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import write_spec

from raymerge.cluster.driver import run_sweep
from raymerge.errors import InputError
from raymerge.report.pareto import pareto_front
from raymerge.report.report import build_report
from raymerge.store.manifest import read_manifest, read_references
from raymerge.sweep.plan import load_plan

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _eval_spec(demo_dir: Path, output: str, **overrides) -> dict:
    spec = {
        "base_model": str(demo_dir / "world" / "base"),
        "adapters": {t: str(demo_dir / "world" / "adapters" / t) for t in ("sums", "reverse")},
        "combinations": [
            {
                "adapters": ["sums", "reverse"],
                "weights": [[0.5, 0.5], [0.8, 0.2]],
                "methods": [{"combination_type": ["linear", "svd"]}],
            }
        ],
        "output": output,
        "workers": 2,
        "gpus_per_worker": 0,
        "evaluate": {
            "datasets": {t: str(demo_dir / "eval" / f"{t}.jsonl") for t in ("sums", "reverse")},
            "max_samples": 32,
            "batch_size": 8,
            "max_length": 32,
        },
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def scored(demo_dir, ray_cluster, tmp_path_factory):
    """The same sweep with evaluation, run twice into two outputs."""
    root = tmp_path_factory.mktemp("scored")
    plans = []
    for name in ("one", "two"):
        plan = load_plan(write_spec(root, _eval_spec(demo_dir, str(root / name)), f"{name}.yaml"))
        assert run_sweep(plan).done == 4
        plans.append(plan)
    return plans


def test_metrics_are_present_finite_and_deterministic(scored):
    one, two = ({line["merge_id"]: line for line in read_manifest(p.output)} for p in scored)
    assert sorted(one) == sorted(two) and len(one) == 4
    for merge_id, line in one.items():
        assert set(line["metrics"]) == {"sums", "reverse"}
        for scores in line["metrics"].values():
            assert math.isfinite(scores["loss"]) and scores["loss"] > 0
            assert scores["perplexity"] == pytest.approx(math.exp(scores["loss"]), rel=1e-5)
            assert scores["tokens"] > 0
        assert line["metrics"] == two[merge_id]["metrics"]
        record = json.loads(Path(line["path"], "merge.json").read_text())
        assert record["metrics"] == line["metrics"]


def test_references_score_the_base_and_each_adapter_alone(scored):
    references = read_references(scored[0].output)
    assert set(references["adapters"]) == {"sums", "reverse"}
    base = references["base"]
    for task in ("sums", "reverse"):
        alone = references["adapters"][task][task]["loss"]
        assert alone < base[task]["loss"] - 0.5, task  # trained on it: clearly better
    # Each adapter is specialised: the other task's adapter does worse on it.
    assert (
        references["adapters"]["sums"]["sums"]["loss"]
        < references["adapters"]["reverse"]["sums"]["loss"]
    )


def test_missing_tokenizer_or_eval_set_is_refused_at_plan_time(demo_dir, tmp_path):
    bare = tmp_path / "bare-base"
    shutil.copytree(demo_dir / "world" / "base", bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink(missing_ok=True)
    spec = _eval_spec(demo_dir, str(tmp_path / "out"), base_model=str(bare))
    spec["evaluate"]["datasets"]["reverse"] = str(tmp_path / "nope.jsonl")
    with pytest.raises(InputError) as caught:
        load_plan(write_spec(tmp_path, spec))
    text = str(caught.value)
    assert "has no tokenizer" in text and "tokenizer.save_pretrained" in text
    assert "evaluate.datasets.reverse" in text and "nope.jsonl" in text


def test_leaderboard_csv_and_html(scored, tmp_path):
    report = build_report(scored[0].output, out=str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(report.csv_uri).read_text())))
    assert len(rows) == 4 and [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    means = [float(r["mean_loss"]) for r in rows]
    assert means == sorted(means)
    for row in rows:
        assert float(row["mean_loss"]) == pytest.approx(
            (float(row["sums.loss"]) + float(row["reverse.loss"])) / 2, abs=1e-6
        )
    for row in rows:  # every number has its error bar, the objective's too
        for column in ("objective", "sums.loss", "reverse.loss", "sums.perplexity"):
            assert 0 < float(row[f"{column}_stderr"]) < float(row[column]), (column, row)
    assert rows[0]["tied"] == "True"
    # The best merge against the base model and each adapter alone, on the same examples.
    verdicts = {v["reference"]: v for v in report.verdicts}
    assert set(verdicts) == {"base model", "sums alone", "reverse alone"}
    for verdict in verdicts.values():
        assert verdict["low"] < verdict["difference"] < verdict["high"]
        assert verdict["verdict"] in ("better", "worse", "not distinguishable")
        assert verdict["reference"] in verdict["text"]
        expected = "better" if verdict["low"] > 0 else "worse" if verdict["high"] < 0 else None
        assert verdict["verdict"] == (expected or "not distinguishable")
        # mean_loss is minimised: positive means the best merge's loss is lower.
        assert verdict["difference"] == pytest.approx(
            verdict["objective"] - float(rows[0]["objective"]), abs=1e-5
        )
    by_sums = build_report(scored[0].output, out=str(tmp_path / "s"), metric="sums").rows
    assert [r["sums.loss"] for r in by_sums] == sorted(r["sums.loss"] for r in by_sums)
    page = Path(report.html_uri).read_text()
    assert page.count('src="data:image/png;base64,') == 2
    assert "Pareto" in page or "Trade-off" in page
    with pytest.raises(InputError, match="unknown metric 'accuracy'"):
        build_report(scored[0].output, out=str(tmp_path / "x"), metric="accuracy")


def test_pareto_front():
    points = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (4.0, 1.0), (2.5, 2.5), (1.0, 6.0)]
    assert sorted(pareto_front(points)) == [0, 1, 3]


def test_report_from_a_manifest_on_s3(demo_dir, ray_cluster, s3, s3_endpoint, tmp_path):
    fs, bucket = s3
    spec = _eval_spec(
        demo_dir,
        f"s3://{bucket}/sweeps/scored",
        storage_options={"client_kwargs": {"endpoint_url": s3_endpoint}},
    )
    spec["combinations"][0]["weights"] = [[0.5, 0.5]]
    plan = load_plan(write_spec(tmp_path, spec))
    assert run_sweep(plan).done == 2
    result = subprocess.run(
        [sys.executable, "-m", "raymerge", "report", plan.output],
        env={**os.environ, "AWS_ENDPOINT_URL": s3_endpoint},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "Best merges by mean_loss" in result.stdout
    assert f"Report: s3://{bucket}/sweeps/scored/report.html" in result.stdout
    rows = list(
        csv.DictReader(io.StringIO(fs.cat_file(f"{bucket}/sweeps/scored/leaderboard.csv").decode()))
    )
    assert len(rows) == 2
    page = fs.cat_file(f"{bucket}/sweeps/scored/report.html").decode()
    assert page.count("data:image/png;base64,") == 2


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)
def test_the_report_renders_in_headless_chromium_with_its_images(scored, tmp_path):
    report = build_report(scored[0].output, out=str(tmp_path))
    url = Path(report.html_uri).as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert "raymerge report (2/2 images)" in dom.stdout, dom.stderr[-2000:]
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1400,2400", url],
        capture_output=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 20_000
