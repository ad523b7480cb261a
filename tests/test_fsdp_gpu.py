"""FSDP-QLoRA (`vlm-train trainer=fsdp`): what can be checked without a GPU, and the runs that need one.

torch's FSDP refuses a process without an accelerator, so on the CPU only its parts are tested:
the units the model is cut into (each must hold weights of one dtype, which is why the 4-bit
weights are stored as bf16 under FSDP), that bf16 storage holds the same weights, and how the
config is read. The ``gpu`` tests run the real command and compare FSDP with one plain GPU on the
same data, seed and steps; they run in a minute on one GPU (the two-GPU one needs two).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm.models.families import get_family
from vlm.quant.config import QuantConfig

# The families whose tiny models every session builds (tests/conftest.py).
FAMILIES = ("llava", "llava_next", "mllama", "qwen2_vl", "qwen2_5_vl")
STEPS = 4


def qlora(checkpoint: str, family_name: str, quant: QuantConfig):
    from vlm.models.loading import load_model
    from vlm.models.lora import LoraSettings, apply_lora

    family = get_family(family_name)
    model, _ = load_model(checkpoint, family, quant, device="cpu")
    return apply_lora(model, family, LoraSettings(r=8, alpha=16)), family


def units_of(model: torch.nn.Module, layer_classes: frozenset[type]) -> dict[str, set[torch.dtype]]:
    """FSDP unit (the name of its module, '' for the root) → the dtypes of the weights it flattens:
    each parameter belongs to the innermost unit around it."""
    from vlm.training.fsdp import is_fsdp_unit

    units = {name for name, module in model.named_modules() if name and is_fsdp_unit(module, layer_classes)}
    dtypes: dict[str, set[torch.dtype]] = {"": set()}
    for name, parameter in model.named_parameters():
        owners = [unit for unit in units if name.startswith(unit + ".")]
        dtypes.setdefault(max(owners, key=len, default=""), set()).add(parameter.dtype)
    return dtypes


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows why the CPU tests stop short of FSDP itself")
def test_fsdp_refuses_a_process_without_an_accelerator():
    from torch.distributed.fsdp import FullyShardedDataParallel

    with pytest.raises(RuntimeError, match="FSDP needs a non-CPU accelerator device"):
        FullyShardedDataParallel(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("family_name", FAMILIES)
def test_each_fsdp_unit_flattens_weights_of_one_dtype_once_the_4bit_weights_are_stored_as_bf16(
    family_name, tiny_checkpoint, one_cpu_thread
):
    checkpoint = tiny_checkpoint(family_name)
    model, family = qlora(checkpoint, family_name, QuantConfig().for_strategy(shards_parameters=True))
    layers = family.decoder_layer_classes(model)
    units = units_of(model, layers)
    assert all(len(dtypes) == 1 for dtypes in units.values()), units
    decoder_layers = [n for n, m in model.named_modules() if isinstance(m, tuple(layers))]
    assert decoder_layers and all(units[name] == {torch.bfloat16} for name in decoder_layers)
    lora = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(units[name.removesuffix(".weight")] == {torch.float32} for name in lora)  # each in a unit of its own
    # Stored as bytes, as without FSDP, a decoder layer's 4-bit weights and its norms would mix.
    as_bytes, _ = qlora(checkpoint, family_name, QuantConfig())
    assert {torch.uint8, torch.bfloat16} in units_of(as_bytes, layers).values()


def test_bf16_storage_holds_the_same_4bit_weights_as_bytes(tiny_checkpoint, one_cpu_thread):
    checkpoint = tiny_checkpoint("qwen2_vl")
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for quant in (QuantConfig(), QuantConfig(quant_storage="bfloat16")):
        model, _ = qlora(checkpoint, "qwen2_vl", quant)
        with torch.no_grad():
            logits.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    assert torch.equal(logits[0], logits[1])


def test_the_fsdp_config_shards_and_refuses_what_fsdp_cannot_shard(tmp_path):
    from composing import compose_small

    from vlm.cli.wiring import build_strategy, shards_parameters
    from vlm.errors import ConfigError
    from vlm.models.loading import load_config, model_skeleton

    fsdp = compose_small("train", tmp_path, "trainer=fsdp")
    assert shards_parameters(fsdp.trainer)
    assert not shards_parameters(compose_small("train", tmp_path, "trainer=ddp").trainer)
    assert not shards_parameters(compose_small("train", tmp_path).trainer)
    with pytest.raises(ConfigError, match="trainer=fsdp"):
        shards_parameters(compose_small("train", tmp_path, "+trainer.strategy=fsdp").trainer)

    assert QuantConfig().for_strategy(shards_parameters=True).torch_quant_storage == torch.bfloat16
    assert QuantConfig().for_strategy(shards_parameters=False).torch_quant_storage == torch.uint8
    with pytest.raises(ValueError, match=r"quant\.quant_storage=uint8"):
        QuantConfig(quant_storage="uint8").for_strategy(shards_parameters=True)
    with pytest.raises(ValueError, match=r"quant\.method=int8"):
        QuantConfig(method="int8").for_strategy(shards_parameters=True)

    from torch.distributed.fsdp import MixedPrecision

    from vlm.training.fsdp import QLoRAFSDPStrategy

    family = get_family("mllama")
    from vlm.data.demo import DEMO_VOCABULARY
    from vlm.models.tiny import build_tiny_checkpoint

    checkpoint = build_tiny_checkpoint(family, tmp_path / "mllama", DEMO_VOCABULARY)
    skeleton = model_skeleton(family, load_config(str(checkpoint), family))
    strategy = build_strategy(fsdp.trainer, family, skeleton)
    assert isinstance(strategy, QLoRAFSDPStrategy) and strategy.kwargs["use_orig_params"] is True
    assert strategy.mixed_precision == MixedPrecision()  # no casting: the packed weights stay as stored
    assert {c.__name__ for c in family.decoder_layer_classes(skeleton)} == {
        "MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer"}


def test_under_fsdp_the_optimizer_keeps_the_8bit_states_unfused_unless_told_otherwise(tmp_path):
    """``optimizer.fused_8bit=auto`` is off under FSDP (FusedAdamW8bit was not tried with FSDP's shards), on for
    one GPU; an explicit value stays. (``model.compile=auto`` compiles nothing under FSDP: test_compiling.py.)"""
    from composing import compose_small

    from vlm.cli.wiring import build_optimizer, shards_parameters

    def fused_8bit(*overrides: str):
        cfg = compose_small("train", tmp_path, *overrides)
        return build_optimizer(cfg.optimizer, "cuda:0", shards_parameters(cfg.trainer)).keywords["fused_8bit"]

    assert fused_8bit("trainer=fsdp") is False
    assert fused_8bit("trainer=gpu") == "auto"  # adamw decides by the parameters it is handed: on, on CUDA
    assert fused_8bit("trainer=fsdp", "optimizer.fused_8bit=true") is True


def test_the_fsdp_strategy_resumes_only_what_it_wrote_with_as_many_ranks():
    from vlm.errors import ConfigError
    from vlm.training.fsdp import QLoRAFSDPStrategy

    with pytest.raises(ConfigError, match="state_dict_type=sharded"):
        QLoRAFSDPStrategy(state_dict_type="sharded")
    strategy = QLoRAFSDPStrategy()  # a world of one here
    weight = torch.nn.Parameter(torch.randn(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    weight.grad = torch.randn(3)
    optimizer.step()
    strategy.optimizers = [optimizer]
    written = strategy.optimizer_state(optimizer)
    assert len(written["per_rank"]) == 1 and written["per_rank"][0]["state"][0]["exp_avg"].device.type == "cpu"

    with pytest.raises(ConfigError, match=r"sharded over 2 ranks and this run has 1: resume with trainer\.devices=2"):
        strategy.load_optimizer_state_dict({"optimizer_states": [{"per_rank": [written["per_rank"][0]] * 2}]})
    with pytest.raises(ConfigError, match="not written by trainer=fsdp"):
        strategy.load_optimizer_state_dict({"optimizer_states": [optimizer.state_dict()]})
    with pytest.raises(ConfigError, match="2 optimizer states and this run has 1"):
        strategy.load_optimizer_state_dict({"optimizer_states": [written, written]})

    fresh = torch.optim.AdamW([torch.nn.Parameter(weight.detach().clone())], lr=0.1)
    strategy.optimizers = [fresh]
    strategy.load_optimizer_state_dict({"optimizer_states": [written]})
    assert torch.equal(fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])


# --------------------------------------------------------------------------- on GPUs
def train(tmp_path: Path, name: str, *overrides: str, validate_every: int = STEPS) -> Path:
    """``python -m vlm.cli.train`` of the tiny Qwen2-VL on 32 demo samples read in order, bf16-mixed,
    validated and checkpointed every ``validate_every`` steps."""
    run = tmp_path / name
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "TRITON_INTERPRET")}
    command = [
        sys.executable, "-m", "vlm.cli.train",
        f"hydra.run.dir={run}", f"paths.cache_dir={tmp_path / 'cache'}",
        "demo_data.n_train=32", "demo_data.n_val=16", "data.num_workers=0", "data.shuffle_buffer=0",
        f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={validate_every}", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "trainer.precision=bf16-mixed", "logger=csv", "callbacks=default",
        # The same optimizer whatever the strategy (bitsandbytes' paged one is not what is compared here), and
        # eager layers for both (model.compile=auto compiles the one GPU's layers, and nothing under FSDP).
        "optimizer.paged_8bit=false", "model.compile=none",
        *overrides,
    ]
    done = subprocess.run(command, check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return run


def adapter(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "adapter" / "adapter_model.safetensors")


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def relative(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    difference = torch.cat([(a[k].float() - b[k].float()).flatten() for k in a]).norm()
    return float(difference / torch.cat([b[k].float().flatten() for k in b]).norm())


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory):
    """The plain one-GPU run the FSDP runs are compared with: batch 8, four steps."""
    tmp_path = tmp_path_factory.mktemp("fsdp")
    return tmp_path, train(tmp_path, "gpu", "trainer=gpu", "trainer.devices=1", "data.batch_size=8")


@pytest.fixture(scope="module")
def fsdp_one_gpu(one_gpu):
    """FSDP as a world of one on the same data, checkpointed after steps 2 and 4."""
    tmp_path, _ = one_gpu
    return train(tmp_path, "fsdp1", "trainer=fsdp", "trainer.devices=1", "data.batch_size=8", validate_every=2)


@pytest.mark.gpu
def test_fsdp_on_one_gpu_trains_the_adapter_one_gpu_trains(one_gpu, fsdp_one_gpu):
    """FSDP as a world of one (it shards nothing then, but the model is cut into its units, the
    4-bit weights are stored as bf16, and gradients are clipped and the adapter gathered by FSDP):
    the same computation in the same order as the plain run, bf16 autocast in both. On an H200 the
    adapters are bitwise equal; asserted: losses to 1e-3 relative, adapters to 1e-4 (relative norm
    of their difference), so that a GPU whose atomics round differently from run to run passes."""
    _, plain = one_gpu
    fsdp = fsdp_one_gpu
    got, expected = metrics(fsdp), metrics(plain)
    assert got["status"] == "completed" and got["strategy"] == "QLoRAFSDPStrategy"
    assert got["initial_val_loss"] == pytest.approx(expected["initial_val_loss"], rel=1e-3)
    assert got["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=1e-3)
    assert got["final_val_loss"] < 0.8 * got["initial_val_loss"]
    assert got["last_train_loss"] == pytest.approx(expected["last_train_loss"], rel=1e-3)
    assert relative(adapter(fsdp), adapter(plain)) < 1e-4
    # Written as PEFT writes an adapter: the same config, the weights under the same names.
    configs = [json.loads((run / "adapter" / "adapter_config.json").read_text()) for run in (fsdp, plain)]
    for config in configs:
        config["target_modules"] = set(config["target_modules"])  # a set, written in any order
    assert configs[0] == configs[1]
    # The checkpoint holds the LoRA weights alone, gathered whole: the adapter's, by their module names.
    checkpoint = torch.load(fsdp / "checkpoints" / "last.ckpt", weights_only=True)
    state = {k.removeprefix("model.").replace(".default", ""): v for k, v in checkpoint["state_dict"].items()}
    assert checkpoint["vlm_trainable_only"] and relative(state, adapter(fsdp)) == 0.0
    assert [len(s["per_rank"]) for s in checkpoint["optimizer_states"]] == [1]  # each rank's optimizer state


@pytest.mark.gpu
def test_an_fsdp_run_resumed_from_its_step_2_checkpoint_ends_with_the_adapter_of_the_whole_run(one_gpu, fsdp_one_gpu):
    """The checkpoint reloads into the shards: LoRA weights, each rank's optimizer state, schedule and
    data position, so steps 3 and 4 after the reload give the adapter the uninterrupted run ended
    with (bitwise on an H200; asserted to 1e-4 for GPUs whose atomics vary from run to run, where a
    lost optimizer state or LoRA weight differs by orders of magnitude more)."""
    tmp_path, _ = one_gpu
    checkpoint = fsdp_one_gpu / "checkpoints" / "step-000002.ckpt"
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 2
    resumed = train(tmp_path, "fsdp1-resumed", "trainer=fsdp", "trainer.devices=1", "data.batch_size=8",
                    f"ckpt_path={checkpoint}", validate_every=2)
    assert metrics(resumed)["status"] == "completed"
    assert relative(adapter(resumed), adapter(fsdp_one_gpu)) < 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fsdp_on_two_gpus_of_batch_4_trains_as_one_gpu_of_batch_8(one_gpu):
    """Each GPU holds half of the 4-bit weights; the global batch is the single run's (see
    tests/test_ddp.py for why, and for the weighting of the ranks' losses)."""
    tmp_path, plain = one_gpu
    fsdp = train(tmp_path, "fsdp2", "trainer=fsdp", "trainer.devices=2", "data.batch_size=4")
    got, expected = metrics(fsdp), metrics(plain)
    assert got["world_size"] == 2 and got["samples_per_rank"] == [16, 16]
    assert got["initial_val_loss"] == pytest.approx(expected["initial_val_loss"], rel=1e-3)
    assert got["final_val_loss"] == pytest.approx(expected["final_val_loss"], rel=2e-2)
    assert relative(adapter(fsdp), adapter(plain)) < 1e-1
