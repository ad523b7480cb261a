"""The report of a sweep: one row per job (failed and unfinished ones too), as ``summary.csv``,
``summary.md`` and ``summary.png`` in the sweep directory, and a table in the terminal."""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlm.eval.report import run_scores

GIB = 1024**3
# Metric columns, in order: (column, key in metrics.json, scale).
METRIC_COLUMNS = (
    ("final_val_loss", "final_val_loss", 1),
    ("initial_val_loss", "initial_val_loss", 1),
    ("peak_memory_gib", "peak_memory_bytes", 1 / GIB),
    ("tokens_per_s", "tokens_per_s", 1),
    ("wall_time_s", "wall_time_s", 1),
    ("trainable_params", "trainable_params", 1),
)
# Columns of a job's evaluation (``vlm-eval``, the job's row of its ``eval.json``), shown once a job has one.
EVAL_COLUMNS = (
    ("eval_loss", "loss"),
    ("eval_perplexity", "perplexity"),
    ("eval_exact_match", "exact_match"),
    ("eval_token_f1", "token_f1"),
)
SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")


@dataclass
class JobRow:
    job: str  # the job's directory name
    status: str  # completed | failed | incomplete (no metrics.json: still running, or killed)
    overrides: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)  # the job's scores from vlm-eval, if evaluated

    @property
    def error(self) -> str:
        if self.status == "incomplete":
            return "no metrics.json: the job is still running, or was killed before it could write one"
        return str(self.metrics.get("error") or "")

    def metric(self, key: str, scale: float = 1) -> float | None:
        value = self.metrics.get(key)
        return value * scale if isinstance(value, int | float) and not isinstance(value, bool) else None

    def eval_score(self, key: str) -> float | None:
        value = self.evaluation.get(key)
        return value if isinstance(value, int | float) and not isinstance(value, bool) else None

    @property
    def policy(self) -> str:
        return str(self.metrics.get("quant_policy") or self.overrides.get("quant") or "?")

    @property
    def rank(self) -> float | None:
        value = self.metrics.get("lora_r", self.overrides.get("lora.r"))
        try:
            return float(value)
        except (TypeError, ValueError):
            return None


def collect(sweep_dir: str | Path) -> list[JobRow]:
    """Every job directory under ``sweep_dir`` (one holding ``.hydra/`` or ``metrics.json``), in job order."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep directory at {sweep_dir}")
    rows = []
    for job_dir in sorted(sweep_dir.iterdir(), key=_job_order):
        if not job_dir.is_dir() or not ((job_dir / ".hydra").is_dir() or (job_dir / "metrics.json").is_file()):
            continue
        overrides = _read_overrides(job_dir / ".hydra" / "overrides.yaml")
        metrics_path = job_dir / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        status = metrics.get("status", "incomplete") if metrics else "incomplete"
        evaluation = run_scores(job_dir) or {}
        rows.append(JobRow(job=job_dir.name, status=status, overrides=overrides, metrics=metrics, evaluation=evaluation))
    if not rows:
        raise FileNotFoundError(f"{sweep_dir} holds no job directories (subdirectories with .hydra/ or metrics.json)")
    return rows


def swept_keys(rows: Sequence[JobRow]) -> list[str]:
    """Override keys whose value differs between jobs: what the sweep varied."""
    keys = sorted({key for row in rows for key in row.overrides})
    return [key for key in keys if len({row.overrides.get(key) for row in rows}) > 1]


def table(rows: Sequence[JobRow], exact: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the summary: numbers in full (``exact``, for the CSV) or to 4 digits."""
    varied = swept_keys(rows)
    scored = [(c, key) for c, key in EVAL_COLUMNS if any(row.eval_score(key) is not None for row in rows)]
    header = ["job", "status", *varied, *(c for c, _, _ in METRIC_COLUMNS), *(c for c, _ in scored), "error"]
    show = _exact if exact else _format
    cells = []
    for row in rows:
        metrics = [show(row.metric(key, scale)) for _, key, scale in METRIC_COLUMNS]
        evaluation = [show(row.eval_score(key)) for _, key in scored]
        cells.append([row.job, row.status, *(row.overrides.get(k, "") for k in varied), *metrics, *evaluation, row.error])
    return header, cells


def write(sweep_dir: str | Path, rows: Sequence[JobRow] | None = None) -> list[Path]:
    """``summary.csv``, ``summary.md`` and ``summary.png`` in ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = list(rows) if rows is not None else collect(sweep_dir)
    csv_path, md_path, png_path = (sweep_dir / name for name in SUMMARY_FILES)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        header, cells = table(rows, exact=True)
        writer.writerow(header)
        writer.writerows(cells)
    header, cells = table(rows)
    md_path.write_text(_markdown(sweep_dir, rows, header, cells))
    plot(rows, png_path)
    return [csv_path, md_path, png_path]


def print_table(rows: Sequence[JobRow], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: room for every column
            console = Console(width=200)
    header, cells = table(rows)
    view = Table(title=_counts(rows), title_justify="left")
    for column in header:
        view.add_column(column, overflow="fold")
    for row, line in zip(rows, cells):
        view.add_row(*line, style=None if row.status == "completed" else "red")
    console.print(view)


def plot(rows: Sequence[JobRow], path: str | Path) -> None:
    """Validation loss against peak memory and against LoRA rank, one series per skip policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (by_memory, by_rank) = plt.subplots(1, 2, figsize=(12, 4.5))
    done = [row for row in rows if row.metric("final_val_loss") is not None]
    for policy in sorted({row.policy for row in done}):
        series = [row for row in done if row.policy == policy]
        memory = [(row.metric("peak_memory_bytes", 1 / GIB), row.metric("final_val_loss")) for row in series]
        memory = [(m, v) for m, v in memory if m is not None]
        if memory:
            by_memory.scatter(*zip(*memory), label=policy)
        ranked = sorted((row.rank, row.metric("final_val_loss")) for row in series if row.rank is not None)
        if ranked:
            by_rank.plot(*zip(*ranked), marker="o", label=policy)
    by_memory.set(xlabel="peak memory (GiB)", ylabel="final validation loss", title="loss against memory")
    by_rank.set(xlabel="LoRA rank", ylabel="final validation loss", title="loss against rank")
    if any(row.rank for row in done):
        by_rank.set_xscale("log", base=2)
    for axis in (by_memory, by_rank):
        axis.grid(True, alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(title="quant policy", fontsize=8)
    figure.suptitle(_counts(rows), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------- helpers
def _counts(rows: Sequence[JobRow]) -> str:
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row.status] = by_status.get(row.status, 0) + 1
    return f"{len(rows)} jobs: " + ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))


def _markdown(sweep_dir: Path, rows: Sequence[JobRow], header: list[str], cells: list[list[str]]) -> str:
    lines = [f"# Sweep {sweep_dir.name}", "", f"`{sweep_dir}`: {_counts(rows)}.", ""]
    # Only a completed job can be best: a failed one may have validated before it failed.
    best = min((row for row in rows if row.status == "completed" and row.metric("final_val_loss") is not None),
               key=lambda row: row.metric("final_val_loss"), default=None)
    if best is not None:
        chosen = ", ".join(f"{k}={best.overrides[k]}" for k in swept_keys(rows) if k in best.overrides)
        lines += [f"Lowest final validation loss: {best.metric('final_val_loss'):.4g} (job {best.job}{': ' + chosen if chosen else ''}).", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in line) + " |" for line in cells]
    failed = [row for row in rows if row.status != "completed"]
    if failed:
        lines += ["", "## Jobs that did not complete", ""]
        lines += [f"- job {row.job} ({row.status}): {row.error}" for row in failed]
    results = sweep_dir / "optimization_results.yaml"
    if results.is_file():
        lines += ["", "## Optuna's best trial", "", "```yaml", results.read_text().strip(), "```"]
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _format(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if float(value).is_integer() and abs(value) >= 1000:
        return str(int(value))
    return f"{value:.4g}"


def _exact(value: float | None) -> str:
    return "" if value is None else repr(value)


def _read_overrides(path: Path) -> dict[str, str]:
    if not path.is_file():
        return {}
    overrides = {}
    for item in yaml.safe_load(path.read_text()) or []:
        key, _, value = str(item).partition("=")
        overrides[key.lstrip("+~")] = value
    return overrides


def _job_order(path: Path) -> tuple[int, str]:
    match = re.match(r"\d+", path.name)
    return (int(match.group()) if match else 1 << 30, path.name)


# --------------------------------------------------------------------------- Hydra callback
try:
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover - hydra is a dependency; this only keeps the module importable
    _HydraCallback = object


EXIT_JOBS_FAILED = 3


class WriteSweepReport(_HydraCallback):
    """At the end of a multirun, the sweep report, in the sweep directory. When a job did not
    complete, says so in one line and makes the sweep exit with code 3 (2 is an invalid config)."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        import sys

        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            rows = collect(sweep_dir)
        except FileNotFoundError:
            return
        write(sweep_dir, rows)
        print_table(rows)
        failed = [row for row in rows if row.status != "completed"]
        message = f"sweep report: {sweep_dir / 'summary.md'}"
        if failed:
            message += f"; {len(failed)} of {len(rows)} jobs did not complete (their errors are in it)"
        print(message, file=sys.stderr)
        if failed:
            sys.exit(EXIT_JOBS_FAILED)
