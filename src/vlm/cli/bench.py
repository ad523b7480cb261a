"""``vlm-bench``: the whole training step of this framework and its peers, side by side in one run.

Each recipe (:mod:`vlm.bench.recipes`) runs in a process of its own on the same random-init
full-size checkpoint and the same batch, at each ``--tokens`` length. Printed as a table per length
(with each recipe's tokens/s and peak memory against Unsloth's where Unsloth ran), written to
``--out/bench.json`` with the device, versions and command, and plotted (tokens/s and peak memory
against sequence length) to ``--out/bench.png``. ``--longest`` then finds each recipe's longest
trainable sequence by bisection. Overrides after the options configure this framework's recipe as
they would configure ``vlm-train``:

    vlm-bench --family mllama --tokens 2048 16384 kernels=all
    vlm-bench --recipes unsloth ours --tokens 2048 --longest --longest-max 131072
    vlm-bench --smoke                                   # the tiny variant on the CPU, in a minute
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from vlm.bench.memory_timeline import timeline_table
from vlm.bench.recipes import PEERS_AND_OURS, RECIPES
from vlm.bench.work import BenchWork, family_work
from vlm.bench.worker import RESULT_PREFIX
from vlm.cli.arguments import positive_int

PEER = "unsloth"
# What makes this framework's step optimize as the peers' recipes do: AdamW at a constant 2e-4, no clipping.
SAME_OPTIMIZATION = ("scheduler.warmup_steps=0", "scheduler.min_lr_ratio=1.0", "trainer.gradient_clip_val=null",
                     "optimizer.lr=2e-4", "optimizer.weight_decay=0.0")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vlm-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="mllama", help="model family (model_type); default mllama")
    parser.add_argument("--tokens", type=positive_int, nargs="+", default=[2048], help="sequence lengths")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default 1 (LLaVA: 2, as its anchors)")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(PEERS_AND_OURS),
                        help="default: all but standard-bf16, the standard recipe without its fp32 upcast: a control "
                             "whose loss curve shows what bf16 alone moves")
    parser.add_argument("--steps", type=positive_int, default=8, help="steps per recipe, warm-up included")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    parser.add_argument("--longest", action="store_true", help="bisect each recipe's longest trainable sequence")
    parser.add_argument("--longest-max", type=positive_int, default=131072)
    parser.add_argument("--longest-resolution", type=positive_int, default=1024)
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds per recipe process")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"))
    parser.add_argument("--model-dir", default=None, help="where the random-init checkpoint is kept")
    parser.add_argument("--smoke", action="store_true", help="the family's tiny variant on the CPU")
    parser.add_argument("--same-optimization", action="store_true",
                        help="this framework's recipe optimizes as the peers do (constant lr, no clipping), so that "
                             "its loss curve can be compared with the standard recipe's step by step")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step of each recipe after the timed ones; its op tables (by GPU and by "
                             "host time) go to --out/profile/<recipe>-<tokens>/")
    parser.add_argument("--memory-timeline", action="store_true",
                        help="on CUDA, follow the allocated memory through one more step of each recipe, part by part "
                             "(vision tower, projector, language model, head, backward): where its peak lies")
    parser.add_argument("overrides", nargs="*", help="train-config overrides for this framework's recipe")
    options, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(options)
    args.overrides = [*args.overrides, *overrides]
    if args.same_optimization:  # first: an override the user gives still wins
        args.overrides = [*SAME_OPTIMIZATION, *args.overrides]
    if args.warmup < 0 or args.warmup >= args.steps:
        parser.error(f"--warmup {args.warmup}: must be at least 0 and below --steps {args.steps}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        parser.error(f"not an override (key=value): {' '.join(bad)}")
    return args


# A Hydra override: key (dotted, perhaps prefixed + ++ or ~) = value.
_OVERRIDE = re.compile(r"^(\+\+|\+|~)?[A-Za-z_][\w.]*=")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """The options, and the train-config overrides wherever they stand: after ``--recipes a b`` or ``--tokens``,
    which take any number of values, argparse would read an override as one more value."""
    overrides = [arg for arg in argv if _OVERRIDE.match(arg)]
    return [arg for arg in argv if not _OVERRIDE.match(arg)], overrides


def run_worker(recipe: str, work: BenchWork, steps: int, warmup: int, overrides: list[str], timeout: int,
               log_path: Path, profile_to: Path | None = None, memory_timeline: bool = False) -> dict[str, Any]:
    """One recipe in its own process; its measurement (a failed process is a ``failed`` row)."""
    spec = {"recipe": recipe, "work": asdict(work), "steps": steps, "warmup": warmup,
            "overrides": overrides if recipe == "ours" else [],
            "profile_to": None if profile_to is None else str(profile_to), "memory_timeline": memory_timeline}
    command = [sys.executable, "-m", "vlm.bench.worker", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1", "WANDB_MODE": "disabled"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        output, error, code = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired as expired:
        output, error, code = _text(expired.stdout), _text(expired.stderr), None
    with open(log_path, "a") as log:
        log.write(f"$ {recipe} {work}\n{output}\n{error}\n")
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    last = next((line for line in reversed(error.splitlines()) if line.strip()), "")
    reason = f"timed out after {timeout} s" if code is None else f"exit code {code}: {last}"[:500]
    return {"recipe": recipe, "family": work.family, "tokens": work.tokens, "batch_size": work.batch_size,
            "status": "failed", "reason": reason}


def _text(value: bytes | str | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def longest_sequence(recipe: str, args: argparse.Namespace, base: BenchWork, known_ok: int | None,
                     log_path: Path) -> dict[str, Any]:
    """The longest length (to ``--longest-resolution``) at which ``recipe`` trains two steps, by
    bisection between the longest measured length that ran and ``--longest-max``."""
    from dataclasses import replace

    step = args.longest_resolution
    probes: list[tuple[int, str]] = []

    def fits(tokens: int) -> bool:
        result = run_worker(recipe, replace(base, tokens=tokens), 2, 1, args.overrides, args.timeout, log_path)
        probes.append((tokens, result["status"]))
        print(f"  {recipe} at {tokens}: {result['status']}", flush=True)
        return result["status"] == "ok"

    low = known_ok
    if low is None:
        return {"recipe": recipe, "longest": None, "probes": probes, "reason": "no measured length ran"}
    high = args.longest_max
    if fits(high):
        return {"recipe": recipe, "longest": high, "probes": probes, "reason": "--longest-max runs"}
    while high - low > step:
        middle = (low + high) // 2 // step * step
        if middle <= low:
            break
        if fits(middle):
            low = middle
        else:
            high = middle
    return {"recipe": recipe, "longest": low, "probes": probes, "reason": f"fails at {high}"}


# --------------------------------------------------------------------------- reporting
def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table per length: each recipe's step, tokens/s, memory, and ratios to Unsloth's."""
    lines = ["| tokens | recipe | step | tokens/s | peak allocated | peak reserved | weights | "
             f"tokens/s vs {PEER} | peak vs {PEER} | first losses |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for tokens in sorted({r["tokens"] for r in results}):
        rows = [r for r in results if r["tokens"] == tokens]
        peer = next((r for r in rows if r["recipe"] == PEER and r["status"] == "ok"), None)
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {tokens} | {r['recipe']} | {r['status']}: {r.get('reason', '')[:80]} |  |  |  |  |  |  |  |")
                continue
            speed = _ratio(r["tokens_per_s"], peer and peer["tokens_per_s"])
            memory = _ratio(r.get("peak_allocated_GB"), peer and peer.get("peak_allocated_GB"))
            losses = ", ".join(f"{x:.3f}" for x in r.get("first_losses", ())[:3])
            lines.append(
                f"| {tokens} | {r['recipe']} | {r['step_s']:.3f} s | {r['tokens_per_s']:.0f} | "
                f"{_gb(r.get('peak_allocated_GB'))} | {_gb(r.get('peak_reserved_GB'))} | {_gb(r.get('weights_GB'))} | "
                f"{speed} | {memory} | {losses} |"
            )
    return "\n".join(lines)


def _beside(results: list[dict[str, Any]], name: str,
            usable: Callable[[dict[str, Any]], bool] = bool) -> Iterator[tuple[int, dict, str, dict]]:
    """``(tokens, name's row, other recipe, its row)`` for each length where ``name`` ran, and each other recipe
    that ran there; only rows that finished and that ``usable`` accepts."""
    for tokens in sorted({r["tokens"] for r in results}):
        ran = {r["recipe"]: r for r in results if r["tokens"] == tokens and r["status"] == "ok" and usable(r)}
        if name in ran:
            yield from ((tokens, ran[name], other, row) for other, row in ran.items() if other != name)


def loss_agreement(results: list[dict[str, Any]], reference: str = "standard") -> list[dict[str, Any]]:
    """Per length, for each recipe that ran beside ``reference``: the largest relative difference between its loss
    and ``reference``'s at the same step, over the steps both ran, with the step where it lies (a model that
    memorises its batch ends at losses near 0, where a small gap is a large ratio) and the largest absolute
    difference."""
    rows = []
    for tokens, theirs, recipe, row in _beside(results, reference):
        pairs = list(zip(row["losses"], theirs["losses"], strict=False))
        relative = [abs(a - b) / abs(b) for a, b in pairs]
        step = max(range(len(pairs)), key=relative.__getitem__)
        rows.append({"recipe": recipe, "reference": reference, "tokens": tokens, "steps": len(pairs),
                     "max_relative_difference": relative[step], "at_step": step, "losses_there": list(pairs[step]),
                     "max_absolute_difference": max(abs(a - b) for a, b in pairs)})
    return rows


def first_grad_agreement(results: list[dict[str, Any]], recipe: str = "ours") -> list[dict[str, Any]]:
    """Per length, against each other recipe that ran: how far ``recipe``'s first grads are from the other's, weight
    by weight, where both started from the same LoRA weights (:mod:`vlm.bench.lora_init`). Weights whose grad is zero in the
    other (each A's: B starts at zero) are counted apart, as ``nonzero_where_zero`` where ``recipe``'s is not; by
    group, the layers' numbers left out (``language_model.layers.*.cross_attn.q_proj.lora_B.weight``): where a
    computation differs."""
    def started_alike(row: dict[str, Any]) -> bool:
        return bool(row.get("first_grad_norms")) and bool(row.get("shared_lora_init"))

    rows = []
    for tokens, mine, reference, row in _beside(results, recipe, started_alike):
        ours, theirs = mine["first_grad_norms"], row["first_grad_norms"]
        common = sorted(ours.keys() & theirs.keys())
        relative = {k: abs(ours[k] - theirs[k]) / theirs[k] for k in common if theirs[k] > 0}
        if not relative:
            continue
        groups: dict[str, list[float]] = {}
        for key, value in relative.items():
            groups.setdefault(re.sub(r"\.\d+\.", ".*.", key), []).append(value)
        worst = max(relative, key=relative.__getitem__)
        rows.append({
            "tokens": tokens, "recipe": recipe, "reference": reference, "compared": len(relative),
            "zero_in_both": sum(theirs[k] == 0 and ours[k] == 0 for k in common),
            "nonzero_where_zero": sum(theirs[k] == 0 and ours[k] != 0 for k in common),
            "only_in_one": len(ours.keys() ^ theirs.keys()),
            "median_relative_difference": statistics.median(relative.values()),
            "max_relative_difference": relative[worst], "at_weight": worst,
            "by_group": {group: statistics.median(values) for group, values in sorted(groups.items())},
        })
    return rows


def _gb(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} GB"


def _ratio(value: float | None, reference: float | None) -> str:
    return "–" if not value or not reference else f"{value / reference:.2f}×"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    for recipe in sorted({r["recipe"] for r in results}):
        ok = sorted((r for r in results if r["recipe"] == recipe and r["status"] == "ok"), key=lambda r: r["tokens"])
        if not ok:
            continue
        speed.plot([r["tokens"] for r in ok], [r["tokens_per_s"] for r in ok], marker="o", label=recipe)
        peaks = [(r["tokens"], r["peak_allocated_GB"]) for r in ok if r.get("peak_allocated_GB") is not None]
        if peaks:
            memory.plot(*zip(*peaks, strict=True), marker="o", label=recipe)
    for axis, label in ((speed, "tokens/s"), (memory, "peak allocated (GB)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("sequence length (tokens)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def environment() -> dict[str, Any]:
    import importlib.metadata as metadata

    import torch

    versions = {}
    for package in ("torch", "transformers", "peft", "bitsandbytes", "lightning", "triton", "unsloth", "liger-kernel"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return {"device": device, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "versions": versions, "command": " ".join(["vlm-bench", *sys.argv[1:]])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "bench.log"
    batch_size = args.batch_size or family_work(args.family).batch_size
    base = BenchWork(family=args.family, tokens=args.tokens[0], batch_size=batch_size, smoke=args.smoke,
                     model_dir=args.model_dir)
    context = environment()
    results = []
    for tokens in args.tokens:
        for recipe in args.recipes:
            work = BenchWork(**{**asdict(base), "tokens": tokens})
            print(f"{recipe} at {tokens} tokens × {batch_size} …", flush=True)
            profile_to = args.out / "profile" / f"{recipe}-{tokens}" if args.profile else None
            result = run_worker(recipe, work, args.steps, args.warmup, args.overrides, args.timeout, log_path, profile_to,
                                args.memory_timeline)
            results.append(result)
            # Written after every recipe: a benchmark cut short keeps what it measured.
            (args.out / "bench.json").write_text(json.dumps({**context, "partial": True, "results": results}, indent=2))
            print(f"  {result['status']}" + (f": {result['step_s']:.3f} s/step, {result['tokens_per_s']:.0f} tokens/s"
                                            if result["status"] == "ok" else f" ({result.get('reason', '')})"), flush=True)
            if result.get("build"):
                print(f"  build: {result['build']}", flush=True)
            if result.get("graph_breaks"):
                print("  graph breaks: " + "; ".join(f"{reason} ×{count}" for reason, count in result["graph_breaks"].items()),
                      flush=True)
            if result.get("host_phases_ms"):
                print("  host ms: " + ", ".join(f"{phase} {ms:.1f}" for phase, ms in result["host_phases_ms"].items()),
                      flush=True)
            if result.get("peak_by_phase_GB"):
                print("  peak GB: " + ", ".join(f"{phase} {gb:.2f}" for phase, gb in result["peak_by_phase_GB"].items()),
                      flush=True)
            if result.get("memory_timeline"):
                print(f"  memory through one more step:\n{timeline_table(result['memory_timeline'])}", flush=True)
            elif args.memory_timeline and result["status"] == "ok":
                print("  memory timeline: needs CUDA", flush=True)
    longest = []
    if args.longest:
        for recipe in args.recipes:
            ran = [r["tokens"] for r in results if r["recipe"] == recipe and r["status"] == "ok"]
            longest.append(longest_sequence(recipe, args, base, max(ran, default=None), log_path))
    agreement = loss_agreement(results)
    grads = first_grad_agreement(results)
    report = {**context, "work": {**asdict(base), "tokens": args.tokens}, "steps": args.steps,
              "warmup": args.warmup, "overrides": args.overrides, "results": results, "longest": longest,
              "loss_agreement": agreement, "first_grad_agreement": grads}
    (args.out / "bench.json").write_text(json.dumps(report, indent=2))
    markdown = table(results)
    timelines = [f"\n### Memory through one step: {r['recipe']} at {r['tokens']} tokens\n\n{timeline_table(r['memory_timeline'])}"
                 for r in results if r.get("memory_timeline")]
    (args.out / "bench.md").write_text(markdown + "\n" + "".join(f"{t}\n" for t in timelines))
    plot(results, args.out / "bench.png")
    print(f"\n{report['device']} · {args.family} · batch {batch_size} · median of steps {args.warmup + 1}–{args.steps}")
    print(markdown)
    for row in agreement:
        theirs, reference = row["losses_there"]
        print(f"loss, {row['recipe']} against {row['reference']} at {row['tokens']} tokens over {row['steps']} steps: "
              f"at most {row['max_relative_difference']:.2%} apart "
              f"(step {row['at_step']}: {theirs:.4g} against {reference:.4g}), "
              f"at most {row['max_absolute_difference']:.3g} in absolute terms"
              + ("" if args.same_optimization else " (not --same-optimization)"))
    for row in grads:
        groups = sorted(row["by_group"].items(), key=lambda item: -item[1])[:3]
        print(f"first grads, {row['recipe']} against {row['reference']} at {row['tokens']} tokens, from the same LoRA weights: "
              f"{row['compared']} weights, median {row['median_relative_difference']:.2%} apart, at most "
              f"{row['max_relative_difference']:.2%} ({row['at_weight']}); furthest groups: "
              + ", ".join(f"{group} {value:.2%}" for group, value in groups)
              + (f"; {row['nonzero_where_zero']} non-zero where {row['reference']}'s are zero" if row["nonzero_where_zero"] else "")
              + (f"; {row['only_in_one']} adapted in one recipe only" if row["only_in_one"] else ""))
    for row in longest:
        print(f"longest trainable sequence, {row['recipe']}: {row['longest']} ({row['reason']})")
    print(f"→ {args.out}/bench.json, bench.md, bench.png, bench.log")
    return report


if __name__ == "__main__":
    main()
