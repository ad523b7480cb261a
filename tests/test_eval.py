"""vlm-eval: answer metrics, the loss over assistant tokens equal to validation's, the base model
beside the fine-tuned runs, refusals, and the sweep path into vlm-sweep-report."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from vlm.cli.eval import main as vlm_eval
from vlm.cli.sweep_report import main as sweep_report
from vlm.eval.metrics import answers_are_short, exact_match, normalize_answer, token_f1
from vlm.eval.report import run_scores
from vlm.sweeps.report import collect, table


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("text, normalized", [
    ("Red", "red"),
    ("RED circle", "red circle"),
    ("red.", "red"),
    ("yes, it's red!", "yes its red"),
    ("¿qué?", "qué"),
    ("the circle", "circle"),
    ("A square and an apple", "square and apple"),
    ("theory thereafter banana", "theory thereafter banana"),  # articles only as whole words
    ("  two \t spaces\n", "two spaces"),
    ("", ""),
    ("The.", ""),
])
def test_normalization_lowers_case_drops_punctuation_and_articles_and_collapses_spaces(text, normalized):
    assert normalize_answer(text) == normalized


@pytest.mark.parametrize("prediction, reference, expected", [
    ("The red.", "red", 1.0),
    ("red", "blue", 0.0),
    ("red circle", "red", 0.0),
    ("", "", 1.0),
    ("", "red", 0.0),
    ("the", "", 1.0),  # nothing is left of either
])
def test_exact_match_compares_normalized_answers(prediction, reference, expected):
    assert exact_match(prediction, reference) == expected


@pytest.mark.parametrize("prediction, reference, expected", [
    ("red", "red", 1.0),
    ("red circle", "red square", 0.5),  # 1 common word: precision 1/2, recall 1/2
    ("red red circle", "red circle", 0.8),  # 2 common: precision 2/3, recall 1, F1 = 2·(2/3)/(5/3)
    ("red", "red circle", 2 / 3),  # precision 1, recall 1/2
    ("a red", "the red", 1.0),  # the articles go
    ("blue", "red", 0.0),
    ("", "", 1.0),
    ("", "red", 0.0),
    ("red", "", 0.0),
])
def test_token_f1_by_hand(prediction, reference, expected):
    assert token_f1(prediction, reference) == pytest.approx(expected)


def test_answers_are_short_when_the_median_reference_has_at_most_three_words():
    assert answers_are_short(["red", "3", "yes"])
    assert answers_are_short(["red", "blue", "a much longer free text answer"])  # median 1 word
    assert answers_are_short(["one two three"] * 3)
    assert not answers_are_short(["one two three four"] * 3)
    assert not answers_are_short([])


# --------------------------------------------------------------------------- the demo run
def copy_run(run_dir: Path, to: Path) -> Path:
    """The run without its Lightning checkpoints (evaluation reads the adapter)."""
    shutil.copytree(run_dir, to, ignore=shutil.ignore_patterns("checkpoints", "eval.json"))
    return to


@pytest.fixture(scope="module")
def demo_eval(demo_run, tmp_path_factory):
    """``vlm-eval <demo_run> --base`` once, on one thread: its JSON, stdout and time."""
    import torch

    out = tmp_path_factory.mktemp("demo-eval") / "eval.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    stdout = io.StringIO()
    try:
        from contextlib import redirect_stdout

        started = time.perf_counter()
        with redirect_stdout(stdout):
            code = vlm_eval([str(demo_run), "--base", "--json", str(out)])
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    assert code == 0, stdout.getvalue()
    return json.loads(out.read_text()), stdout.getvalue(), seconds


def test_the_fine_tuned_demo_run_answers_far_better_than_its_base(demo_eval, demo_run):
    report, stdout, _ = demo_eval
    base, tuned = report["rows"]
    assert (base["name"], base["kind"]) == ("base", "base")
    assert (tuned["name"], tuned["kind"]) == (demo_run.name, "run")
    assert report["answers"]["judged"] and report["answers"]["median_reference_words"] == 1
    assert tuned["exact_match"] - base["exact_match"] >= 0.20
    assert tuned["token_f1"] > base["token_f1"]
    assert tuned["loss"] < base["loss"]
    for column in ("model", "samples", "loss", "perplexity", "exact match", "token F1", "base", demo_run.name):
        assert column in stdout


def test_every_row_scores_the_same_samples_of_the_runs_validation_shards(demo_eval, demo_run):
    report, _, _ = demo_eval
    config = yaml.safe_load((demo_run / "config.yaml").read_text())
    shards = sorted(Path(config["data"]["val_urls"]).parent.glob("val-*.tar"))
    assert report["shards"] == [str(p) for p in shards]
    assert report["samples"] == 64 and report["skipped"] == {}
    assert {row["samples"] for row in report["rows"]} == {64}
    assert len({row["tokens"] for row in report["rows"]}) == 1


def test_the_loss_is_the_validation_loss_of_the_run_and_of_its_base(demo_eval, demo_run):
    report, _, _ = demo_eval
    metrics = json.loads((demo_run / "metrics.json").read_text())
    base, tuned = report["rows"]
    # The run validated before training (the base: its LoRA B matrices start at zero) and after.
    assert base["loss"] == pytest.approx(metrics["initial_val_loss"], rel=1e-5)
    assert tuned["loss"] == pytest.approx(metrics["final_val_loss"], rel=1e-5)
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"], rel=1e-6)


def test_the_loss_is_a_mean_over_tokens_whatever_the_batch_size(demo_run, tmp_path, one_cpu_thread):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    out = tmp_path / "eval.json"
    assert vlm_eval([str(demo_run), "--batch-size", "5", "--no-answers", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    # Equal up to rounding: the tiny model computes in bfloat16, whose sums depend on the batch's shape.
    assert row["loss"] == pytest.approx(metrics["final_val_loss"], rel=2e-3)
    assert row["exact_match"] is None and row["token_f1"] is None


def test_evaluating_the_demo_run_with_its_base_takes_seconds(demo_eval):
    _, _, seconds = demo_eval
    assert seconds < 30  # measured 4-10 s on one busy core: two loads, 128 losses, 128 answers (the base never stops early)


def test_bad_samples_and_shards_are_skipped_and_counted(demo_run, tmp_path, one_cpu_thread, capsys):
    bad = tmp_path / "bad.tar"
    with tarfile.open(bad, "w") as tar:
        payload = b"{not json"
        member = tarfile.TarInfo("broken.json")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    unreadable = tmp_path / "garbage.tar"
    unreadable.write_bytes(b"this is not a tar archive" * 40)
    config = yaml.safe_load((demo_run / "config.yaml").read_text())
    out = tmp_path / "eval.json"
    code = vlm_eval([str(demo_run), "--shards", str(bad), "--shards", str(unreadable), "--shards",
                     config["data"]["val_urls"], "--limit", "8", "--no-answers", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["samples"] == 8
    assert report["skipped"] == {"bad json": 1, "unreadable shard": 1}
    assert "skipped 1 bad json, 1 unreadable shard" in capsys.readouterr().out


# --------------------------------------------------------------------------- refusals
def test_runs_of_different_families_are_refused_before_anything_loads(demo_run, tmp_path, capsys):
    other = copy_run(demo_run, tmp_path / "llava_run")
    metrics = json.loads((other / "metrics.json").read_text())
    metrics["family"] = "llava"
    (other / "metrics.json").write_text(json.dumps(metrics))
    started = time.perf_counter()
    assert vlm_eval([str(demo_run), str(other)]) == 2
    message = capsys.readouterr().err
    assert "different model families" in message and "qwen2_vl" in message and "llava" in message
    assert message.count("\n") == 1
    assert time.perf_counter() - started < 5
    assert not (other / "eval.json").exists()


def test_a_run_without_validation_shards_needs_shards(demo_run, tmp_path, capsys):
    run = copy_run(demo_run, tmp_path / "run")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["val_urls"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert vlm_eval([str(run)]) == 2
    assert "--shards" in capsys.readouterr().err
    assert vlm_eval([str(run), "--shards", str(tmp_path / "nothing-*.tar")]) == 2
    error = capsys.readouterr().err
    assert "--shards" in error and "matches no file" in error


def test_a_directory_that_is_no_run_is_refused(tmp_path, capsys):
    assert vlm_eval([str(tmp_path)]) == 2
    assert "metrics.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- sweeps and W&B
def fake_sweep(demo_run: Path, root: Path, ranks: tuple[int, ...] = (16, 8)) -> Path:
    """A multirun directory of jobs ``0``, ``1`` ... copied from the demo run, differing in their overrides."""
    sweep = root / "sweep"
    for job, rank in enumerate(ranks):
        job_dir = copy_run(demo_run, sweep / str(job))
        (job_dir / ".hydra").mkdir()
        (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"lora.r={rank}"]))
    return sweep


def test_a_sweep_is_evaluated_job_by_job_and_its_report_gains_the_eval_columns(demo_run, tmp_path, one_cpu_thread,
                                                                               monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sweep = fake_sweep(demo_run, tmp_path)
    assert vlm_eval(["--sweep", str(sweep), "--limit", "16", "--wandb"]) == 0
    capsys.readouterr()

    first, second = (run_scores(sweep / job) for job in ("0", "1"))
    assert first["run_dir"] == str((sweep / "0").resolve()) and second["run_dir"] == str((sweep / "1").resolve())
    # The same adapter on a base it was taken off and attached to again scores the same.
    for key in ("samples", "tokens", "loss", "exact_match", "token_f1"):
        assert first[key] == pytest.approx(second[key], rel=1e-6), key
    assert first["samples"] == 16

    assert sweep_report([str(sweep)]) == 0
    shown = capsys.readouterr().out
    header, _ = table(collect(sweep))
    for column in ("eval_loss", "eval_perplexity", "eval_exact_match", "eval_token_f1"):
        assert column in header
    with open(sweep / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["lora.r"] for row in rows] == ["16", "8"]
    assert float(rows[0]["eval_loss"]) == pytest.approx(first["loss"])
    assert float(rows[1]["eval_exact_match"]) == pytest.approx(second["exact_match"])
    assert "eval_loss" in (sweep / "summary.md").read_text()
    assert "eval_" in shown

    # Each job's scores went into an offline W&B run of the training run's id, beside the training's.
    for job in ("0", "1"):
        folders = sorted((sweep / job / "wandb").glob("offline-run-*"))
        assert len(folders) == 2
        ids = {next(folder.glob("run-*.wandb")).stem for folder in folders}
        assert len(ids) == 1
        records = next(folders[-1].glob("run-*.wandb")).read_bytes()
        assert b"eval/loss" in records and b"eval/exact_match" in records


def test_a_sweep_report_without_evaluations_keeps_its_columns(demo_run, tmp_path):
    sweep = fake_sweep(demo_run, tmp_path, ranks=(4,))
    header, _ = table(collect(sweep))
    assert not [column for column in header if column.startswith("eval_")]
