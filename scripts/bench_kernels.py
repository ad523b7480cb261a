"""Forward+backward time and peak memory of each kernel against PyTorch eager, ``torch.compile`` of
the reference, and Liger-Kernel, at Llama-3.2-11B-Vision shapes, on a GPU.

    python scripts/bench_kernels.py --out results/ [--tokens 2048 8192] [--only rms_norm swiglu]

Times are medians of ``--repeats`` forward+backward passes measured with CUDA events after
warm-up, two ways (see ``GpuTimer``): GPU time with the launches queued ahead, and wall time of a
pass started on an idle GPU, launch cost included; peak memory is ``torch.cuda.max_memory_allocated`` during one pass, above what the
inputs already hold. Liger-Kernel is imported when it is on the path (``liger_kernel``).
Writes ``kernels.csv`` and ``kernels.md`` to ``--out``. ``--smoke`` runs tiny shapes on the CPU
(Triton's interpreter) to check the script itself; its times mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS, HEAD_DIM = 4096, 14336, 128256, 32, 8, 128
VISION_HIDDEN = 1280


@dataclass
class Case:
    kernel: str
    shape: str
    make_inputs: Callable[[], list[torch.Tensor]]  # fresh leaves that require grad where they should
    implementations: dict[str, Callable[..., torch.Tensor]]


def _randn(*shape, dtype, device, grad=True, scale=1.0):
    tensor = (torch.randn(*shape, device=device, dtype=torch.float32) * scale).to(dtype)
    return tensor.requires_grad_(grad)


def _liger(name: str):
    try:
        import importlib

        return importlib.import_module(f"liger_kernel.ops.{name}")
    except ImportError:
        return None


def cases(tokens: int, device: str, dtype: torch.dtype, sizes: dict) -> list[Case]:
    from vlm.kernels import fused_linear_cross_entropy as flce
    from vlm.kernels import geglu, layer_norm, rms_norm, rope, swiglu

    h, inter, vocab = sizes["hidden"], sizes["intermediate"], sizes["vocab"]
    heads, kv, hd, vh = sizes["heads"], sizes["kv_heads"], sizes["head_dim"], sizes["vision_hidden"]
    out: list[Case] = []
    eps = 1e-5

    # Norm weights are frozen in QLoRA (the hot path); the trainable case also reduces their grads.
    for frozen in (True, False):
        label = " (frozen weight)" if frozen else ""

        liger_rms = _liger("rms_norm")
        impls = {
            "ours": lambda x, w: rms_norm.rms_norm(x, w, eps),
            "eager": lambda x, w: rms_norm.rms_norm_reference(x, w, eps),
            "compile": torch.compile(lambda x, w: rms_norm.rms_norm_reference(x, w, eps)),
        }
        if liger_rms:
            impls["liger"] = lambda x, w: liger_rms.LigerRMSNormFunction.apply(x, w, eps, 0.0, "llama", False)
        out.append(Case(f"rms_norm{label}", f"{tokens}x{h}",
                        lambda frozen=frozen: [_randn(tokens, h, dtype=dtype, device=device),
                                               (_randn(h, dtype=dtype, device=device, scale=0.1, grad=False) + 1)
                                               .requires_grad_(not frozen)], impls))

        liger_ln = _liger("layer_norm")
        impls = {
            "ours": lambda x, w, b: layer_norm.layer_norm(x, w, b, eps),
            "eager": lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b, eps),
            "compile": torch.compile(lambda x, w, b: layer_norm.layer_norm_reference(x, w, b, eps)),
        }
        if liger_ln:
            impls["liger"] = lambda x, w, b: liger_ln.LigerLayerNormFunction.apply(x, w, b, eps)
        out.append(Case(f"layer_norm{label}", f"{tokens}x{vh}",
                        lambda frozen=frozen: [_randn(tokens, vh, dtype=dtype, device=device),
                                               _randn(vh, dtype=dtype, device=device, grad=not frozen),
                                               _randn(vh, dtype=dtype, device=device, grad=not frozen)], impls))

    def rope_inputs():
        q = _randn(1, heads, tokens, hd, dtype=dtype, device=device)
        k = _randn(1, kv, tokens, hd, dtype=dtype, device=device)
        angle = torch.rand(1, tokens, hd // 2, device=device) * 100
        angle = torch.cat([angle, angle], dim=-1)
        return [q, k, angle.cos().to(dtype), angle.sin().to(dtype)]

    liger_rope = _liger("rope")
    impls = {
        "ours": rope.apply_rotary,
        "eager": rope.apply_rotary_reference,
        "compile": torch.compile(rope.apply_rotary_reference),
    }
    if liger_rope:
        impls["liger"] = lambda q, k, c, s: liger_rope.LigerRopeFunction.apply(q, k, c, s)
    out.append(Case("rope", f"1x{heads}/{kv}x{tokens}x{hd}", rope_inputs, impls))

    section = [hd // 8, 3 * hd // 16, 3 * hd // 16]

    def mrope_inputs():
        q, k, _, _ = rope_inputs()
        angle = torch.rand(3, 1, tokens, hd // 2, device=device) * 100
        angle = torch.cat([angle, angle], dim=-1)
        return [q, k, angle.cos().to(dtype), angle.sin().to(dtype)]

    liger_mrope = _liger("qwen2vl_mrope")
    impls = {
        "ours": lambda q, k, c, s: rope.apply_multimodal_rotary(q, k, c, s, section),
        "eager": lambda q, k, c, s: rope.apply_multimodal_rotary_reference(q, k, c, s, section),
        "compile": torch.compile(lambda q, k, c, s: rope.apply_multimodal_rotary_reference(q, k, c, s, section)),
    }
    if liger_mrope:
        impls["liger"] = lambda q, k, c, s: liger_mrope.LigerQwen2VLMRopeFunction.apply(q, k, c, s, section)
    out.append(Case("mrope", f"1x{heads}/{kv}x{tokens}x{hd}", mrope_inputs, impls))

    def glu_inputs():
        return [_randn(tokens, inter, dtype=dtype, device=device), _randn(tokens, inter, dtype=dtype, device=device)]

    # "ours" is what the patched MLP runs: grads written over gate and up, as Liger-Kernel does too.
    for name, module, liger_class in (("swiglu", swiglu, "LigerSiLUMulFunction"), ("geglu", geglu, "LigerGELUMulFunction")):
        op, reference = getattr(module, name), getattr(module, f"{name}_reference")
        impls = {"ours": lambda g, u, op=op: op(g, u, grads_into_inputs=True), "ours_fresh_grads": op,
                 "eager": reference, "compile": torch.compile(reference)}
        liger = _liger(name)
        if liger:
            impls["liger"] = getattr(liger, liger_class).apply
        out.append(Case(name, f"{tokens}x{inter}", glu_inputs, impls))

    def ce_inputs():
        labels = torch.randint(0, vocab, (tokens,), device=device)
        labels[: tokens // 4] = -100
        # The output head is frozen in QLoRA: only the hidden states need a gradient.
        return [_randn(tokens, h, dtype=dtype, device=device),
                _randn(vocab, h, dtype=dtype, device=device, scale=0.02, grad=False), labels]

    liger_flce = _liger("fused_linear_cross_entropy")
    impls = {
        "ours": lambda x, w, y: flce.fused_linear_cross_entropy(x, w, y),
        "eager": lambda x, w, y: flce.fused_linear_cross_entropy_reference(x, w, y),
        "compile": torch.compile(lambda x, w, y: flce.fused_linear_cross_entropy_reference(x, w, y)),
    }
    if liger_flce:
        def liger_ce(x, w, y):
            result = liger_flce.LigerFusedLinearCrossEntropyFunction.apply(x, w, y)
            return result[0] if isinstance(result, tuple) else result
        impls["liger"] = liger_ce
    out.append(Case("fused_linear_cross_entropy", f"{tokens}x{h}->{vocab}", ce_inputs, impls))
    return out


def qlora_cases(tokens: int, device: str, dtype: torch.dtype, shapes: list[tuple[int, int]], rank: int = 16) -> list[Case]:
    """Our fused QLoRA linear against bitsandbytes ``Linear4bit`` + PEFT LoRA, same weights."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    from vlm.kernels.qlora_linear import qlora_linear

    out = []
    for in_features, out_features in shapes:
        holder = torch.nn.Module()
        holder.proj = bnb.nn.Linear4bit(in_features, out_features, bias=False, compute_dtype=dtype, quant_type="nf4",
                                        compress_statistics=True)
        holder.proj.weight = bnb.nn.Params4bit(torch.randn(out_features, in_features) * 0.02, requires_grad=False,
                                               quant_type="nf4", compress_statistics=True)
        holder = holder.to(device)
        peft = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=["proj"]))
        layer = peft.base_model.model.proj
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.02)
        layer.lora_A["default"].to(dtype)
        layer.lora_B["default"].to(dtype)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        weight = layer.base_layer.weight

        def peft_forward(x, layer=layer):
            return layer(x)

        def fused(x, a=a, b=b, weight=weight):
            return qlora_linear(x, weight, weight.quant_state, a, b, 2.0, None)

        out.append(Case("qlora_linear", f"{tokens}x{in_features}->{out_features} r{rank}",
                        lambda i=in_features: [_randn(tokens, i, dtype=dtype, device=device)],
                        {"ours": fused, "bnb+peft": peft_forward}))
    return out


@dataclass
class Measurement:
    gpu_ms: float  # GPU time of a pass with its launches queued ahead (L2 flushed before it)
    wall_ms: float  # a pass on an idle GPU, launch cost included
    host_ms: float  # CPU time to enqueue a pass
    peak_bytes: int | None


def _enqueue_timed(step: Callable[[], None], start, end, hosts: list[float]) -> None:  # noqa: ANN001
    """``step`` between two recorded CUDA events; the host milliseconds it took to enqueue go to ``hosts``."""
    start.record()
    t0 = time.perf_counter()
    step()
    hosts.append((time.perf_counter() - t0) * 1000)
    end.record()


class GpuTimer:
    """Times passes two ways with CUDA events.

    ``gpu``: before each pass the L2 cache is flushed and the GPU is held busy (``torch.cuda._sleep``) for
    longer than the CPU takes to enqueue the pass, so the events bracket the kernels alone, back to back,
    as in a training step whose GPU never waits for the host (an op that waits for the GPU itself, such as
    the fused CE counting its labels, still shows its launch time after the wait). ``wall``: each pass starts
    on an idle GPU and is synchronized, so the CPU cost of launching it is included.
    """

    def __init__(self) -> None:
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm-up
        start.record()
        torch.cuda._sleep(10_000_000)
        end.record()
        torch.cuda.synchronize()
        self.cycles_per_ms = 10_000_000 / start.elapsed_time(end)

    def gpu(self, step: Callable[[], None], repeats: int, host_ms: float) -> tuple[float, float]:
        """(median GPU ms, median host ms); the hold is three times the host time seen in wall mode."""
        cycles = int(self.cycles_per_ms * max(0.5, 3 * host_ms))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
        hosts = []
        torch.cuda.synchronize()
        for start, end in events:
            self.flush.zero_()
            torch.cuda._sleep(cycles)
            _enqueue_timed(step, start, end, hosts)
        torch.cuda.synchronize()
        hold_ms = cycles / self.cycles_per_ms
        if statistics.median(hosts) > hold_ms:
            print(f"warning: enqueueing took {statistics.median(hosts):.3f} ms, more than the {hold_ms:.3f} ms hold")
        return statistics.median(s.elapsed_time(e) for s, e in events), statistics.median(hosts)

    @staticmethod
    def wall(step: Callable[[], None], repeats: int) -> tuple[float, float]:
        """(median ms of a synchronized pass on an idle GPU, median host ms to enqueue it)."""
        times, hosts = [], []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            _enqueue_timed(step, start, end, hosts)
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), statistics.median(hosts)


def make_step(case: Case, name: str) -> Callable[[], None]:
    """One forward+backward pass of implementation ``name`` on fresh inputs, with fixed random output grads."""
    function = case.implementations[name]
    inputs = case.make_inputs()
    leaves = [t for t in inputs if t.is_floating_point() and t.requires_grad]
    outputs = function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outputs]
    del outputs

    def step():
        result = function(*inputs)
        torch.autograd.backward(result if isinstance(result, tuple) else (result,), grads)
        for leaf in leaves:
            leaf.grad = None

    return step


def measure(case: Case, name: str, repeats: int, warmup: int, timer: GpuTimer | None) -> Measurement:
    """Median times of a forward+backward pass (see ``GpuTimer``), and the peak memory of one pass in bytes."""
    step = make_step(case, name)
    for _ in range(warmup):
        step()
    if timer is None:  # CPU smoke run: wall time only
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1000)
        median = statistics.median(times)
        return Measurement(median, median, median, None)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    wall_ms, host_ms = timer.wall(step, repeats)
    gpu_ms, _ = timer.gpu(step, repeats, host_ms)
    return Measurement(gpu_ms, wall_ms, host_ms, peak)


def profile(case: Case, names: list[str], out: Path) -> None:
    """The GPU kernels of one pass of each implementation, from ``torch.profiler``, appended to ``profile.txt``."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as run_profiler

    with open(out / "profile.txt", "a") as handle:
        for name in names:
            step = make_step(case, name)
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with run_profiler(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            handle.write(f"\n===== {case.kernel} {case.shape} {name}\n{table}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--only", nargs="+", default=None, help="kernel names to run")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, to check the script")
    parser.add_argument("--skip", nargs="+", default=[], help="implementations to leave out, e.g. compile")
    parser.add_argument("--profile", action="store_true", help="also write each pass's GPU kernels to profile.txt")
    args = parser.parse_args()
    if args.smoke:  # before any kernel module is imported
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sizes = dict(hidden=HIDDEN, intermediate=INTERMEDIATE, vocab=VOCAB, heads=HEADS, kv_heads=KV_HEADS,
                 head_dim=HEAD_DIM, vision_hidden=VISION_HIDDEN)
    qlora_shapes = [(HIDDEN, HIDDEN), (HIDDEN, INTERMEDIATE)]
    if args.smoke:
        sizes = dict(hidden=64, intermediate=96, vocab=300, heads=4, kv_heads=2, head_dim=32, vision_hidden=48)
        qlora_shapes, args.tokens, args.repeats, args.warmup = [(64, 64)], [16], 2, 1
    timer = GpuTimer() if cuda else None
    rows = []
    for tokens in args.tokens:
        all_cases = cases(tokens, device, dtype, sizes) + (qlora_cases(tokens, device, dtype, qlora_shapes) if cuda or args.smoke else [])
        for case in all_cases:
            if args.only and case.kernel.split(" (")[0] not in args.only:
                continue
            result = {"kernel": case.kernel, "shape": case.shape, "tokens": tokens}
            skip = set(args.skip) | ({"compile"} if args.smoke else set())
            names = [name for name in case.implementations if name not in skip]
            for name in names:
                try:
                    m = measure(case, name, args.repeats, args.warmup, timer)
                except Exception as error:  # noqa: BLE001 - one failing peer must not end the run
                    print(f"{case.kernel} {name}: {type(error).__name__}: {error}", flush=True)
                    continue
                result[f"{name}_gpu_ms"] = round(m.gpu_ms, 4)
                result[f"{name}_wall_ms"] = round(m.wall_ms, 4)
                result[f"{name}_host_ms"] = round(m.host_ms, 4)
                result[f"{name}_peak_mib"] = None if m.peak_bytes is None else round(m.peak_bytes / 2**20, 1)
                if cuda:
                    torch.cuda.empty_cache()
            if args.profile and cuda:
                profile(case, [n for n in names if n != "compile"], args.out)
            for timing in ("gpu", "wall"):
                ours = result.get(f"ours_{timing}_ms")
                baseline = result.get(f"eager_{timing}_ms") or result.get(f"bnb+peft_{timing}_ms")
                liger = result.get(f"liger_{timing}_ms")
                if ours and baseline:
                    result[f"speedup_{timing}_vs_baseline"] = round(baseline / ours, 2)
                if ours and liger:
                    result[f"speedup_{timing}_vs_liger"] = round(liger / ours, 2)
            rows.append(result)
            print(result, flush=True)
            write(args.out, rows, device)


def write(out: Path, rows: list[dict], device: str) -> None:
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(out / "kernels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter)"
    lines = [f"{name}, {datetime.date.today()}, torch {torch.__version__}, python {platform.python_version()}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |" for row in rows]
    (out / "kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
