"""``vlm-eval``: fine-tuned runs, and the base model they started from, scored side by side on held-out shards.

    vlm-eval RUN_DIR [RUN_DIR ...] [--base] [--shards URLS] [--limit N] [--batch-size B]
             [--json OUT] [--device D] [--max-new-tokens K] [--answers | --no-answers] [--wandb]
    vlm-eval --sweep SWEEP_DIR [the same options]

Every row is scored on the same samples: the first run's validation shards (``data.val_urls``)
unless ``--shards`` names others (paths, brace patterns, globs or URLs, as in training; repeat the
flag for several). Columns: samples, the mean loss and perplexity over the assistant tokens
(computed as validation computes them), and, where the references are short (median at most three
words; ``--answers``/``--no-answers`` decide otherwise), exact match and token F1 of the greedy
answers to each sample's last assistant turn.

The comparison is written as ``eval.json`` into every run directory evaluated (``--json OUT``
writes it to OUT instead). ``--sweep`` evaluates every completed job of a multirun directory
(jobs of one model family side by side, each family on its own), writes each job's ``eval.json``
and the sweep's report again, whose table, CSV and Markdown then show the eval columns.
``--wandb`` adds the scores to each run's W&B run as summary keys ``eval/...``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlm.errors import ConfigError

from . import console
from .arguments import positive_int

if TYPE_CHECKING:
    from vlm.build.trained import TrainedRun
    from vlm.eval.comparison import ComparisonSettings
    from vlm.eval.report import EvalReport

DEFAULT_MAX_NEW_TOKENS = 16  # short answers (what exact match and F1 judge) end well before


class EvalArgumentError(ConfigError):
    """A flag of ``vlm-eval`` that cannot be used; the message names it."""

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-eval",
        description="Score fine-tuned runs, and the base model they started from, side by side on held-out shards.",
    )
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR", help="run directories written by vlm-train")
    parser.add_argument("--sweep", type=Path, metavar="SWEEP_DIR", help="evaluate every completed job of this multirun directory")
    parser.add_argument("--base", action="store_true", help="add a row for the base model (the first run's, quantized as it trained)")
    parser.add_argument("--shards", action="append", metavar="URLS",
                        help="held-out shards: path, brace pattern, glob or URL; repeatable (default: the first run's data.val_urls)")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="evaluate the first N usable samples only")
    parser.add_argument("--batch-size", type=positive_int, metavar="B",
                        help="samples per loss batch (default: the first run's data.val_batch_size)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the comparison here (default: RUN_DIR/eval.json of every run)")
    parser.add_argument("--device", metavar="D", help="where the models run, e.g. cpu, cuda, cuda:1 (default: cuda where there is one)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="K",
                        help=f"longest answer generated, in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--answers", action=argparse.BooleanOptionalAction, default=None,
                        help="judge answers by exact match and token F1 (default: when the references are short)")
    parser.add_argument("--wandb", action="store_true", help="add the scores to each run's W&B run as summary keys eval/...")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 done, 2 an argument, run directory or data that cannot be used)."""
    console.quiet_libraries()
    args = build_parser().parse_args(argv)
    from vlm.data.records import DataError

    try:
        if args.sweep is not None:
            return evaluate_sweep(args)
        return evaluate_runs(args)
    except (ConfigError, DataError) as error:
        print(f"vlm-eval: {error}", file=sys.stderr)
        return 2


# --------------------------------------------------------------------------- runs
def evaluate_runs(args: argparse.Namespace) -> int:
    if not args.runs:
        raise EvalArgumentError("name at least one RUN_DIR, or a sweep with --sweep SWEEP_DIR")
    runs = read_runs(args.runs)
    report = evaluate(runs, args)
    written = [report.write_json(args.json)] if args.json else [report.write_json(run.run_dir / "eval.json") for run in runs]
    _out().print("wrote " + ", ".join(str(path) for path in written))
    if args.wandb:
        log_to_wandb(report, runs)
    return 0


def read_runs(run_dirs: Sequence[Path]) -> list[TrainedRun]:
    """The runs, each with a saved adapter; :class:`~vlm.build.trained.RunDirError` before anything loads otherwise."""
    from vlm.build.trained import read_run

    runs = [read_run(path) for path in run_dirs]
    for run in runs:
        run.adapter_settings()
    return runs


def evaluate(runs: Sequence[TrainedRun], args: argparse.Namespace) -> EvalReport:
    """The comparison of ``runs`` as the flags ask, printed as a table."""
    from vlm.eval.comparison import compare

    urls = shard_urls(args.shards, runs[0])
    settings = comparison_settings(args, runs[0])
    with _progress() as progress:
        report = compare(runs, urls, settings, progress)
    _out().print(report.table())
    return report


def shard_urls(shards: list[str] | None, first: TrainedRun) -> list[str]:
    """Every shard URL of ``--shards``, or of the first run's ``data.val_urls``."""
    from vlm.data.datamodule import expand_urls

    if shards:
        urls, key = shards, "--shards"
    elif first.val_urls:
        urls, key = first.val_urls, f"data.val_urls of {first.run_dir}"
    else:
        raise EvalArgumentError(f"{first.run_dir} validated on no shards (data.val_urls is empty): name some with --shards")
    try:
        return expand_urls(urls, key)
    except ValueError as error:
        raise EvalArgumentError(str(error)) from None


def comparison_settings(args: argparse.Namespace, first: TrainedRun) -> ComparisonSettings:
    from vlm.eval.answers import GenerationSettings
    from vlm.eval.comparison import ComparisonSettings
    from vlm.eval.recorded import recorded_setting

    batch_size = args.batch_size or int(
        recorded_setting(first.run_dir, "data.val_batch_size") or recorded_setting(first.run_dir, "data.batch_size", 8)
    )
    return ComparisonSettings(
        batch_size=batch_size, limit=args.limit, answers=args.answers, base=args.base, device=device_of(args.device),
        generation=GenerationSettings(max_new_tokens=args.max_new_tokens),
    )


def device_of(flag: str | None) -> str:
    import torch

    if flag is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(flag)
    except (RuntimeError, ValueError):
        raise EvalArgumentError(f"--device={flag!r} is not a device (cpu, cuda, cuda:1, mps ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalArgumentError(f"--device={flag} asks for CUDA, which this machine does not have")
    return flag


def log_to_wandb(report: EvalReport, runs: Sequence[TrainedRun]) -> None:
    from vlm.configs import wandb_offline
    from vlm.eval.tracking import log_summary

    offline = wandb_offline()
    rows = {row["run_dir"]: row for row in report.to_dict()["rows"] if row["kind"] == "run"}
    for run in runs:
        folder = log_summary(run.run_dir, rows[str(run.run_dir.resolve())], offline)
        if offline:
            # Both folders of the one id: wandb sync uploads them in the order they started.
            _out().print(f"W&B is offline: upload the training's run with its scores by `wandb sync {folder.parent}/offline-run-*`")
        else:
            _out().print(f"W&B: eval/... added to the summary of {run.name}'s run")


# --------------------------------------------------------------------------- sweeps
def evaluate_sweep(args: argparse.Namespace) -> int:
    from vlm.sweeps.report import collect, print_table, write

    if args.runs:
        raise EvalArgumentError("give run directories or --sweep SWEEP_DIR, not both")
    try:
        jobs = collect(args.sweep)
    except FileNotFoundError as error:
        raise EvalArgumentError(f"--sweep: {error}") from None
    left_out = [job for job in jobs if job.status != "completed"]
    if left_out:
        _out().print(f"left out {len(left_out)} job(s) that did not complete: " + ", ".join(j.job for j in left_out))
    done = [args.sweep / job.job for job in jobs if job.status == "completed"]
    if not done:
        raise EvalArgumentError(f"--sweep: no job of {args.sweep} completed, so none has an adapter to evaluate")
    runs = read_runs(done)
    reports = []
    for family_runs in _by_family(runs):
        report = evaluate(family_runs, args)
        for run in family_runs:
            report.write_json(run.run_dir / "eval.json")
        reports.append(report)
        if args.wandb:
            log_to_wandb(report, family_runs)
    combined = args.json or args.sweep / "eval.json"
    combined.parent.mkdir(parents=True, exist_ok=True)
    combined.write_text(json.dumps({"sweep": str(args.sweep), "evaluations": [r.to_dict() for r in reports]}, indent=2) + "\n")
    rows = collect(args.sweep)
    paths = write(args.sweep, rows)
    print_table(rows)
    _out().print("wrote " + ", ".join(str(p) for p in [combined, *paths]) + ", and eval.json in every job evaluated")
    return 0


def _by_family(runs: Sequence[TrainedRun]) -> list[list[TrainedRun]]:
    groups: dict[str, list[TrainedRun]] = {}
    for run in runs:
        groups.setdefault(run.family.model_type, []).append(run)
    return list(groups.values())


# --------------------------------------------------------------------------- terminal
def _out() -> Any:
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=True)
    return out if out.is_terminal else Console(highlight=False, soft_wrap=True, width=160)


class _progress:
    """A transient progress bar per row on stderr (nothing where stderr is not a terminal)."""

    def __enter__(self) -> Callable[[str, int], Callable[[int], None]]:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())
        self.bar.__enter__()

        def start(name: str, total: int) -> Callable[[int], None]:
            task = self.bar.add_task(f"scoring {name}", total=total)
            return lambda n: self.bar.advance(task, n)

        return start

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)


if __name__ == "__main__":
    sys.exit(main())
