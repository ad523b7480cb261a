"""The LightningModule that fine-tunes an already built (quantized + PEFT-wrapped) model."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning
import torch
from hydra.utils import get_object
from torch.nn import Parameter
from torch.optim import Optimizer

from vlm.errors import ConfigError
from vlm.training.distributed import clean_name, same_on_every_rank
from vlm.training.fsdp import is_fsdp, uses_fsdp
from vlm.training.loss_tally import LossTally, supervised_token_count
from vlm.training.optim import LRScheduleConfig, cosine_with_warmup
from vlm.training.plain import plain, qualified_name
from vlm.training.resume import describe_differences

__all__ = ["VisionLanguageFineTuner", "supervised_token_count"]

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[Iterable[Parameter]], Optimizer]


# --------------------------------------------------------------------------- hparams helpers
def _describe_optimizer(factory: Any) -> Any:
    """A Hydra-style description (``_target_`` + ``_partial_`` + kwargs) of an optimizer factory."""
    if isinstance(factory, functools.partial):
        desc: dict[str, Any] = {"_target_": qualified_name(factory.func), "_partial_": True}
        if factory.args:
            desc["_args_"] = plain(list(factory.args))
        desc.update({k: plain(v) for k, v in (factory.keywords or {}).items()})
        return desc
    if isinstance(factory, Mapping):
        return plain(factory)
    return {"_target_": qualified_name(factory), "_partial_": True}


def _optimizer_from_description(desc: Mapping[str, Any]) -> OptimizerFactory:
    """Rebuild a factory from :func:`_describe_optimizer` output (e.g. in ``load_from_checkpoint``)."""
    desc = plain(desc)
    if "_target_" not in desc:
        raise TypeError(f"optimizer mapping needs a '_target_' key, got keys {sorted(desc)}")
    func = get_object(desc["_target_"])
    args = desc.get("_args_", [])
    kwargs = {k: v for k, v in desc.items() if not k.startswith("_")}
    return functools.partial(func, *args, **kwargs)


# --------------------------------------------------------------------------- module
class VisionLanguageFineTuner(lightning.LightningModule):
    """Trains the trainable (LoRA) parameters of an already built model.

    Args:
        model: a built Hugging Face model (quantized, PEFT-wrapped, gradient checkpointing set
            up); called as ``model(**batch)`` and must return an output with ``.loss``.
        optimizer: a factory ``params -> Optimizer`` (``functools.partial``, Hydra ``_partial_``),
            e.g. ``functools.partial(vlm.training.optim.adamw, lr=2e-4)``. A Hydra-style mapping
            with ``_target_`` is also accepted (what ``hparams`` stores).
        scheduler: an :class:`LRScheduleConfig` (or a mapping of its fields) for a per-step
            cosine schedule with warmup; ``total_steps=None`` means
            ``trainer.estimated_stepping_batches``. ``None``: constant lr.
        build: what the trainable weights depend on (family, checkpoint, quantization, LoRA
            settings); a checkpoint written for another build is refused, naming what differs.

    The module never casts the model; use ``precision="32-true"`` or ``"bf16-mixed"`` in the
    Trainer (``"bf16-true"``/``"16-true"`` make Lightning cast every floating-point weight,
    the fp32 LoRA weights included). It puts the model in train mode at fit start (Hugging
    Face gradient checkpointing is inactive in eval mode, and ``from_pretrained`` returns
    eval mode). Lightning
    checkpoints hold only the parameters with ``requires_grad`` (the LoRA weights); loading
    restores those and leaves the base model as it was built.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: OptimizerFactory | Mapping[str, Any],
        scheduler: LRScheduleConfig | Mapping[str, Any] | None = None,
        build: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(optimizer, Mapping):
            optimizer = _optimizer_from_description(optimizer)
        if not callable(optimizer):
            raise TypeError(f"optimizer must be a callable params -> Optimizer, got {type(optimizer).__name__}")
        self.model = model
        # What the trainable weights depend on (vlm.build.run.RunFacts.compatibility): written into
        # each checkpoint, and a checkpoint of another build is refused before any weight of it loads.
        self.build = plain(dict(build or {}))
        self.optimizer_factory: OptimizerFactory = optimizer
        self.scheduler_config: LRScheduleConfig | None = LRScheduleConfig.coerce(scheduler)
        # Plain primitives only: loggers can write them and checkpoints load with weights_only=True.
        self.save_hyperparameters(
            {
                "optimizer": _describe_optimizer(optimizer),
                "scheduler": plain(self.scheduler_config),
            }
        )
        # Checkpoints hold only trainable weights, so loading them must not demand the rest.
        self.strict_loading = False
        self._val_loss = LossTally()
        self._ranks_checked = False

    # ------------------------------------------------------------------ forward / steps
    def on_fit_start(self) -> None:
        # `from_pretrained` returns the model in eval mode and Lightning (>= 2.2) keeps module
        # modes as they are; Hugging Face gradient checkpointing and LoRA dropout only act in
        # train mode. Validation loops switch to eval and back on their own.
        self.model.train()

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    @staticmethod
    def _batch_size(batch: Mapping[str, Any]) -> int:
        for key in ("input_ids", "labels", "attention_mask"):
            value = batch.get(key)
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return int(value.shape[0])
        return 1

    def _loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        if "labels" not in batch:
            raise KeyError("the batch has no 'labels': the collate function must provide them")
        outputs = self.model(**batch)
        loss = getattr(outputs, "loss", None)
        if loss is None and isinstance(outputs, Mapping):
            loss = outputs.get("loss")
        if loss is None:
            raise RuntimeError("the model returned no loss; does it accept `labels`?")
        return loss

    def _share_of_tokens(self, labels: torch.Tensor) -> torch.Tensor:
        """This rank's supervised tokens over the mean per rank of the step: the factor that turns
        the rank's token-mean loss into its part of the global token-mean (DDP and FSDP average
        the ranks' gradients)."""
        count = supervised_token_count(labels).to(torch.float32)
        total = self.trainer.strategy.reduce(count.clone(), reduce_op="sum")
        return count * self.trainer.world_size / total.clamp_min(1.0)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        distributed = self._trainer is not None and self.trainer.world_size > 1
        if distributed:
            loss = loss * self._share_of_tokens(batch["labels"]).to(loss.device)
        batch_size = self._batch_size(batch)
        # Averaged over the ranks: with the weighting above, the global batch's token-mean loss.
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size,
                 sync_dist=distributed)
        optimizers = self.trainer.optimizers if self._trainer is not None else []
        if optimizers:
            self.log(
                "lr", float(optimizers[0].param_groups[0]["lr"]), on_step=True, on_epoch=False, batch_size=batch_size
            )
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss = LossTally()

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        loss = self._loss(batch)
        self._val_loss.add(loss, batch["labels"])
        return loss.detach().float()

    def on_validation_epoch_end(self) -> None:
        if self._val_loss.total is None:
            return
        total = self._val_loss.total.clone()
        count = self._val_loss.count.clone()
        if self.trainer.world_size > 1:
            total = self.trainer.strategy.reduce(total, reduce_op="sum")
            count = self.trainer.strategy.reduce(count, reduce_op="sum")
        val_loss = torch.where(count > 0, total / count.clamp_min(1.0), torch.full_like(total, float("nan")))
        # float32 for loggers. Already reduced over ranks, so the same on each: sync_dist averages
        # equal values (and tells Lightning the ranks agree).
        distributed = self.trainer.world_size > 1
        self.log("val/loss", val_loss.float(), prog_bar=True, on_step=False, on_epoch=True, sync_dist=distributed)
        self.log("val/tokens", count.float(), on_step=False, on_epoch=True, sync_dist=distributed)
        self._val_loss = LossTally()

    # ------------------------------------------------------------------ ranks
    def setup(self, stage: str) -> None:
        if self._trainer is None or self.trainer.world_size <= 1 or self._ranks_checked:
            return
        # Before any wrapping: each rank built its own model, and one that differs (another
        # quantization plan, another LoRA init) would train silently out of step.
        if not same_on_every_rank(self.trainer, self.build_fingerprint()):
            raise RuntimeError(
                "the ranks built different models (quantized layers, LoRA weights or their initial values "
                "differ): every rank must load the same checkpoint with the same quant plan and seed"
            )
        self._ranks_checked = True

    def build_fingerprint(self) -> torch.Tensor:
        """What must be equal on every rank: a hash of the 4-bit layers' and trainable weights' names
        and shapes, and the sum of the trainable weights (their initial values)."""
        import hashlib

        from vlm.quant.bnb_layers import quantized_layer_names

        trainable = [(clean_name(n), tuple(p.shape)) for n, p in self.named_parameters() if p.requires_grad]
        described = repr((quantized_layer_names(self.model), trainable)).encode()
        digest = int.from_bytes(hashlib.sha256(described).digest()[:6], "big")  # exact in a float64
        total = sum(float(p.detach().double().sum()) for p in self.parameters() if p.requires_grad)
        return torch.tensor([float(digest), total], dtype=torch.float64)

    # ------------------------------------------------------------------ optimizers
    def trainable_parameters(self) -> list[Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_model(self) -> None:
        """Under FSDP: wrap the model, once, as the strategy says (Lightning calls this inside its
        wrapping context, which holds the strategy's units, mixed precision and device).

        Wrapped here, the model stays wrapped through ``validate``, ``fit`` and ``validate`` again;
        a wrapper Lightning put around this module itself would be made anew for each of them,
        and after the first one without a root around the units already inside.
        """
        if self._trainer is not None and uses_fsdp(self.trainer) and not is_fsdp(self.model):
            from torch.distributed.fsdp.wrap import wrap

            self.model = wrap(self.model)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Optimizer,
                       optimizer_closure: Callable[[], Any] | None = None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes the gradients inside the next step's closure, after that step's forward: freed
        # here, this step's gradients (fp32, the size of the adapters) are not held beside its activations.
        optimizer.zero_grad(set_to_none=True)

    def configure_gradient_clipping(
        self, optimizer: Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if gradient_clip_val and is_fsdp(self.model) and gradient_clip_algorithm in (None, "norm"):
            # Each rank holds a shard of the gradients: FSDP's own clipping takes the norm over all of them.
            self.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        params = self.trainable_parameters()
        if not params:
            raise ValueError("the model has no parameters with requires_grad=True; was PEFT applied?")
        optimizer = self.optimizer_factory(params)
        config = self.scheduler_config
        if config is None:
            return optimizer
        if config.total_steps is None:
            estimated = float(self.trainer.estimated_stepping_batches)
            if not math.isfinite(estimated):
                raise ValueError(
                    "LRScheduleConfig.total_steps is None but the trainer cannot estimate the number of "
                    "steps (no max_steps and a dataloader without a length): set total_steps or max_steps"
                )
            config = dataclasses.replace(config, total_steps=max(1, int(estimated)))
        scheduler = cosine_with_warmup(optimizer, config)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }

    # ------------------------------------------------------------------ checkpointing
    def trainable_state_keys(self) -> list[str]:
        """State-dict keys (of this LightningModule) of the parameters that train, as a state dict
        names them also where FSDP wrapped their modules."""
        return [clean_name(name) for name, p in self.named_parameters() if p.requires_grad]

    def _trainable_state(self, state: dict[str, Any], missing_message: Callable[[list[str], int], str]) -> dict[str, Any]:
        """The entries of ``state`` that are trainable parameters; ``KeyError`` when some are missing."""
        expected = self.trainable_state_keys()
        missing = [k for k in expected if k not in state]
        if missing:
            raise KeyError(missing_message(missing, len(expected)))
        return {k: state[k] for k in expected}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" not in checkpoint:
            return
        if not checkpoint["state_dict"] and self._trainer is not None and not self.trainer.is_global_zero:
            return  # FSDP gathers the full state dict onto rank 0 only; the others write nothing
        # Only LoRA (trainable) weights: the 4-bit base comes from the pretrained model.
        checkpoint["state_dict"] = self._trainable_state(
            checkpoint["state_dict"], lambda missing, _: f"trainable parameters missing from the state dict: {missing[:5]}"
        )
        checkpoint["vlm_trainable_only"] = True
        checkpoint["vlm_build"] = self.build

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._refuse_another_build(checkpoint)
        state = checkpoint.get("state_dict")
        if state is None:
            return
        trainable = self._trainable_state(
            state,
            lambda missing, expected: f"the checkpoint lacks {len(missing)} of the {expected} trainable parameters "
            f"(e.g. {missing[:3]}); was it written for a model with the same LoRA config?",
        )
        if len(state) > len(trainable):
            log.info("ignoring %d non-trainable entries of the checkpoint's state_dict", len(state) - len(trainable))
        own = {clean_name(name): p for name, p in self.named_parameters()}
        # Under FSDP a rank holds flat shards of the weights, whose shapes say nothing; FSDP checks them.
        sharded = is_fsdp(self.model)
        reshaped = [f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} now"
                    for k, v in trainable.items() if not sharded and tuple(v.shape) != tuple(own[k].shape)]
        if reshaped:
            raise ConfigError(f"the checkpoint's LoRA weights have other shapes ({len(reshaped)}, e.g. {reshaped[0]})")
        checkpoint["state_dict"] = trainable

    def _refuse_another_build(self, checkpoint: dict[str, Any]) -> None:
        if not self.build:
            return
        saved = checkpoint.get("vlm_build")
        if saved is None:
            raise ConfigError("the checkpoint does not say what it was trained on (it was not written by vlm-train)")
        differs = describe_differences(saved, self.build)
        if differs:
            raise ConfigError(f"the checkpoint was written for another build: {differs}; resume it with that config")
