"""What one recipe's run is measured by: the median step after warm-up, tokens/s, peak allocated
and reserved memory (over the run, and in each phase of the step), weight memory, the first losses, the
warm-up time, and the host time of each phase of the step.

Every step is bracketed by device synchronisation, so a step's time is its whole cost, host and GPU.
Inside it nothing synchronises: the phases are where the host got to (:class:`PhaseClock`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .memory_timeline import MemoryTimeline

# The phases of a step in order: the forward to the loss, the backward, the optimizer step (and what else the
# step does on the host), and the wait at the end for the device to finish what the host queued.
PHASES = ("forward", "backward", "optimizer", "device_wait")


@dataclass
class StepLog:
    """Wall time and loss of each step, in order, the host seconds of each phase of each step, and (on CUDA)
    each phase's peak of allocated bytes."""

    times: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    phase_peaks: list[dict[str, int]] = field(default_factory=list)


class PhaseMemory:
    """The peak of allocated memory in each phase of a step, and the peaks over the whole run, the build
    before the first step included; on CUDA only (elsewhere it records nothing).

    The allocator's peak counters are read and reset at each phase's end. They are host-side bookkeeping, so
    reading them does not synchronise the device.
    """

    def __init__(self, device: str) -> None:
        self.enabled = device == "cuda"
        self.peak_allocated = self.peak_reserved = 0  # bytes, over every phase and what came before
        self.peaks: dict[str, int] = {}  # bytes, of the current step's phases

    def start(self) -> None:
        self.peaks = {}
        self._take()

    def mark(self, phase: str) -> None:
        if self.enabled and phase not in self.peaks:
            self.peaks[phase] = self._take()

    def run_peaks(self) -> tuple[int, int]:
        """Allocated and reserved bytes at their highest over the run so far, the counters since the last phase
        included."""
        self._take()
        return self.peak_allocated, self.peak_reserved

    def _take(self) -> int:
        if not self.enabled:
            return 0
        allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        self.peak_allocated, self.peak_reserved = max(self.peak_allocated, allocated), max(self.peak_reserved, reserved)
        torch.cuda.reset_peak_memory_stats()
        return allocated


class PhaseClock:
    """When the host finished each phase of a step, read without synchronising the device; with ``memory``,
    also each phase's peak memory.

    Where the host runs ahead of the GPU, a phase ends when its work is queued, not done, and the device's
    lag shows up as ``device_wait``; where the host is the bottleneck, each phase's time is its host cost.
    """

    def __init__(self, memory: PhaseMemory | None = None) -> None:
        self._start = 0.0
        self._ends: dict[str, float] = {}
        self.memory = memory

    def start(self) -> None:
        self._start, self._ends = time.perf_counter(), {}
        if self.memory is not None:
            self.memory.start()

    def mark(self, phase: str) -> None:
        """``phase`` (of :data:`PHASES`) has ended; a second mark of it in the same step is ignored."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; the phases are {', '.join(PHASES)}")
        if phase not in self._ends:
            self._ends[phase] = time.perf_counter()
            if self.memory is not None:
                self.memory.mark(phase)

    def record(self, log: StepLog) -> None:
        """Append this step's phase times (and peaks) to ``log``."""
        log.phases.append(self.durations())
        if self.memory is not None and self.memory.peaks:
            log.phase_peaks.append(dict(self.memory.peaks))

    def durations(self) -> dict[str, float]:
        """Seconds of each phase marked this step, from the end of the phase marked before it."""
        durations, previous = {}, self._start
        for phase in PHASES:
            if phase in self._ends:
                durations[phase] = self._ends[phase] - previous
                previous = self._ends[phase]
        return durations


@dataclass(frozen=True)
class Measurement:
    recipe: str
    family: str
    tokens: int
    batch_size: int
    status: str  # ok | out of memory | unavailable | failed
    reason: str = ""
    step_s: float | None = None
    tokens_per_s: float | None = None
    peak_allocated_GB: float | None = None
    peak_reserved_GB: float | None = None
    weights_GB: float | None = None
    warmup_s: float | None = None
    build_s: float | None = None
    trainable_params: int | None = None
    first_losses: tuple[float, ...] = ()
    losses: tuple[float, ...] = ()
    times: tuple[float, ...] = ()
    host_phases_ms: dict[str, float] | None = None  # median over the timed steps, where every one marked it
    # The highest peak of each phase over the timed steps: where the run's peak lies (forward, backward, optimizer).
    peak_by_phase_GB: dict[str, float] | None = None
    build: str = ""  # this framework's recipe: its build report (what compile=auto, kernels=auto decided)
    memory_timeline: tuple[dict, ...] = ()  # with --memory-timeline: MemoryEvent dicts of one step after the timed ones
    # Each LoRA weight's grad norm after the first backward, by name as every recipe spells it (vlm.bench.lora_init).
    first_grad_norms: dict[str, float] | None = None
    shared_lora_init: bool = False  # False: the recipe's own LoRA init (init_lora_weights other than PEFT's default)
    # TorchDynamo's graph breaks over the run, by the first line of their reason: a compiled layer that broke ran
    # in pieces, or eagerly where the break was inside its checkpoint, and nothing else says so.
    graph_breaks: dict[str, int] | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(log: StepLog, warmup: int, tokens_per_step: int) -> dict:
    """The timing fields of a :class:`Measurement` from ``log``: the median of the steps after the
    first ``warmup`` (or of all, where there are no more), and the warm-up's total time."""
    timed = log.times[warmup:] or log.times
    step = statistics.median(timed)
    return {
        "step_s": round(step, 4),
        "tokens_per_s": round(tokens_per_step / step, 1),
        "warmup_s": round(sum(log.times[:warmup]), 3),
        "first_losses": tuple(round(loss, 4) for loss in log.losses[:5]),
        "losses": tuple(log.losses),
        "times": tuple(round(t, 4) for t in log.times),
        "host_phases_ms": median_phases(log.phases[warmup:] or log.phases),
        "peak_by_phase_GB": highest_phase_peaks(log.phase_peaks[warmup:] or log.phase_peaks),
    }


def _marked_every_step(steps: list[dict]) -> list[str]:
    return [phase for phase in PHASES if steps and all(phase in step for step in steps)]


def median_phases(steps: list[dict[str, float]]) -> dict[str, float] | None:
    marked = _marked_every_step(steps)
    if not marked:
        return None
    return {phase: round(1000 * statistics.median(step[phase] for step in steps), 2) for phase in marked}


def highest_phase_peaks(steps: list[dict[str, int]]) -> dict[str, float] | None:
    marked = _marked_every_step(steps)
    if not marked:
        return None
    return {phase: round(max(step[phase] for step in steps) / 1e9, 3) for phase in marked}


def memory_fields(device: str, weights_bytes: int | None, memory: PhaseMemory) -> dict:
    """Weight memory, and the run's peaks as ``memory`` kept them."""
    fields = {"weights_GB": None if weights_bytes is None else round(weights_bytes / 1e9, 3)}
    if device == "cuda":
        allocated, reserved = memory.run_peaks()
        fields["peak_allocated_GB"] = round(allocated / 1e9, 3)
        fields["peak_reserved_GB"] = round(reserved / 1e9, 3)
    return fields


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_steps(step: Callable[[PhaseClock], torch.Tensor], count: int, device: str,
                profile_to: Path | None = None, timeline: MemoryTimeline | None = None) -> tuple[StepLog, PhaseMemory]:
    """Run ``step`` (one optimizer step; returns its loss, not yet read) ``count`` times, each timed
    whole; the loss is read after the timing, so that reading it adds no host sync to the step.
    ``step`` marks the ends of its phases on the clock it is given. With ``profile_to``, one more step
    runs under the profiler (untimed), its tables written there; with ``timeline``, one more inside it."""
    log, clock = StepLog(), PhaseClock(PhaseMemory(device))
    for _ in range(count):
        synchronize(device)
        start = time.perf_counter()
        clock.start()
        loss = step(clock)
        clock.mark("optimizer")  # where the step did not mark it: all it did after the backward
        synchronize(device)
        clock.mark("device_wait")
        log.times.append(time.perf_counter() - start)
        clock.record(log)
        log.losses.append(float(loss))
    if profile_to is not None:
        with StepProfile(profile_to, device):
            step(PhaseClock())
    if timeline is not None:
        with timeline:
            step(timeline_clock := timeline.clock())
            timeline_clock.mark("optimizer")  # as the timed steps mark it
    return log, clock.memory


class StepProfile:
    """A context that profiles what runs inside it (host ops and, on CUDA, GPU kernels) and writes two
    tables to ``directory``: ops by GPU time and by host time, each by self time so nothing counts twice."""

    def __init__(self, directory: Path, device: str) -> None:
        from torch.profiler import ProfilerActivity, profile

        self.directory, self.device = Path(directory), device
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self.profiler = profile(activities=activities)

    def __enter__(self) -> StepProfile:
        synchronize(self.device)
        self.profiler.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.profiler.__exit__(*exc)
        if exc[0] is None:
            self.write()

    def write(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        averages = self.profiler.key_averages()
        by_device = "self_cuda_time_total" if self.device == "cuda" else "self_cpu_time_total"
        for name, key in (("by_gpu_time.txt", by_device), ("by_host_time.txt", "self_cpu_time_total")):
            (self.directory / name).write_text(averages.table(sort_by=key, row_limit=60, max_name_column_width=90))
