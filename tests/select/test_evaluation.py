"""Grading selections at equal kept fractions (noisy-caption rejection, target share) and `cliplab demo select`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cliplab.cli import main
from cliplab.data.synth import SynthSpec, render_sample
from cliplab.select.demo import main_shapes, target_samples
from cliplab.select.evaluation import Method, evaluate, format_table, kept_mask, standard_methods
from cliplab.select.recipes import Step

ROOT = Path(__file__).resolve().parents[2]


def test_standard_methods_keep_equal_fractions() -> None:
    methods = standard_methods([0.5, 0.7], normsim=True)
    assert [(m.name, m.fraction) for m in methods[:4]] == [
        ("random", 0.5),
        ("clipscore", 0.5),
        ("negclip", 0.5),
        ("negclip+normsim_inf", 0.5),
    ]
    assert methods[3].steps == (Step("negclip", 0.75), Step("normsim_inf", 0.5))
    assert len(standard_methods([0.5], normsim=False)) == 3
    rng = np.random.default_rng(0)
    scores = {k: rng.normal(size=101) for k in ("clipscore", "negclip", "normsim_inf")}
    for m in methods:
        assert kept_mask(m, scores, 101).sum() == int(m.fraction * 101), m


def test_a_perfect_filter_rejects_exactly_the_noisy_samples_and_random_matches_the_noisy_share() -> None:
    n = 1000
    noisy = np.arange(n) % 10 < 3  # 30% noisy
    score = {"negclip": np.where(noisy, -1.0, 1.0) + np.linspace(0, 0.1, n)}
    in_target = np.arange(n) % 2 == 0
    perfect = Method("negclip", 0.7, (Step("negclip", 0.7),))
    row = evaluate(perfect, kept_mask(perfect, score, n), noisy, in_target, None)
    assert (row["reject_precision"], row["reject_recall"]) == (1.0, 1.0) and "normsim_inf_mean" not in row
    half = Method("random", 0.5)
    rand = evaluate(half, kept_mask(half, score, n), noisy, in_target, score["negclip"])
    assert rand["reject_precision"] == pytest.approx(0.3, abs=0.05)
    assert rand["reject_recall"] == pytest.approx(0.5, abs=0.06)
    assert rand["target_share"] == pytest.approx(0.5, abs=0.06)
    table = format_table([row, rand], 0.3, 0.5)
    assert table.splitlines()[0].split() == ["method", "kept", "reject_precision", "reject_recall", "target_share"]
    assert table.splitlines()[1].split() == ["negclip", "0.700", "1.000", "1.000", "0.429"]  # 3 of 7 clean
    assert table.endswith("pool: 0.300 noisy captions, 0.500 of samples from the target's distribution")


def test_the_target_set_holds_only_the_target_shapes_and_pool_shapes_come_from_keys() -> None:
    spec = SynthSpec(num_samples=100, seed=2)
    samples = list(target_samples(spec, ("circle", "square"), 12))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(12)]
    assert {json.loads(s["json"])["labels"]["shape"] for s in samples} <= {"circle", "square"}
    pool = SynthSpec(num_samples=30, seed=1)
    truth = [json.loads(render_sample(pool, i)["json"])["labels"]["shape"] for i in range(30)]
    assert main_shapes(pool, [f"{i:09d}" for i in range(30)]).tolist() == truth


def test_demo_select_is_a_demo_subcommand(monkeypatch: pytest.MonkeyPatch) -> None:
    import cliplab.demo
    import cliplab.select.demo

    calls: dict[str, dict] = {}
    monkeypatch.setattr(cliplab.select.demo, "run_select_demo", lambda **kw: calls.setdefault("select", kw))
    monkeypatch.setattr(cliplab.demo, "run_demo", lambda **kw: calls.setdefault("train", kw))
    assert main(["demo", "select", "--pool-samples", "50", "--steps", "3", "--repeats", "2"]) == 0
    assert calls["select"]["pool_samples"] == 50 and calls["select"]["steps"] == 3 and calls["select"]["repeats"] == 2
    assert calls["select"]["train_steps"] is None  # run_select_demo's LOOP_STEPS
    calls.clear()
    assert main(["demo", "select", "--train-steps", "0"]) == 0 and calls["select"]["train_steps"] == 0
    assert main(["demo", "--steps", "3"]) == 0 and calls["train"]["steps"] == 3


@pytest.mark.slow
def test_demo_select_smoke(tmp_path: Path) -> None:
    """The whole demo at toy size in its own process (its own S3 endpoint and Ray): a teacher, a run, a table."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_", "MLFLOW_"))}
    env["PYTHONPATH"] = str(ROOT / "platform")
    cmd = [sys.executable, "-m", "cliplab.cli", "demo", "select", "--workdir", str(tmp_path / "w")]
    cmd += ["--steps", "2", "--train-samples", "200", "--pool-samples", "100", "--target-samples", "20"]
    cmd += ["--negclip-batch", "16", "--repeats", "2", "--train-steps", "0"]  # the closed loop: test_closeloop.py
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout[proc.stdout.index("method ") :].splitlines()
    assert lines[0].split()[:5] == ["method", "kept", "reject_precision", "reject_recall", "target_share"]
    rows = [line.split() for line in lines[1:9]]
    assert [(r[0], r[1]) for r in rows[:4]] == [
        ("random", "0.500"),
        ("clipscore", "0.500"),
        ("negclip", "0.500"),
        ("negclip+normsim_inf", "0.500"),
    ]
    assert [r[1] for r in rows[4:]] == ["0.700"] * 4 and lines[10].startswith("pool: ")
    job = lines[9].split()  # the job's own recipe: negclip top 0.5, then dedup
    assert job[0] == "negclip+dedup" and 0 < float(job[1]) <= 0.5
    assert "closed loop" not in proc.stdout

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'w' / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("cliplab-demo-select").experiment_id])
    assert run.info.status == "FINISHED" and "speed/score_negclip_samples_per_s" in run.data.metrics
    assert "demo_selection_table.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
