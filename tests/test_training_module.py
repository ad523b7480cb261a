"""VisionLanguageFineTuner and the optimizer / schedule factories, on a tiny real QLoRA model."""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import bitsandbytes as bnb
import lightning
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from tiny_llama import cpu_trainer, loader, make_batch

from vlm.training.module import VisionLanguageFineTuner, supervised_token_count
from vlm.training.optim import LRScheduleConfig, adamw, cosine_with_warmup

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def make_trainer(tmp_path: Path, **kwargs) -> lightning.Trainer:
    return cpu_trainer(tmp_path, **{"num_sanity_val_steps": 0, **kwargs})


def read_csv_metrics(trainer: lightning.Trainer) -> list[dict[str, str]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def frozen_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def trainable_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# --------------------------------------------------------------------------- training
def test_training_memorises_and_only_lora_changes(make_qlora_model, tmp_path: Path) -> None:
    model = make_qlora_model()
    frozen_before = frozen_snapshot(model)
    lora_before = trainable_snapshot(model)
    assert any(p.dtype == torch.uint8 for p in frozen_before.values()), "expected packed 4-bit weights"
    assert any(p.dtype == torch.bfloat16 for p in frozen_before.values()), "expected bf16 frozen weights"
    assert lora_before and all("lora_" in n for n in lora_before)

    steps = 12
    module = VisionLanguageFineTuner(
        model,
        optimizer=functools.partial(adamw, lr=1e-2),
        scheduler=LRScheduleConfig(warmup_steps=1, total_steps=steps, min_lr_ratio=0.1),
    )
    trainer = make_trainer(tmp_path, max_steps=steps)
    assert not all(m.training for m in model.modules())  # from_pretrained leaves modules in eval mode ...
    trainer.fit(module, loader([make_batch(0)] * steps))
    assert all(m.training for m in model.modules())  # ... the module trains it in train mode

    rows = [r for r in read_csv_metrics(trainer) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    lrs = [float(r["lr"]) for r in rows if r.get("lr")]
    assert len(losses) == steps
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-2) and lrs[-1] < lrs[1]

    for name, before in frozen_before.items():
        after = dict(model.named_parameters())[name]
        assert after.dtype == before.dtype, name
        assert torch.equal(after.detach(), before), f"frozen weight changed: {name}"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), lora_before[n])]
    assert len(changed) == len(lora_before), "every LoRA weight should have trained"
    assert all(p.dtype == lora_before[n].dtype for n, p in model.named_parameters() if p.requires_grad)


class GradientsAtForward(lightning.Callback):
    """Whether any trainable parameter holds a gradient as each batch's forward begins."""

    def __init__(self) -> None:
        self.held: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.held.append(any(p.grad is not None for p in pl_module.trainable_parameters()))


def test_a_steps_gradients_are_freed_before_the_next_forward_and_kept_while_accumulating(
    make_qlora_model, tmp_path: Path
) -> None:
    """Lightning zeroes them only inside the next step, after its forward: they would sit beside its activations."""
    module = VisionLanguageFineTuner(make_qlora_model(), optimizer=functools.partial(adamw, lr=1e-3))
    seen = GradientsAtForward()
    trainer = make_trainer(tmp_path, max_steps=2, accumulate_grad_batches=2, callbacks=[seen])
    trainer.fit(module, loader([make_batch(i) for i in range(4)]))
    assert seen.held == [False, True, False, True]


def test_configure_optimizers_uses_only_trainable_params(make_qlora_model) -> None:
    model = make_qlora_model()
    module = VisionLanguageFineTuner(
        model, optimizer=functools.partial(adamw, lr=1e-3), scheduler=LRScheduleConfig(warmup_steps=0.1, total_steps=50)
    )
    out = module.configure_optimizers()
    optimizer = out["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)  # CPU: "auto" falls back to torch's AdamW
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert in_optimizer == trainable
    assert not any(id(p) in in_optimizer for p in model.parameters() if not p.requires_grad)
    assert out["lr_scheduler"]["interval"] == "step"
    assert isinstance(out["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LambdaLR)

    # No scheduler: a bare optimizer.
    plain = VisionLanguageFineTuner(model, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    assert isinstance(plain.configure_optimizers(), torch.optim.SGD)


def test_hparams_hold_no_model_and_rebuild_optimizer(make_qlora_model) -> None:
    model = make_qlora_model()
    module = VisionLanguageFineTuner(
        model,
        optimizer=functools.partial(adamw, lr=3e-4, weight_decay=0.01),
        scheduler={"warmup_steps": 5, "total_steps": 100},  # a mapping (Hydra DictConfig) works too
    )
    assert "model" not in module.hparams
    assert module.hparams["optimizer"] == {
        "_target_": "vlm.training.optim.adamw",
        "_partial_": True,
        "lr": 3e-4,
        "weight_decay": 0.01,
    }
    assert module.hparams["scheduler"] == {"warmup_steps": 5, "total_steps": 100, "min_lr_ratio": 0.0}
    assert module.scheduler_config == LRScheduleConfig(5, 100)
    rebuilt = VisionLanguageFineTuner(model, optimizer=module.hparams["optimizer"])
    opt = rebuilt.configure_optimizers()
    assert opt.defaults["lr"] == 3e-4 and opt.defaults["weight_decay"] == 0.01


# --------------------------------------------------------------------------- validation
def test_val_loss_is_token_weighted_mean(make_qlora_model, tmp_path: Path) -> None:
    model = make_qlora_model()
    # Very different numbers of supervised tokens per batch, so the weighting matters.
    batches = [make_batch(10, prompt=13, pad=0), make_batch(11, seq=24, prompt=2, pad=5), make_batch(12, batch=1, prompt=4)]
    module = VisionLanguageFineTuner(model, optimizer=functools.partial(adamw, lr=1e-3))
    result = make_trainer(tmp_path).validate(module, dataloaders=loader(batches), verbose=False)[0]

    total, count, batch_means = 0.0, 0, []
    with torch.no_grad():
        for b in batches:
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = b["labels"][:, 1:].reshape(-1)
            nll = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum").item()
            n = int((shift_labels != -100).sum())
            assert n == int(supervised_token_count(b["labels"]))
            total, count = total + nll, count + n
            batch_means.append(nll / n)
    expected = total / count
    assert result["val/loss"] == pytest.approx(expected, rel=1e-4)
    assert result["val/tokens"] == count
    assert abs(sum(batch_means) / len(batch_means) - expected) > 1e-3  # differs from the unweighted mean


# --------------------------------------------------------------------------- checkpointing
def test_checkpoint_holds_only_lora_and_resumes(make_qlora_model, tmp_path: Path) -> None:
    batches = [make_batch(0), make_batch(1)]
    make_module = lambda m: VisionLanguageFineTuner(  # noqa: E731
        m, optimizer=functools.partial(adamw, lr=1e-2), scheduler=LRScheduleConfig(warmup_steps=1, total_steps=6)
    )
    module = make_module(make_qlora_model())
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
    trainer = make_trainer(tmp_path, max_steps=3, enable_checkpointing=True, callbacks=[ckpt_cb])
    trainer.fit(module, loader(batches))
    ckpt_path = Path(ckpt_cb.last_model_path)
    assert ckpt_path.is_file()

    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)  # plain data only
    keys = set(ckpt["state_dict"])
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert keys == trainable
    assert all("lora_" in k for k in keys)
    assert not any("base_layer" in k or "embed_tokens" in k for k in keys)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    trained = {k: v.clone() for k, v in module.state_dict().items() if k in trainable}

    # A fresh model (LoRA re-initialised) restored from the checkpoint: the LoRA weights come back.
    restored = make_module(make_qlora_model())
    assert not all(torch.equal(restored.state_dict()[k], v) for k, v in trained.items())
    frozen_before = frozen_snapshot(restored.model)
    make_trainer(tmp_path, max_steps=3).fit(restored, loader(batches), ckpt_path=ckpt_path)
    for k, v in trained.items():
        assert torch.equal(restored.state_dict()[k], v), k
    for n, p in restored.model.named_parameters():
        if n in frozen_before:
            assert torch.equal(p.detach(), frozen_before[n]) and p.dtype == frozen_before[n].dtype

    # ... and training continues from step 3 to 6.
    resumed = make_module(make_qlora_model())
    trainer = make_trainer(tmp_path, max_steps=6)
    trainer.fit(resumed, loader(batches), ckpt_path=ckpt_path)
    assert trainer.global_step == 6
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 6

    # load_from_checkpoint rebuilds the optimizer factory from hparams; only the model is passed.
    loaded = VisionLanguageFineTuner.load_from_checkpoint(ckpt_path, model=make_qlora_model(), weights_only=True)
    for k, v in trained.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.scheduler_config == LRScheduleConfig(warmup_steps=1, total_steps=6)


def test_loading_a_checkpoint_without_the_lora_weights_fails(make_qlora_model) -> None:
    module = VisionLanguageFineTuner(make_qlora_model(), optimizer=functools.partial(adamw, lr=1e-3))
    with pytest.raises(KeyError, match="trainable parameters"):
        module.on_load_checkpoint({"state_dict": {}})


# --------------------------------------------------------------------------- schedule / optimizer
def _lrs(config: LRScheduleConfig, n: int, base_lr: float = 2.0) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    sched = cosine_with_warmup(opt, config)
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_with_warmup_values() -> None:
    lrs = _lrs(LRScheduleConfig(warmup_steps=10, total_steps=100, min_lr_ratio=0.1), 121)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(1.0)  # linear warmup: half way
    assert lrs[10] == pytest.approx(2.0)  # peak at the end of warmup
    assert lrs[55] == pytest.approx(0.2 + 1.8 * 0.5)  # cosine midpoint
    assert lrs[100] == pytest.approx(0.2)  # min_lr_ratio * lr at the end
    assert lrs[120] == pytest.approx(0.2)  # and stays there
    assert all(a >= b for a, b in zip(lrs[10:101], lrs[11:101]))
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))

    frac = _lrs(LRScheduleConfig(warmup_steps=0.1, total_steps=50), 51, base_lr=1.0)
    assert frac[0] == 0.0 and frac[5] == pytest.approx(1.0) and frac[50] == pytest.approx(0.0, abs=1e-12)
    no_warmup = _lrs(LRScheduleConfig(warmup_steps=0, total_steps=10), 11, base_lr=1.0)
    assert no_warmup[0] == pytest.approx(1.0) and no_warmup[10] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"warmup_steps": -1, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 1.5, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": "10", "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 20, "total_steps": 10}, "warmup_steps"),
        ({"warmup_steps": 1, "total_steps": 0}, "total_steps"),
        ({"warmup_steps": 1, "total_steps": 2.5}, "total_steps"),
        ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": 1.5}, "min_lr_ratio"),
        ({"warmup_steps": 1, "total_steps": 10, "min_lr_ratio": -0.1}, "min_lr_ratio"),
    ],
)
def test_schedule_config_rejects_bad_values(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        LRScheduleConfig(**kwargs)


def test_adamw_device_selection() -> None:
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = adamw(iter(params), lr=1e-3, weight_decay=0.1, betas=[0.8, 0.99])
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["betas"] == (0.8, 0.99) and opt.defaults["weight_decay"] == 0.1
    assert type(adamw(params, lr=1e-3, paged_8bit=False)) is torch.optim.AdamW
    with pytest.raises(ValueError, match="CUDA"):
        adamw(params, lr=1e-3, paged_8bit=True)
    with pytest.raises(ValueError, match="paged_8bit"):
        adamw(params, lr=1e-3, paged_8bit="sometimes")
    with pytest.raises(ValueError, match="no parameters"):
        adamw([], lr=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_auto_uses_paged_8bit_on_cuda() -> None:
    params = [torch.nn.Parameter(torch.randn(64, 64, device="cuda"))]
    opt = adamw(params, lr=1e-3, fused_8bit=False)  # fused_8bit=auto keeps the 8-bit states in FusedAdamW8bit
    assert isinstance(opt, bnb.optim.PagedAdamW8bit)
    params[0].sum().backward()
    opt.step()
