"""Where a step's memory goes: the allocated memory at each entry to and exit from a part of the model (the
vision tower and each of its children, the projector, the language model and its first layer, the head) and at
the end of each phase of the step, with the peak since the event before, over one step after the timed ones
(``vlm-bench --memory-timeline``).

Reading the peak resets the allocator's peak counter, so the timeline runs in a step of its own: the timed
steps' phase peaks stay whole. On CUDA only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch
from torch import nn

from .measure import PhaseClock

GB = 1e9


@dataclass(frozen=True)
class MemoryEvent:
    event: str  # "enter <part>", "leave <part>", "<phase> done", "step start"
    allocated_GB: float
    peak_since_previous_GB: float

    def as_dict(self) -> dict:
        return asdict(self)


class MemoryReader(Protocol):
    def read_and_reset(self) -> tuple[int, int]:
        """Allocated bytes now and the peak since the last call."""


class CudaMemoryReader:
    def read_and_reset(self) -> tuple[int, int]:
        torch.cuda.synchronize()  # the allocations the host has queued have happened
        allocated, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return allocated, peak


def model_parts(model: nn.Module, vision_tower: str, projector: str, language_model: str) -> list[tuple[str, nn.Module]]:
    """The parts a timeline follows, by the family's names for them, wherever a wrapper (PEFT, a peer's own)
    puts them: the vision tower and each of its children, the projector, the language model, its first decoder
    layer (one layer's transient memory; under checkpointing its recompute in the backward shows too) and
    ``lm_head``."""
    named = dict(model.named_modules())

    def find(path: str) -> tuple[str, nn.Module] | None:
        matches = [(name, module) for name, module in named.items() if name == path or name.endswith("." + path)]
        return min(matches, key=lambda match: len(match[0])) if matches else None  # the outermost

    parts = []
    tower = find(vision_tower)
    if tower is not None:
        parts.append((vision_tower, tower[1]))
        parts += [(f"{vision_tower}.{name}", child) for name, child in tower[1].named_children()]
    for path in (projector, language_model, f"{language_model}.layers.0", "lm_head"):
        found = find(path)
        if found is not None and all(found[1] is not module for _, module in parts):
            parts.append((path, found[1]))
    return parts


class MemoryTimeline:
    """A context over one step: hooks on ``parts`` mark each entry and exit; :meth:`mark` marks anything else."""

    def __init__(self, parts: list[tuple[str, nn.Module]], reader: MemoryReader | None = None) -> None:
        self.parts, self.reader = parts, reader or CudaMemoryReader()
        self.events: list[MemoryEvent] = []
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def mark(self, event: str) -> None:
        allocated, peak = self.reader.read_and_reset()
        self.events.append(MemoryEvent(event, round(allocated / GB, 3), round(peak / GB, 3)))

    def __enter__(self) -> MemoryTimeline:
        for name, module in self.parts:
            self._hooks.append(module.register_forward_pre_hook(lambda *_, name=name: self.mark(f"enter {name}")))
            self._hooks.append(module.register_forward_hook(lambda *_, name=name: self.mark(f"leave {name}")))
        self.mark("step start")
        return self

    def clock(self) -> TimelineClock:
        return TimelineClock(self)

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if exc[0] is None:
            self.mark("step end")


def timeline_table(events: list[dict]) -> str:
    """The events as a Markdown table, the highest peak in bold."""
    highest = max((e["peak_since_previous_GB"] for e in events), default=None)
    lines = ["| event | allocated | peak since the event before |", "|---|---|---|"]
    for event in events:
        peak = f"{event['peak_since_previous_GB']:.2f} GB"
        lines.append(f"| {event['event']} | {event['allocated_GB']:.2f} GB | "
                     + (f"**{peak}**" if event["peak_since_previous_GB"] == highest else peak) + " |")
    return "\n".join(lines)


class TimelineClock(PhaseClock):
    """The clock a recipe's step marks its phases on, marking the end of each on ``timeline`` too."""

    def __init__(self, timeline: MemoryTimeline) -> None:
        super().__init__()
        self.timeline = timeline

    def mark(self, phase: str) -> None:
        first = phase not in self._ends
        super().mark(phase)
        if first:
            self.timeline.mark(f"{phase} done")
