"""`vlm-export`: the three forms of a trained run, each checked against what the run trained.

The runs are tiny QLoRA runs made without training: the tiny checkpoint loaded in 4-bit as
training loads it, LoRA applied as training applies it, its B matrices set to random values (a
fresh adapter is zero and would merge to nothing), saved as training saves a run directory.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from vlm.build.trained import RunDirError, attach_adapter, load_base, read_run
from vlm.cli.export import main
from vlm.data.demo import demo_sample
from vlm.data.encoding import structured_messages
from vlm.errors import ConfigError
from vlm.export import (
    MergeError,
    MergeSettings,
    export_adapter,
    export_merged,
    export_vllm,
    merged_model,
    save_merged,
)
from vlm.export.dequantize import dequantize_linear_layers
from vlm.export.vllm_lora import NO_VLLM_LORA, VLLM_LAYOUTS, VllmLayoutError
from vlm.models.families import FAMILIES, TinySize, get_family
from vlm.models.loading import load_model, load_processor
from vlm.models.lora import LoraSettings, apply_lora
from vlm.models.tiny import build_tiny_checkpoint
from vlm.quant.config import QuantConfig

# PEFT reads transformers' old attribute name; nothing of ours uses it (as vlm.cli.console says).
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

ALL_FAMILIES = sorted(FAMILIES)
VLLM_FAMILIES = sorted(set(VLLM_LAYOUTS) & set(FAMILIES))
# Logits (magnitude 7 to 16) of the merged model against the unmerged adapter on the same
# dequantized base. In float32 they agree to rounding order (measured: at most 2.2e-5). In bf16
# the merged weight is rounded once more, and every bf16 op rounds: the differences measured (at
# most 0.23, mean 0.03) are those between the unmerged model in bf16 and in float32 (at most 0.25).
TOLERANCES = {  # dtype: (atol, rtol, largest mean absolute difference)
    "float32": (1e-4, 1e-5, 2e-5),
    "bfloat16": (0.4, 0.02, 0.06),
}


TINY_LORA = LoraSettings(r=4, alpha=8)
NF4 = QuantConfig()  # the default recipe: every linear layer 4-bit but lm_head


def make_run(
    run_dir: Path, checkpoint: str, model_type: str, lora: LoraSettings = TINY_LORA, quant: QuantConfig = NF4
) -> Path:
    """A run directory as ``vlm-train`` leaves it, for a QLoRA adapter with random B matrices."""
    family = get_family(model_type)
    model, report = load_model(checkpoint, family, quant)
    model = apply_lora(model, family, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    model.save_pretrained(run_dir / "adapter")
    metrics = {
        "status": "completed",
        "family": model_type,
        "checkpoint": checkpoint,
        "kept_in_16bit": list(report.plan.kept),
        "quant_method": quant.method,
        "max_seq_length": 512,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    settings = {"method": quant.method, "double_quant": quant.double_quant, "compute_dtype": quant.compute_dtype,
                "policy": "standard", "skip_modules": []}
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"quant": settings, "data": {"max_seq_length": 512}}))
    return run_dir


@pytest.fixture(scope="module")
def tiny_run(tiny_checkpoint, tmp_path_factory):
    """``tiny_run(model_type)`` → the run directory of a tiny QLoRA run, made once per module."""
    made: dict[str, Path] = {}

    def make(model_type: str) -> Path:
        if model_type not in made:
            root = tmp_path_factory.mktemp(f"run-{model_type}")
            made[model_type] = make_run(root, tiny_checkpoint(model_type), model_type)
        return made[model_type]

    return make


def copy_run(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def sample_inputs(processor) -> dict[str, torch.Tensor]:
    """A demo sample (an image, a question and its answer) rendered by the chat template and
    encoded by the processor, as a served model receives it."""
    sample = demo_sample(3, seed=0, image_size=64)
    text = processor.apply_chat_template(structured_messages(sample.messages), tokenize=False)
    return dict(processor(text=[text], images=[list(sample.images)], return_tensors="pt"))


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits.float()


def mismatch(actual, expected, dtype: str) -> str | None:
    """Why ``actual`` is not ``expected`` within the ``dtype`` tolerance; None when it is."""
    atol, rtol, mean = TOLERANCES[dtype]
    error = (actual - expected).abs()
    excess = error - (atol + rtol * expected.abs())
    if float(excess.max()) > 0:
        return f"max error {error.max():.4g}, over the {dtype} tolerance by {excess.max():.4g}"
    if float(error.mean()) > mean:
        return f"mean error {error.mean():.4g} > {mean}"
    return None


def assert_close(actual, expected, dtype: str, what: str):
    problem = mismatch(actual, expected, dtype)
    assert problem is None, f"{what}: {problem}"


def unmerged_reference(run, dtype: torch.dtype):
    """The run's base dequantized to ``dtype`` with its adapter attached, not merged."""
    from vlm.export.merge import cast_parameters

    base = load_base(run)
    dequantize_linear_layers(base, dtype)
    cast_parameters(base, dtype)
    return attach_adapter(base, run)


def quantized_layers(model) -> list[str]:
    import bitsandbytes as bnb

    return [n for n, m in model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


# ---- merged ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_merged_model_computes_what_the_unmerged_adapter_on_the_dequantized_base_computes(
    model_type, dtype, tiny_run, tiny_models, one_cpu_thread
):
    _, processor, _ = tiny_models[model_type]
    run = read_run(tiny_run(model_type))
    inputs = sample_inputs(processor)
    reference = unmerged_reference(run, MergeSettings(dtype=dtype).torch_dtype)
    expected = logits(reference, inputs)
    with reference.disable_adapter():
        without_adapter = logits(reference, inputs)
    # The adapter moves the logits (by 1.9 to 8.4, measured) beyond even the bf16 tolerance: a merge
    # that dropped it could not pass.
    assert mismatch(without_adapter, expected, "bfloat16") is not None

    merged, result = merged_model(run, MergeSettings(dtype=dtype))
    assert_close(logits(merged, inputs), expected, dtype, f"{model_type} merged vs unmerged")
    adapter_layers = {k.split(".lora_")[0] for k in load_file(run.adapter_dir / "adapter_model.safetensors")}
    assert result.layers == len(adapter_layers) and result.tensors == 2 * len(adapter_layers)
    assert result.dequantized == len(quantized_layers(load_base(run)))
    assert quantized_layers(merged) == [] and not any("lora_" in n for n, _ in merged.named_parameters())
    assert {p.dtype for p in merged.parameters()} == {MergeSettings(dtype=dtype).torch_dtype}


def test_an_8bit_run_merges_into_its_dequantized_int8_weights(tiny_checkpoint, tiny_models, tmp_path, one_cpu_thread):
    _, processor, _ = tiny_models["qwen2_vl"]
    run_dir = make_run(tmp_path / "run", tiny_checkpoint("qwen2_vl"), "qwen2_vl", quant=QuantConfig(method="int8"))
    run = read_run(run_dir)
    assert run.quant.method == "int8"
    inputs = sample_inputs(processor)
    merged, result = merged_model(run, MergeSettings(dtype="float32"))
    assert result.dequantized > 0 and quantized_layers(merged) == []
    assert_close(logits(merged, inputs), logits(unmerged_reference(run, torch.float32), inputs), "float32", "int8 merged")


@pytest.mark.parametrize("model_type", ALL_FAMILIES)
def test_merged_directory_reloads_as_a_plain_checkpoint_with_its_processor(model_type, tiny_run, tiny_models, tmp_path,
                                                                           one_cpu_thread):
    family, processor, _ = tiny_models[model_type]
    run = read_run(tiny_run(model_type))
    inputs = sample_inputs(processor)
    merged, result = merged_model(run)
    report = save_merged(merged, result, run, tmp_path / "merged")

    config = json.loads((report.out_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == [family.model_class_name] and config["dtype"] == "bfloat16"
    names = {f.path.name for f in report.files}
    assert {"config.json", "generation_config.json", "chat_template.jinja", "tokenizer.json"} <= names
    assert any(name.endswith(".safetensors") for name in names)

    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(report.out_dir)
    assert type(reloaded) is family.model_class and reloaded.dtype == torch.bfloat16
    assert quantized_layers(reloaded) == []
    assert torch.equal(logits(reloaded, inputs), logits(merged, inputs))
    reloaded_processor = load_processor(str(report.out_dir), family)
    again = sample_inputs(reloaded_processor)
    assert again.keys() == inputs.keys() and all(torch.equal(again[k], inputs[k]) for k in inputs)
    assert reloaded_processor.chat_template == processor.chat_template


def test_merged_export_shards_the_weights_by_max_shard_size(tiny_run, tmp_path, one_cpu_thread):
    run = read_run(tiny_run("qwen2_vl"))
    report = export_merged(run, tmp_path / "merged", MergeSettings(max_shard_size="200KB"))
    shards = sorted(f.path.name for f in report.files if f.path.suffix == ".safetensors")
    assert len(shards) > 1 and (report.out_dir / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForImageTextToText.from_pretrained(report.out_dir)
    merged, _ = merged_model(run)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), merged.state_dict().values()))


# ---- vllm --------------------------------------------------------------------------------------
# The names vLLM reads, as its hf_to_vllm_mapper expects them: the checkpoint layout, not transformers 5's
# (model.language_model.layers...): Qwen2-VL keeps model.layers..., LLaVA language_model.model.layers...
EXPECTED_VLLM_NAMES = {
    "qwen2_vl": ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                 "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
    "qwen2_5_vl": ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                   "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"),
    "llava": ("base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight",
              "base_model.model.language_model.model.layers.1.mlp.down_proj.lora_B.weight"),
    "gemma3": ("base_model.model.language_model.model.layers.0.self_attn.q_proj.lora_A.weight",),
    "qwen3_vl": ("base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight",),
    "idefics3": ("base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight",),
    "smolvlm": ("base_model.model.model.text_model.layers.0.self_attn.q_proj.lora_A.weight",),
}


LANGUAGE_MODEL_IN_CHECKPOINT = {"qwen2_vl": "model.", "qwen2_5_vl": "model.", "llava": "language_model.model.",
                                "gemma3": "language_model.model.", "qwen3_vl": "model.language_model.",
                                "idefics3": "model.text_model.", "smolvlm": "model.text_model."}


def test_every_family_either_has_a_vllm_layout_or_a_reason_vllm_serves_none():
    assert set(VLLM_LAYOUTS).isdisjoint(NO_VLLM_LORA)
    assert set(FAMILIES) <= set(VLLM_LAYOUTS) | set(NO_VLLM_LORA)
    assert {"llava", "qwen2_vl", "qwen2_5_vl"} <= set(VLLM_FAMILIES)
    assert all(VLLM_LAYOUTS[name].architecture == get_family(name).model_class_name for name in VLLM_FAMILIES)


def checkpoint_weight_names(checkpoint: str) -> set[str]:
    names: set[str] = set()
    for path in Path(checkpoint).glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize("model_type", VLLM_FAMILIES)
def test_vllm_export_holds_exactly_the_adapters_tensors_under_the_checkpoints_module_names(
    model_type, tiny_run, tiny_checkpoint, tmp_path
):
    run = read_run(tiny_run(model_type))
    report = export_vllm(run, tmp_path / "vllm")
    assert sorted(f.path.name for f in report.files) == ["adapter_config.json", "adapter_model.safetensors"]
    saved = load_file(run.adapter_dir / "adapter_model.safetensors")
    exported = load_file(report.out_dir / "adapter_model.safetensors")
    assert len(exported) == len(saved) == report.lora_tensors
    assert set(EXPECTED_VLLM_NAMES[model_type]) <= set(exported)  # a new family adds its literal names here

    trained_prefix = f"base_model.model.{get_family(model_type).language_model}."  # every LoRA layer is in the LM
    renamed = {f"base_model.model.{LANGUAGE_MODEL_IN_CHECKPOINT[model_type]}{name.removeprefix(trained_prefix)}": tensor
               for name, tensor in saved.items()}
    assert renamed.keys() == exported.keys()
    assert all(torch.equal(exported[name], tensor) for name, tensor in renamed.items())
    # Each adapted module is one whose weight the checkpoint (the layout vLLM loads) holds under that name.
    modules = {name.removeprefix("base_model.model.").split(".lora_")[0] for name in exported}
    assert {f"{module}.weight" for module in modules} <= checkpoint_weight_names(tiny_checkpoint(model_type))

    config = json.loads((report.out_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(modules)
    original = run.adapter_settings()
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (original["r"], original["lora_alpha"], "LORA")


@pytest.mark.parametrize(("model_type", "why"), [("llava_next", "does not support LoRA"), ("mllama", "never served LoRA")])
def test_vllm_export_refuses_families_vllm_serves_no_lora_for(model_type, why, tiny_run, tmp_path):
    with pytest.raises(VllmLayoutError, match=rf"--form vllm: .*{why}.*--form merged"):
        export_vllm(read_run(tiny_run(model_type)), tmp_path / "vllm")
    assert not (tmp_path / "vllm").exists()


def test_vllm_export_refuses_lora_on_the_vision_tower_which_vllm_would_ignore(tiny_checkpoint, tmp_path):
    targets = r"model\.(language_model\.layers\.\d+\.self_attn\.q_proj|visual\.blocks\.\d+\.attn\.qkv)"
    run_dir = make_run(tmp_path / "run", tiny_checkpoint("qwen2_vl"), "qwen2_vl", LoraSettings(r=4, target_modules=targets))
    with pytest.raises(VllmLayoutError, match=r"outside the language model .*model\.visual\.blocks\.0\.attn\.qkv"):
        export_vllm(read_run(run_dir), tmp_path / "vllm")


# ---- adapter -----------------------------------------------------------------------------------
def test_adapter_export_is_the_adapter_as_saved_with_the_runs_processor(tiny_run, tiny_models, tmp_path, one_cpu_thread):
    family, processor, _ = tiny_models["llava"]
    run = read_run(tiny_run("llava"))
    report = export_adapter(run, tmp_path / "adapter")
    for path in run.adapter_dir.iterdir():
        assert (report.out_dir / path.name).read_bytes() == path.read_bytes()
    assert report.lora_tensors == len(load_file(report.out_dir / "adapter_model.safetensors"))

    from peft import PeftModel

    inputs = sample_inputs(load_processor(str(report.out_dir), family))
    assert torch.equal(inputs["input_ids"], sample_inputs(processor)["input_ids"])
    from_export = PeftModel.from_pretrained(load_base(run), str(report.out_dir))
    from_run = attach_adapter(load_base(run), run)
    assert torch.equal(logits(from_export, inputs), logits(from_run, inputs))


# ---- refusals ----------------------------------------------------------------------------------
EXPORTS = {"adapter": export_adapter, "merged": export_merged, "vllm": export_vllm}


@pytest.mark.parametrize("form", sorted(EXPORTS))
def test_a_run_without_an_adapter_is_refused_by_every_form(form, tiny_run, tmp_path, capsys):
    run_dir = copy_run(tiny_run("qwen2_vl"), tmp_path / "run")
    shutil.rmtree(run_dir / "adapter")
    assert main([str(run_dir), "--form", form, "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "has no adapter" in error and "adapter_config.json is missing" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("form", sorted(EXPORTS))
def test_an_adapter_trained_on_another_family_is_refused(form, tiny_run, tmp_path):
    run_dir = copy_run(tiny_run("llava"), tmp_path / "run")
    shutil.rmtree(run_dir / "adapter")
    shutil.copytree(tiny_run("qwen2_vl") / "adapter", run_dir / "adapter")
    with pytest.raises(RunDirError, match="trained on a Qwen2VLForConditionalGeneration, not on this LlavaForConditional"):
        EXPORTS[form](read_run(run_dir), tmp_path / "out")


@pytest.mark.parametrize("form", sorted(EXPORTS))
def test_an_adapter_trained_on_a_base_of_another_width_is_refused(form, tiny_run, tmp_path_factory, tmp_path):
    from vlm.data.demo import DEMO_VOCABULARY
    from vlm.models.families.llava import Llava

    wider = build_tiny_checkpoint(Llava(tiny=TinySize(hidden_size=192)), tmp_path_factory.mktemp("wide"), DEMO_VOCABULARY)
    run_dir = copy_run(tiny_run("llava"), tmp_path / "run")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (run_dir / "metrics.json").write_text(json.dumps({**metrics, "checkpoint": str(wider)}))
    with pytest.raises(RunDirError, match=r"does not fit this base model .*lora_[AB]\.weight: 128 wide, the layer 192"):
        EXPORTS[form](read_run(run_dir), tmp_path / "out")


def test_a_merge_that_would_leave_out_layers_the_adapter_file_holds_is_refused(tiny_run, tmp_path):
    # PEFT wraps only the layers adapter_config.json targets and drops the file's other matrices with a warning.
    run_dir = copy_run(tiny_run("mllama"), tmp_path / "run")
    config_path = run_dir / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    dropped = min(config["target_modules"])  # a full name, or a suffix where PEFT shortened the list
    config["target_modules"] = [name for name in config["target_modules"] if name != dropped]
    config_path.write_text(json.dumps(config))
    with pytest.raises(MergeError, match=rf"1 in the file but not loaded \(e\.g\. \['[\w.]*{re.escape(dropped)}'\]"):
        export_merged(read_run(run_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_merge_that_leaves_the_weights_unchanged_is_refused(tiny_run, tmp_path, monkeypatch):
    from peft.tuners.lora import Linear

    real_merge = Linear.merge

    def merge_then_undo(self, *args, **kwargs):  # PEFT records the merge, the weight does not change
        real_merge(self, *args, **kwargs)
        weight = self.get_base_layer().weight
        weight.data -= self.get_delta_weight("default").to(weight.dtype)

    monkeypatch.setattr(Linear, "merge", merge_then_undo)
    with pytest.raises(MergeError, match=r"the merged weight of model\.language_model\.layers\.0\.mlp\.down_proj is not"):
        export_merged(read_run(tiny_run("qwen2_vl")), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_export_never_writes_into_a_directory_that_holds_files(tiny_run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"an earlier export")
    with pytest.raises(ConfigError, match=r"--out .* is not empty"):
        export_vllm(read_run(tiny_run("qwen2_vl")), tmp_path / "out")


# ---- the command -------------------------------------------------------------------------------
def test_the_command_prints_what_it_wrote(tiny_run, tmp_path, capsys, one_cpu_thread):
    out = tmp_path / "merged"
    assert main([str(tiny_run("llava_next")), "--form", "merged", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    layers = len({k.split(".lora_")[0] for k in load_file(tiny_run("llava_next") / "adapter" / "adapter_model.safetensors")})
    assert f"{layers} LoRA layers ({2 * layers} tensors) merged" in printed
    assert "model.safetensors" in printed and "config.json" in printed and "total" in printed
    assert transformers.AutoConfig.from_pretrained(out).model_type == "llava_next"
