"""`vlm-bench --memory-timeline`: the allocated memory at each entry to and exit from a part of the model and at
the end of each phase of one step, with the peak since the event before; found by the family's part names
under any wrapper. The allocator is faked here (the timeline reads CUDA's counters)."""

from __future__ import annotations

import torch
from torch import nn

from vlm.bench.memory_timeline import MemoryTimeline, model_parts, timeline_table
from vlm.models.families import get_family


class CountingReader:
    """Allocated grows by 1 GB per read; the peak since the read before is 0.5 GB above it."""

    def __init__(self) -> None:
        self.reads = 0

    def read_and_reset(self) -> tuple[int, int]:
        self.reads += 1
        return int(self.reads * 1e9), int((self.reads + 0.5) * 1e9)


class Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.encoder = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed(x))


class ToyVisionLanguageModel(nn.Module):
    """Mllama's part names, under a wrapper's prefix as PEFT puts them."""

    def __init__(self) -> None:
        super().__init__()
        inner = nn.Module()
        inner.vision_model, inner.multi_modal_projector, inner.language_model = Tower(), nn.Linear(4, 4), nn.Module()
        inner.language_model.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.model, self.lm_head = inner, nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.model.multi_modal_projector(self.model.vision_model(x))
        for layer in self.model.language_model.layers:
            hidden = layer(hidden)
        return self.lm_head(hidden)


def mllama_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    family = get_family("mllama")
    return model_parts(model, family.vision_tower, family.projector, family.language_model)


def test_the_parts_are_found_by_the_familys_names_under_a_wrapper():
    wrapped = nn.Module()
    wrapped.base_model = ToyVisionLanguageModel()
    names = [name for name, _ in mllama_parts(wrapped)]
    assert names == ["model.vision_model", "model.vision_model.embed", "model.vision_model.encoder",
                     "model.multi_modal_projector", "model.language_model", "model.language_model.layers.0", "lm_head"]


def test_each_part_and_phase_is_an_event_in_order_with_the_peak_since_the_one_before():
    model = ToyVisionLanguageModel()
    with MemoryTimeline(mllama_parts(model), CountingReader()) as timeline:
        clock = timeline.clock()
        loss = model(torch.randn(3, 4)).square().mean()
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        clock.mark("backward")  # a second mark of a phase is no event
    model(torch.randn(3, 4))  # after the step: no hook left
    names = [event.event for event in timeline.events]
    assert names == [
        "step start",
        "enter model.vision_model", "enter model.vision_model.embed", "leave model.vision_model.embed",
        "enter model.vision_model.encoder", "leave model.vision_model.encoder", "leave model.vision_model",
        "enter model.multi_modal_projector", "leave model.multi_modal_projector",
        "enter model.language_model.layers.0", "leave model.language_model.layers.0", "enter lm_head", "leave lm_head",
        "forward done", "backward done", "step end",
    ]
    assert [e.allocated_GB for e in timeline.events] == [float(n) for n in range(1, len(names) + 1)]
    assert all(e.peak_since_previous_GB == e.allocated_GB + 0.5 for e in timeline.events)


def test_the_table_marks_the_highest_peak():
    events = [{"event": "step start", "allocated_GB": 7.58, "peak_since_previous_GB": 7.58},
              {"event": "leave model.vision_model", "allocated_GB": 7.77, "peak_since_previous_GB": 9.36},
              {"event": "backward done", "allocated_GB": 7.82, "peak_since_previous_GB": 8.72}]
    table = timeline_table(events)
    assert "| leave model.vision_model | 7.77 GB | **9.36 GB** |" in table
    assert "| backward done | 7.82 GB | 8.72 GB |" in table


def test_our_step_after_the_timed_ones_runs_inside_the_timeline(make_qlora_model, tmp_path, one_cpu_thread):
    import functools

    from tiny_llama import cpu_trainer, loader, make_batch

    from vlm.bench.recipes import StepTimer
    from vlm.training.module import VisionLanguageFineTuner
    from vlm.training.optim import adamw

    module = VisionLanguageFineTuner(make_qlora_model(), optimizer=functools.partial(adamw, lr=1e-3))
    timeline = MemoryTimeline(mllama_parts(module.model), CountingReader())  # a text model: its head only
    timer = StepTimer("cpu", timed=2, timeline=timeline)
    cpu_trainer(tmp_path, max_steps=3, callbacks=[timer]).fit(module, loader([make_batch(i) for i in range(3)]))
    assert len(timer.steps.times) == 2  # the timed steps; the third ran inside the timeline
    assert [event.event for event in timeline.events] == [
        "step start", "enter lm_head", "leave lm_head", "forward done", "backward done", "optimizer done", "step end"]


def test_a_peers_step_after_the_timed_ones_runs_inside_the_timeline_its_phases_marked_as_theirs():
    from vlm.bench.measure import timed_steps

    def step(clock):  # noqa: ANN001, ANN202  (a peer's loop marks forward and backward; the rest is the optimizer's)
        clock.mark("forward")
        clock.mark("backward")
        return torch.tensor(1.0)

    timeline = MemoryTimeline([], CountingReader())
    log, _ = timed_steps(step, 2, "cpu", timeline=timeline)
    assert len(log.times) == 2
    assert [event.event for event in timeline.events] == [
        "step start", "forward done", "backward done", "optimizer done", "step end"]
