"""How each recipe builds and runs its training step on a :class:`~vlm.bench.work.BenchWork`.

- ``standard``: Transformers + PEFT + bitsandbytes as their documentation shows it: NF4 with double
  quantization (``lm_head`` kept), ``prepare_model_for_kbit_training`` with (non-reentrant) gradient
  checkpointing, AdamW 8-bit, in training mode.
- ``standard-bf16``: the standard recipe with the 16-bit weights left in bf16, where
  ``prepare_model_for_kbit_training`` upcasts them to fp32 (and with them the residual stream): not a peer, a
  control. How far its loss curve lies from the standard recipe's is what bf16 alone makes of the same computation.
- ``liger``: the standard recipe with Liger-Kernel's patches for the family applied first.
- ``unsloth``: Unsloth's ``FastVisionModel`` in 4 bits, its own checkpointing, the same LoRA.
- ``ours``: this framework's ``VisionLanguageFineTuner`` step run by a Lightning ``Trainer``, built as
  ``vlm-train`` builds it from the train config and the user's overrides (kernels, quantization,
  checkpointing, optimizer...).

Every recipe adapts the same layers: the family's :class:`~vlm.bench.work.FamilyWork` (LoRA r16 on the
language model's attention and MLP; LLaVA r64 on its attention), alpha 16, no LoRA dropout, and starts from the
same LoRA weights (:mod:`~vlm.bench.lora_init`), whose first grads each recipe reports.

Each runs in a process of its own (:mod:`vlm.bench.worker`): peak memory is per process, and Unsloth
patches transformers when imported. A peer that is not installed raises :class:`Unavailable`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch

from .lora_init import lora_grad_norms, same_lora_init
from .measure import PhaseClock, PhaseMemory, StepLog, StepProfile, synchronize, timed_steps
from .memory_timeline import MemoryTimeline, model_parts
from .work import BenchWork

PEERS_AND_OURS = ("standard", "unsloth", "liger", "ours")  # what a run compares unless told
RECIPES = (*PEERS_AND_OURS, "standard-bf16")
LEARNING_RATE = 2e-4
LORA_ALPHA = 16


@dataclass(frozen=True)
class RecipeRun:
    """What running a recipe gave: its steps, the bytes its weights took on the device after loading
    (``None`` where unknown), its build time, how many parameters it trained, and its memory peaks."""

    steps: StepLog
    weights_bytes: int | None
    build_s: float
    trainable_params: int
    memory: PhaseMemory
    memory_timeline: tuple[dict, ...] = ()
    build: str = ""  # this framework's build report: what each step did, the auto settings as the device decided
    first_grad_norms: dict[str, float] | None = None  # each LoRA weight's grad norm after the first backward
    shared_lora_init: bool = False  # started from the LoRA weights every recipe starts from (vlm.bench.lora_init)


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class Unavailable(Exception):
    """The recipe cannot run here (its library is missing, or cannot load the family)."""


def run_recipe(name: str, work: BenchWork, checkpoint: Path, batch: dict[str, torch.Tensor], steps: int,
               overrides: Sequence[str] = (), profile_to: Path | None = None,
               memory_timeline: bool = False) -> RecipeRun:
    """Build recipe ``name`` and run ``steps`` steps on ``batch`` (and, with ``profile_to``, one more
    under the profiler, its tables written there; with ``memory_timeline``, on CUDA, one more whose memory
    is followed part by part)."""
    if name == "ours":
        return run_ours(work, checkpoint, batch, steps, overrides, profile_to, memory_timeline)
    if overrides:
        raise ValueError(f"overrides {list(overrides)} configure this framework's recipe only")
    started = time.perf_counter()
    lightning.seed_everything(0, verbose=False)  # LoRA's initial weights the same from run to run
    if name == "unsloth":
        model, weights = build_unsloth(work, checkpoint)
    elif name in ("standard", "standard-bf16", "liger"):
        if name == "liger":
            apply_liger(work.family)
        model, weights = build_standard(work, checkpoint, upcast=name != "standard-bf16")
    else:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    shared_init = same_lora_init(model) > 0
    optimizer = eight_bit_adamw([p for p in model.parameters() if p.requires_grad], work.device)
    built = time.perf_counter() - started
    model.train()
    first_grads: dict[str, torch.Tensor] = {}

    def step(clock: PhaseClock) -> torch.Tensor:
        # As the peers document their recipes and their reference scripts ran them: the model as
        # loaded, without autocast.
        loss = model(**batch).loss
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        if not first_grads:
            first_grads.update(lora_grad_norms(model))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    timeline = follow_memory(model, work) if memory_timeline else None
    log, memory = timed_steps(step, steps, work.device, profile_to, timeline)
    return RecipeRun(log, weights, built, trainable_count(model), memory, events(timeline),
                     first_grad_norms=read_norms(first_grads), shared_lora_init=shared_init)


def read_norms(norms: dict[str, torch.Tensor]) -> dict[str, float] | None:
    return {key: float(norm) for key, norm in norms.items()} or None


def follow_memory(model: torch.nn.Module, work: BenchWork) -> MemoryTimeline | None:
    """A timeline over the family's parts of ``model``; ``None`` off CUDA, where no allocator counts."""
    from vlm.models.families import get_family

    if work.device != "cuda":
        return None
    family = get_family(work.family)
    return MemoryTimeline(model_parts(model, family.vision_tower, family.projector, family.language_model))


def events(timeline: MemoryTimeline | None) -> tuple[dict, ...]:
    return () if timeline is None else tuple(event.as_dict() for event in timeline.events)


def device_bytes(device: str) -> int | None:
    if device != "cuda":
        return None
    synchronize(device)
    return torch.cuda.memory_allocated()


def eight_bit_adamw(params: list[torch.nn.Parameter], device: str) -> torch.optim.Optimizer:
    """AdamW 8-bit at lr 2e-4 without weight decay, as this framework's optimizer defaults to."""
    if device != "cuda":
        return torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)  # bitsandbytes' 8-bit ones need a GPU
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=LEARNING_RATE, weight_decay=0.0)


def lora_target_pattern(work: BenchWork) -> str:
    """The language model's linears that ``work`` adapts, as one regex over full module names
    (``[.]`` for a dot: the pattern also passes through a Hydra override)."""
    return rf".*language_model.*[.]({'|'.join(work.setting.lora_targets)})"


# --------------------------------------------------------------------------- the peers
def build_standard(work: BenchWork, checkpoint: Path, upcast: bool = True) -> tuple[torch.nn.Module, int | None]:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    from vlm.models.families import get_family

    family = get_family(work.family)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head"],
    )
    model = family.model_class.from_pretrained(
        str(checkpoint), dtype=torch.bfloat16, device_map=work.device, quantization_config=quantization,
    )
    weights = device_bytes(work.device)
    # Non-reentrant, as transformers recommends: reentrant checkpointing cannot train Mllama (its
    # cross-attention states reach each checkpointed layer as a keyword argument, so the first
    # layer's backward frees the graph the next one needs).
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    if not upcast:  # back to bf16 what it made fp32 (each weight was bf16 as loaded: the round trip is exact)
        for param in model.parameters():
            if param.dtype == torch.float32:
                param.data = param.data.to(torch.bfloat16)
    lora = LoraConfig(r=work.setting.lora_r, lora_alpha=LORA_ALPHA, target_modules=lora_target_pattern(work))
    return get_peft_model(model, lora), weights


def apply_liger(family_name: str) -> None:
    try:
        import liger_kernel.transformers as liger
    except ImportError as error:
        raise Unavailable(f"liger-kernel is not installed ({error})") from None
    patch = getattr(liger, f"apply_liger_kernel_to_{family_name}", None)
    if patch is None:
        raise Unavailable(f"liger-kernel {getattr(liger, '__version__', '')} has no patches for {family_name}")
    patch()


def build_unsloth(work: BenchWork, checkpoint: Path) -> tuple[torch.nn.Module, int | None]:
    if work.device != "cuda":
        raise Unavailable("Unsloth needs a GPU")
    try:
        from unsloth import FastVisionModel
    except ImportError as error:
        raise Unavailable(f"unsloth is not installed ({error})") from None
    model, _ = FastVisionModel.from_pretrained(
        str(checkpoint), load_in_4bit=True, use_gradient_checkpointing="unsloth", max_seq_length=work.tokens,
        local_files_only=True,
    )
    weights = device_bytes(work.device)
    model = FastVisionModel.get_peft_model(
        model, finetune_vision_layers=False, finetune_language_layers=True, finetune_attention_modules=True,
        finetune_mlp_modules="gate_proj" in work.setting.lora_targets, r=work.setting.lora_r, lora_alpha=LORA_ALPHA,
        lora_dropout=0, bias="none",
        use_gradient_checkpointing="unsloth", random_state=0,
    )
    FastVisionModel.for_training(model)
    return model, weights


# --------------------------------------------------------------------------- this framework
def compose_train_config(work: BenchWork, checkpoint: Path, steps: int, overrides: Sequence[str]) -> Any:
    """The train config ``vlm-train`` would run for ``steps`` steps with ``overrides`` on the bench checkpoint."""
    import tempfile

    from hydra import compose, initialize_config_dir

    from vlm.configs import config_dir, register_resolvers
    from vlm.models.families import get_family

    register_resolvers()
    scratch = tempfile.mkdtemp(prefix="vlm-bench-")
    model = f"tiny_{work.family}" if work.smoke else _full_size_model_config(work.family)
    base = [
        f"model={model}", f"model.checkpoint={checkpoint}", f"model.family={get_family(work.family).model_type}",
        f"trainer={'cpu' if work.smoke else 'gpu'}", f"lora.r={work.setting.lora_r}", f"lora.alpha={LORA_ALPHA}", "lora.dropout=0.0",
        f"lora.target_modules='{lora_target_pattern(work)}'", "logger=csv",
        f"paths.output_dir={scratch}", f"paths.cache_dir={scratch}/cache", "calibration.measure=false",
        f"trainer.max_steps={steps}",
        f"optimizer.lr={LEARNING_RATE}",  # the peers' (the demo data group sets its own)
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose("train", overrides=[*base, *overrides])


def _full_size_model_config(family_name: str) -> str:
    from omegaconf import OmegaConf

    from vlm.configs import config_dir

    for path in sorted((config_dir() / "model").glob("*.yaml")):
        if not path.stem.startswith("tiny_") and OmegaConf.load(path).get("family") == family_name:
            return path.stem
    raise Unavailable(f"no conf/model config of family {family_name}")


def run_ours(work: BenchWork, checkpoint: Path, batch: dict[str, torch.Tensor], steps: int,
             overrides: Sequence[str], profile_to: Path | None = None, memory_timeline: bool = False) -> RecipeRun:
    from hydra.utils import instantiate

    from vlm.build.model import build_model
    from vlm.build.planning import plan_checkpoint
    from vlm.cli.wiring import run_plan
    from vlm.training.module import VisionLanguageFineTuner

    started = time.perf_counter()
    # The profiled step and the one the memory timeline follows come after the timed ones.
    total = steps + (profile_to is not None) + (memory_timeline and work.device == "cuda")
    cfg = compose_train_config(work, checkpoint, total, overrides)
    plan = run_plan(cfg)
    lightning.seed_everything(plan.seed, verbose=False)
    # A calibrated policy (quant=dynamic) measures the layers on the bench's own batch.
    planning = plan_checkpoint(str(checkpoint), plan.family, plan.quant, plan.calibration, device=work.device,
                               calibration_batches=[batch])
    if work.device == "cuda":
        # Calibrating loads the 16-bit model once, before training (vlm-quantize does it offline and
        # caches the plan): the peak measured is the build's and the training's, as for the peers.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    built = build_model(plan.model_recipe(str(checkpoint), work.device), planning)
    shared_init = same_lora_init(built.model) > 0
    weights = device_bytes(work.device)
    module = VisionLanguageFineTuner(built.model, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler))
    timeline = follow_memory(built.model, work) if memory_timeline else None
    timer = StepTimer(work.device, timed=steps, profile_to=profile_to, timeline=timeline)
    trainer = instantiate(
        cfg.trainer, logger=False, callbacks=[timer], enable_checkpointing=False,
        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0, val_check_interval=None,
        check_val_every_n_epoch=None,
    )
    loader = torch.utils.data.DataLoader(RepeatedBatch(batch, total), batch_size=None)
    build_s = time.perf_counter() - started
    trainer.fit(module, train_dataloaders=loader)
    return RecipeRun(timer.steps, weights, build_s, trainable_count(built.model), timer.memory, events(timeline),
                     built.summary(), read_norms(timer.first_grads), shared_init)


class RepeatedBatch(torch.utils.data.Dataset):
    """The same batch ``count`` times, already on its device (the DataLoader adds no work)."""

    def __init__(self, batch: dict[str, torch.Tensor], count: int) -> None:
        self.batch, self.count = batch, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.batch


class StepTimer(lightning.Callback):
    """The wall time of each of the first ``timed`` training batches (forward, backward, optimizer
    step), device-synchronised, the host time of each phase (Lightning's hooks between them mark
    its end), and its loss, read after the timing; after them, the batch under the profiler with
    ``profile_to``, then the batch inside ``timeline``."""

    def __init__(self, device: str, timed: int, profile_to: Path | None = None,
                 timeline: MemoryTimeline | None = None) -> None:
        self.device, self.timed = device, timed
        self.steps = StepLog()
        self.memory = PhaseMemory(device)
        self.clock = PhaseClock(self.memory)
        self._start = 0.0
        # One step after the timed ones for each: a context to run it in and the clock it marks its phases on.
        self._extra_steps: list[Any] = []
        if profile_to is not None:
            self._extra_steps.append(lambda: (StepProfile(profile_to, device), PhaseClock()))
        if timeline is not None:
            self._extra_steps.append(lambda: (timeline, timeline.clock()))
        self._extra: Any = None
        self._extra_clock: PhaseClock | None = None
        self.first_grads: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx >= self.timed:
            context, self._extra_clock = self._extra_steps[batch_idx - self.timed]()
            self._extra = context.__enter__()
            return
        synchronize(self.device)
        self._start = time.perf_counter()
        self.clock.start()

    def on_before_backward(self, trainer, pl_module, loss) -> None:  # noqa: ANN001
        (self._extra_clock or self.clock).mark("forward")

    def on_after_backward(self, trainer, pl_module) -> None:  # noqa: ANN001
        (self._extra_clock or self.clock).mark("backward")
        if not self.first_grads:
            self.first_grads.update(lora_grad_norms(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        if self._extra is not None:
            self._extra_clock.mark("optimizer")
            self._extra.__exit__(None, None, None)
            self._extra = self._extra_clock = None
            return
        self.clock.mark("optimizer")
        synchronize(self.device)
        self.clock.mark("device_wait")
        self.steps.times.append(time.perf_counter() - self._start)
        self.clock.record(self.steps)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.steps.losses.append(float(loss))
