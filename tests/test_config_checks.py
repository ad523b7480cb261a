"""Every key a user sets is checked before anything is built: one message naming the key, the
value and what is allowed; no weights load, no tiny checkpoint is built, no data is rendered."""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from composing import compose_small
from torch import nn

from vlm.cli.checks import PRECISIONS, check_lora_targets
from vlm.cli.train import train
from vlm.errors import ConfigError
from vlm.models.families import get_family
from vlm.models.lora import LoraSettings, apply_lora, lora_target_names
from vlm.models.spec import ModelSpec
from vlm.training.optim import AdamWSettings, adamw

SMALL = (
    "data.val_batch_size=8",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "logger=csv",
)


def nothing_may_be_built(monkeypatch, *, tiny_checkpoint_too: bool = True) -> None:
    """Weights loading (and unless told otherwise, building a tiny checkpoint or rendering the
    demo data) fails the test."""
    from vlm.data import demo
    from vlm.models import loading, tiny

    def built(*args, **kwargs):
        raise AssertionError("weights were loaded (or a checkpoint built, or data rendered) despite an invalid config")

    monkeypatch.setattr(loading, "load_model", built)
    if tiny_checkpoint_too:
        monkeypatch.setattr(tiny, "build_tiny_checkpoint", built)
        monkeypatch.setattr(demo, "write_demo_shards", built)


INVALID = [
    # trainer.*: Lightning takes these directly
    ("trainer.max_steps=-5", r"^trainer\.max_steps=-5 must be a positive integer"),
    ("trainer.max_steps=-1", r"trainer\.max_steps=-1 must be a positive integer"),
    ("trainer.val_check_interval=0", r"trainer\.val_check_interval=0 must be a positive integer"),
    ("trainer.val_check_interval=0.5", r"trainer\.val_check_interval=0\.5 must be a positive integer"),
    ("trainer.log_every_n_steps=0", r"trainer\.log_every_n_steps=0 must be a positive integer"),
    ("trainer.accumulate_grad_batches=0", r"trainer\.accumulate_grad_batches=0 must be a positive integer"),
    ("trainer.precision=fp8", r"trainer\.precision='fp8' must be one of .*bf16-mixed"),
    ("trainer.precision=17", r"trainer\.precision=17 must be one of"),
    ("trainer.gradient_clip_val=-1", r"trainer\.gradient_clip_val=-1 must be a number >= 0 or null"),
    ("trainer.devices=0", r"trainer\.devices=0 must be a positive integer, -1 \(all\), 'auto'"),
    ("trainer.accelerator=abacus", r"trainer\.accelerator='abacus' is not one of auto, gpu, .*cpu"),
    ("trainer.limit_val_batches=0.5", r"trainer\.limit_val_batches=0\.5 must be an integer >= 0"),
    ("trainer.enable_model_summary=maybe", r"trainer\.enable_model_summary='maybe' must be true, false or null"),
    ("+trainer.max_step=5", r"trainer\.max_step is not a setting of lightning\.pytorch\.Trainer; did you mean trainer\.max_steps\?"),
    # optimizer and schedule: the optimizer is a partial, called only at fit time
    ("optimizer.lr=-1", r"optimizer\.lr=-1 must be a number > 0"),
    ("optimizer.lr=0", r"optimizer\.lr=0 must be a number > 0"),
    ("optimizer.weight_decay=-0.1", r"optimizer\.weight_decay=-0\.1 must be a number >= 0"),
    ("optimizer.paged_8bit=sometimes", r"optimizer\.paged_8bit='sometimes' must be true, false or 'auto'"),
    ("optimizer.fused_8bit=sometimes", r"optimizer\.fused_8bit='sometimes' must be true, false or 'auto'"),
    ("+optimizer.betas=[0.9]", r"optimizer\.betas=\[0\.9\] must be two floats in \[0, 1\)"),
    ("+optimizer.momentum=0.9", r"optimizer\.momentum is not a setting of vlm\.training\.optim\.adamw"),
    ("scheduler.warmup_steps=1.5", r"scheduler\.warmup_steps=1\.5 must be an int >= 0"),
    ("scheduler.warmup_steps=500", r"scheduler\.warmup_steps=500 must be <= scheduler\.total_steps \(4\)"),
    ("scheduler.min_lr_ratio=2", r"scheduler\.min_lr_ratio=2 must be a float in \[0, 1\]"),
    # top-level keys
    ("seed=abc", r"^seed='abc' must be an integer"),
    ("seed=-1", r"^seed=-1 must be an integer in \[0, "),
    ("ckpt_path=/nonexistent/last.ckpt", r"ckpt_path='/nonexistent/last\.ckpt' does not exist: give an existing checkpoint file"),
    ("validate_before_fit=maybe", r"validate_before_fit='maybe' must be true or false"),
    ("report_top_layers=-1", r"report_top_layers=-1 must be an integer >= 0"),
    ("optimized_metric=''", r"optimized_metric='' must be a key of metrics\.json"),
    ("demo_data.n_train=0", r"demo_data\.n_train=0 must be a positive integer"),
    ("demo_data.image_size=4", r"demo_data\.image_size=4 must be an integer >= 16"),
    # groups built into our settings objects
    ("model.checkpoint=/nonexistent", r"model\.checkpoint='/nonexistent' is a local path .* does not exist"),
    ("model.checkpoint=./no/such/dir", r"model\.checkpoint='\./no/such/dir' is a local path"),
    ("model.checkpoint='not a hub id'", r"model\.checkpoint='not a hub id' is neither an existing local directory nor a Hub id"),
    ("model.checkpointing=maybe", r"model\.checkpointing='maybe' must be one of none, standard, offload"),
    ("model.compile=fast", r"model\.compile='fast' must be one of none, layers, auto"),
    ("+model.gradient_checkpointing=true", r"model\.gradient_checkpointing is not a setting of vlm\.models\.spec\.ModelSpec; did you mean model\.checkpointing\?"),
    ("+model.famly=qwen2_vl", r"model\.famly is not a setting of vlm\.models\.spec\.ModelSpec; did you mean model\.family\?"),
    ("quant.double_quant=maybe", r"quant\.double_quant='maybe' must be true or false"),
    ("quant.skip_modules=lm_head", r"quant\.skip_modules='lm_head' must be a list .*quant\.skip_modules=\[lm_head\]"),
    ("kernels.rms_norm=maybe", r"kernels\.rms_norm='maybe' must be true, false or auto"),
    ("calibration.batches=abc", r"calibration\.batches='abc' must be an integer"),
    ("lora.alpha=abc", r"lora\.alpha='abc' must be a number"),
    ("lora.use_rslora=maybe", r"lora\.use_rslora='maybe' must be true or false"),
    ("lora.target_modules='('", r"lora\.target_modules='\(' is not a valid regex"),
    ("+lora.extra={bogus: 1}", r"lora\.extra\.bogus is not a peft\.LoraConfig argument"),
    ("data.num_workers=abc", r"data\.num_workers='abc' must be an integer"),
    ("data.max_seq_length=abc", r"data\.max_seq_length='abc' must be an integer"),
    ("+data.batch_sz=4", r"data\.batch_sz is not a setting of .*ShardDataModule; did you mean data\.batch_size\?"),
    # callbacks and loggers
    ("callbacks.checkpoint.save_top_k=-5", r"callbacks\.checkpoint: .*save_top_k=-5"),
    ("+callbacks.throughput.log_every_n_steps=0", r"callbacks\.throughput: log_every_n_steps must be >= 1"),
    ("+logger.csv.nme=run", r"logger\.csv\.nme is not a setting of lightning\.pytorch\.loggers\.CSVLogger; did you mean logger\.csv\.name\?"),
]


@pytest.mark.parametrize(("override", "message"), INVALID, ids=[override for override, _ in INVALID])
def test_an_invalid_value_stops_the_run_before_anything_is_built_naming_the_key(override, message, tmp_path, monkeypatch):
    nothing_may_be_built(monkeypatch)
    cfg = compose_small("train", tmp_path, *SMALL, override)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_a_checkpoint_directory_without_config_json_is_refused_naming_model_checkpoint(tmp_path, monkeypatch):
    nothing_may_be_built(monkeypatch)
    (tmp_path / "empty").mkdir()
    cfg = compose_small("train", tmp_path, *SMALL, f"model.checkpoint={tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match=r"model\.checkpoint='.*empty' is a directory without a config\.json"):
        train(cfg)


def test_lora_targets_that_match_no_linear_layer_stop_the_run_before_weights_load(tmp_path, monkeypatch):
    nothing_may_be_built(monkeypatch, tiny_checkpoint_too=False)  # the targets are checked on its skeleton
    cfg = compose_small("train", tmp_path, *SMALL, "lora.target_modules=[nonexistent_proj]")
    with pytest.raises(ConfigError, match=r"lora\.target_modules=\['nonexistent_proj'\] matches no linear layer.*q_proj"):
        train(cfg)


@pytest.mark.parametrize(("overrides", "message"), [
    (["model.compile=layers", "kernels=all"],
     r"model\.compile=layers .* \(rms_norm, layer_norm, rope, swiglu, geglu, lora\): set kernels\.rms_norm=false .*kernels\.lora=false"),
    (["model.compile=layers", "kernels.lora=true"], r"\(lora\): set kernels\.lora=false \(kernels=none"),
    (["model.compile=layers", "trainer=fsdp"], r"model\.compile=layers is not supported with FSDP \(trainer=fsdp\) yet"),
])
def test_compiled_layers_refuse_what_they_cannot_take_before_anything_is_built(overrides, message, tmp_path, monkeypatch):
    nothing_may_be_built(monkeypatch)
    cfg = compose_small("train", tmp_path, *SMALL, *overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_compiled_layers_take_the_loss_kernel(tmp_path):
    from vlm.cli.checks import check_run_config

    check_run_config(compose_small("train", tmp_path, *SMALL, "model.compile=layers", "kernels.cross_entropy=true"))


def test_the_defaults_leave_compile_kernels_and_the_fused_optimizer_to_the_device_and_pass_the_checks(tmp_path):
    from vlm.cli.checks import check_run_config

    cfg = compose_small("train", tmp_path, *SMALL)
    assert (cfg.model.compile, cfg.kernels.cross_entropy, cfg.optimizer.fused_8bit) == ("auto", "auto", "auto")
    assert not any(on is True for name, on in cfg.kernels.items() if name != "_target_")
    check_run_config(cfg)
    assert ModelSpec(family="llava", tiny_dir=str(tmp_path)).compile == "auto"
    assert AdamWSettings(lr=1e-3).fused_8bit == "auto"


@pytest.mark.parametrize("overrides", [
    ["kernels=all"],  # compile=auto is never refused: it compiles nothing where layers would be
    ["model.compile=layers", "kernels.rms_norm=auto"],  # the switch as trainer=cpu decides it: off
    ["kernels=none", "kernels.cross_entropy=true", "optimizer.fused_8bit=true"],  # what auto picks on CUDA, by hand
], ids=" ".join)
def test_auto_values_pass_the_checks_as_the_trainers_device_decides_them(overrides, tmp_path):
    from vlm.cli.checks import check_run_config

    check_run_config(compose_small("train", tmp_path, *SMALL, *overrides))


def test_remote_and_keyword_checkpoints_and_other_trainer_settings_pass_the_checks(tmp_path):
    from vlm.cli.checks import check_run_config

    for override in ("ckpt_path=https://example.com/last.ckpt", "ckpt_path=last", "+trainer.max_time=00:01:00:00"):
        check_run_config(compose_small("train", tmp_path, *SMALL, override))


@pytest.mark.slow
def test_the_command_exits_with_code_2_and_names_seed_when_it_is_not_an_integer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(VLM_CACHE_DIR=str(tmp_path / "cache"), NETRC=str(tmp_path / "no-netrc"))
    command = [sys.executable, "-m", "vlm.cli.train", f"hydra.run.dir={tmp_path / 'run'}", "logger=csv", "seed=abc"]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "vlm-train: invalid config: seed='abc' must be an integer" in done.stderr
    assert not (tmp_path / "cache" / "tiny").exists() and not (tmp_path / "cache" / "data").exists()


# --------------------------------------------------------------------------- LoRA targets, one rule
class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(4, 4)
        self.xq_proj = nn.Linear(4, 4)
        self.v_proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(4, 2)


TOY_FAMILY = SimpleNamespace(lora_targets=r"layers\.\d+\.(q|v)_proj")


def test_a_list_of_names_matches_modules_named_so_or_ending_in_dot_name():
    assert lora_target_names(Toy(), TOY_FAMILY, LoraSettings(target_modules=["q_proj"])) == [
        "layers.0.q_proj", "layers.1.q_proj",
    ]  # never layers.*.xq_proj: the suffix starts at a dot
    assert lora_target_names(Toy(), TOY_FAMILY, LoraSettings(target_modules=["1.v_proj", "head"])) == [
        "layers.1.v_proj", "head",
    ]


def test_a_string_is_a_regex_full_matched_against_full_names_and_auto_is_the_familys():
    settings = LoraSettings(target_modules=r"layers\.0\..*")
    assert lora_target_names(Toy(), TOY_FAMILY, settings) == ["layers.0.q_proj", "layers.0.xq_proj", "layers.0.v_proj"]
    assert lora_target_names(Toy(), TOY_FAMILY, LoraSettings()) == [
        "layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj",
    ]
    with pytest.raises(ValueError, match=r"lora\.target_modules='q_proj' matches no linear layer"):
        lora_target_names(Toy(), TOY_FAMILY, LoraSettings(target_modules="q_proj"))  # a regex is not a suffix


def test_targets_that_match_nothing_or_only_non_linear_layers_name_the_key_and_the_layer_names():
    for targets in (["nonexistent_proj"], ["norm"]):
        with pytest.raises(ValueError, match=r"lora\.target_modules=\[.*\] matches no linear layer.*end in q_proj, xq_proj, v_proj, head"):
            lora_target_names(Toy(), TOY_FAMILY, LoraSettings(target_modules=targets))


def test_exclude_modules_in_extra_is_honoured_as_peft_honours_it():
    settings = LoraSettings(target_modules=["q_proj", "v_proj"], extra={"exclude_modules": ["0.q_proj"]})
    assert lora_target_names(Toy(), TOY_FAMILY, settings) == ["layers.0.v_proj", "layers.1.q_proj", "layers.1.v_proj"]


def test_apply_lora_adapts_exactly_the_layers_lora_target_names_finds():
    settings = LoraSettings(r=2, target_modules=["q_proj", "head"])
    model = apply_lora(Toy(), TOY_FAMILY, settings)
    adapted = sorted(name.removeprefix("base_model.model.").rsplit(".lora_A", 1)[0]
                     for name, _ in model.named_modules() if name.endswith(".lora_A"))
    assert adapted == sorted(lora_target_names(Toy(), TOY_FAMILY, settings))


def test_the_lora_target_check_reads_the_checkpoints_skeleton(tiny_checkpoint):
    family = get_family("qwen2_vl")
    names = check_lora_targets(tiny_checkpoint("qwen2_vl"), family, LoraSettings())
    assert names and all(".language_model.layers." in name for name in names)
    with pytest.raises(ConfigError, match=r"lora\.target_modules=\['nope'\]"):
        check_lora_targets(tiny_checkpoint("qwen2_vl"), family, LoraSettings(target_modules=["nope"]))
    with pytest.raises(ConfigError, match=r"model\.family='llava'"):
        check_lora_targets(tiny_checkpoint("qwen2_vl"), get_family("llava"), LoraSettings())


def test_invalid_lora_settings_name_the_key_and_what_is_allowed():
    cases = [
        ({"r": True}, r"lora\.r=True must be a positive integer"),
        ({"alpha": "abc"}, r"lora\.alpha='abc' must be a positive number"),
        ({"target_modules": []}, r"lora\.target_modules is empty"),
        ({"target_modules": ["q_proj", ""]}, r"lora\.target_modules=.* must hold module names"),
        ({"target_modules": "("}, r"lora\.target_modules='\(' is not a valid regex"),
        ({"extra": {"lora_alpha": 4}}, r"lora\.extra\.lora_alpha is set by the LoRA settings themselves: set it with lora\.alpha"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            LoraSettings(**kwargs)


# --------------------------------------------------------------------------- settings objects
def test_a_model_checkpoint_that_looks_like_a_path_must_be_a_checkpoint_directory(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert ModelSpec(family="llava", checkpoint=str(tmp_path / "ckpt")).checkpoint == str(tmp_path / "ckpt")
    for checkpoint in ("/nonexistent", "../nowhere", "~/nowhere-vlm-test", "a/b/c"):
        with pytest.raises(ValueError, match=r"model\.checkpoint=.* is a local path"):
            ModelSpec(family="llava", checkpoint=checkpoint)
    for checkpoint in ("llava-hf/llava-1.5-7b-hf", "gpt2"):  # Hub ids: not looked up here
        assert ModelSpec(family="llava", checkpoint=checkpoint).checkpoint == checkpoint


def test_a_model_checkpoint_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert ModelSpec(family="llava", checkpoint="~/ckpt").checkpoint == str(tmp_path / "ckpt")


def test_optimizer_settings_are_checked_as_the_config_gives_them_and_when_adamw_is_called():
    with pytest.raises(ValueError, match=r"optimizer\.lr=0 must be a number > 0"):
        AdamWSettings(lr=0)
    with pytest.raises(ValueError, match=r"optimizer\.eps=-1 must be a number > 0"):
        AdamWSettings(lr=1e-3, eps=-1)
    with pytest.raises(ValueError, match=r"optimizer\.lr=-1"):
        adamw([nn.Parameter(nn.Linear(2, 2).weight.detach())], lr=-1)
    assert AdamWSettings(lr=1e-3, betas=[0.8, 0.9], paged_8bit="False") == AdamWSettings(lr=1e-3, betas=(0.8, 0.9), paged_8bit=False)


def test_the_precisions_allowed_are_lightnings():
    from lightning.fabric.connector import _PRECISION_INPUT_STR  # a drift guard: Lightning's own list

    assert set(typing.get_args(_PRECISION_INPUT_STR)) <= set(PRECISIONS)


def test_the_shipped_configs_pass_the_checks(tmp_path):
    from vlm.cli.checks import check_run_config
    from vlm.configs import config_dir

    for model in sorted(p.stem for p in (Path(config_dir()) / "model").glob("tiny_*.yaml")):
        for quant in ("nf4", "dynamic", "none"):
            check_run_config(compose_small("train", tmp_path, f"model={model}", f"quant={quant}", "kernels=all"))
