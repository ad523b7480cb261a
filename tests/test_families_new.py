"""Qwen3-VL, Gemma 3, SmolVLM2 and Idefics3: what is particular to each, beyond the tests that run every family.

Where each keeps its parts, its chat template's exact rendering, Gemma's image markup and image token
types, SmolVLM's tiled images kept whole by truncation, the RMSNorm patch telling Gemma's norms from
Llama's, the dynamic policy, the refusal of a family the installed transformers lacks, the full-size
architectures the step benchmark builds, and a short demo run per family that learns.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import transformers
from composing import compose_small
from PIL import Image
from test_models import one_image_conversation

from vlm.data.encoding import IGNORE_INDEX, ConversationEncoder, EncoderSettings, structured_messages
from vlm.data.records import Sample
from vlm.errors import ConfigError
from vlm.models.families import FAMILIES, get_family
from vlm.models.families.base import slow_image_processor_class
from vlm.models.loading import load_config, load_model, load_processor, model_skeleton
from vlm.models.lora import LoraSettings, lora_target_names
from vlm.quant.config import QuantConfig
from vlm.quant.policies import linear_layer_names

NEW_FAMILIES = ["gemma3", "idefics3", "qwen3_vl", "smolvlm"]
BENCH_STEP = Path(__file__).resolve().parents[1] / "scripts" / "bench_step.py"

# Where each family's parts are in the transformers 5 model (checked on the tiny model's module tree).
PARTS = {
    "qwen3_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "gemma3": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "smolvlm": ("model.vision_model", "model.connector", "model.text_model"),
    "idefics3": ("model.vision_model", "model.connector", "model.text_model"),
}
DECODER_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "<image>\nwhat colour ?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and now ?"},
]
# The conversation above with the generation prompt, in each family's own format.
RENDERED = {
    "qwen3_vl": "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
    "what colour ?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n<|im_start|>user\nand now ?<|im_end|>\n"
    "<|im_start|>assistant\n",
    # The system message opens the first user turn; the assistant is "model".
    "gemma3": "<bos><start_of_turn>user\nbe brief\n\n<start_of_image>what colour ?<end_of_turn>\n"
    "<start_of_turn>model\nred<end_of_turn>\n<start_of_turn>user\nand now ?<end_of_turn>\n<start_of_turn>model\n",
    # No space after the colon of a turn that opens with an image.
    "smolvlm": "<|im_start|>System: be brief<end_of_utterance>\nUser:<image>what colour ?<end_of_utterance>\n"
    "Assistant: red<end_of_utterance>\nUser: and now ?<end_of_utterance>\nAssistant:",
    "idefics3": "<|begin_of_text|>System: be brief<end_of_utterance>\nUser:<image>what colour ?<end_of_utterance>\n"
    "Assistant: red<end_of_utterance>\nUser: and now ?<end_of_utterance>\nAssistant:",
}


def load_bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", BENCH_STEP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def image(colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def two_image_sample() -> Sample:
    return Sample(
        key="two-images",
        images=[image((200, 0, 0)), image((0, 200, 0), (64, 64))],
        messages=[
            {"role": "user", "content": "<image>\nwhat colour is the circle ?"},
            {"role": "assistant", "content": "red"},
            {"role": "user", "content": "and here <image> what colour is the circle ?"},
            {"role": "assistant", "content": "green"},
        ],
    )


def supervised_text(tokenizer, encoded) -> str:
    labels = encoded["labels"][0]
    return tokenizer.decode(labels[labels != IGNORE_INDEX])


# ---- parts, LoRA targets, processors ----------------------------------------------------------------
@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_the_family_names_where_its_parts_live_in_the_loaded_model(model_type, tiny_checkpoint):
    family = get_family(model_type)
    path = tiny_checkpoint(model_type)
    skeleton = model_skeleton(family, load_config(path, family))
    vision, projector, language = PARTS[model_type]
    assert (family.vision_tower, family.projector, family.language_model) == PARTS[model_type]
    for name in PARTS[model_type]:
        skeleton.get_submodule(name)  # raises when the name is wrong
    # Every linear layer is in one of the parts, or is the output head.
    outside = [n for n in linear_layer_names(skeleton) if n != "lm_head" and not n.startswith((vision, projector, language))]
    assert not outside
    # LoRA goes on every linear layer of every decoder layer, and nowhere else.
    expected = [f"{language}.layers.{i}.{linear}" for i in range(2) for linear in DECODER_LINEARS]
    assert lora_target_names(skeleton, family, LoraSettings()) == expected
    assert family.decoder_layer_classes(skeleton) and len(skeleton.get_submodule(f"{language}.layers")) == 2


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_the_processor_loads_with_the_settings_it_was_saved_with(model_type, tiny_models):
    family, processor, _ = tiny_models[model_type]
    # The tokens an image becomes: the tiny checkpoint's, not the processor class's default.
    per_image = {"gemma3": ("image_seq_length", 4), "smolvlm": ("image_seq_len", 4), "idefics3": ("image_seq_len", 4)}
    if model_type in per_image:
        attribute, value = per_image[model_type]
        assert getattr(processor, attribute) == value
    assert type(processor).__name__ == family.processor_class_name
    assert type(processor.image_processor).__name__.endswith("Pil")  # the PIL one: no torchvision needed


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_the_chat_template_renders_the_familys_own_format_and_is_prefix_stable(model_type, tiny_models):
    _, processor, _ = tiny_models[model_type]
    messages = structured_messages(CONVERSATION)
    rendered = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == RENDERED[model_type]
    # Every prefix of the conversation renders as a prefix of the whole (what label masking needs).
    whole = processor.apply_chat_template(messages, tokenize=False)
    for n in range(1, len(messages)):
        assert whole.startswith(processor.apply_chat_template(messages[:n], tokenize=False))


# ---- Gemma 3: image markup and token types ----------------------------------------------------------
def test_gemma3_marks_exactly_its_soft_tokens_as_image_and_supervises_none_of_the_markup(tiny_models):
    family, processor, _ = tiny_models["gemma3"]
    encoder = ConversationEncoder(processor, family.image_token, EncoderSettings(4096))
    assert encoder.placeholder == "<start_of_image>"  # rendered text; the ids hold soft tokens
    encoded = encoder(two_image_sample())
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    tokenizer = processor.tokenizer
    soft = ids == tokenizer.convert_tokens_to_ids("<image_soft_token>")
    # The bidirectional attention over an image reads these: one per soft token, nothing else.
    assert torch.equal(encoded["token_type_ids"][0].bool(), soft)
    assert int(soft.sum()) == 2 * 4
    for marker in ("<start_of_image>", "<end_of_image>"):
        at = ids == tokenizer.convert_tokens_to_ids(marker)
        assert int(at.sum()) == 2 and bool((labels[at] == IGNORE_INDEX).all())
    assert supervised_text(tokenizer, encoded) == "red<end_of_turn>\ngreen<end_of_turn>\n"


# ---- SmolVLM: an image split into tiles stays whole -----------------------------------------------
@pytest.fixture(scope="module")
def tiling_processor(tiny_models):
    """The tiny SmolVLM processor scaling images to two tiles a side, as real checkpoints scale to four."""
    family, processor, _ = tiny_models["smolvlm"]
    side = family.tiny.image_size
    return family.image_only_processor(
        image_processor=family.slow_image_processor(side, longest_edge=2 * side),
        tokenizer=processor.tokenizer,
        image_seq_len=processor.image_seq_len,
        chat_template=processor.chat_template,
    )


def test_a_tiled_image_is_one_block_that_truncation_keeps_or_drops_whole(tiling_processor, tiny_models):
    family, _, directory = tiny_models["smolvlm"]
    tokenizer = tiling_processor.tokenizer
    sample = two_image_sample()
    full = ConversationEncoder(tiling_processor, family.image_token, EncoderSettings(4096))(sample)
    ids = full["input_ids"][0]
    # 40x30 becomes 64x48, then 2x2 tiles and the global view; 64x64 too: 5 views of 4 tokens each.
    assert full["pixel_values"].shape[:2] == (1, 10)
    assert int((ids == tokenizer.convert_tokens_to_ids("<image>")).sum()) == 10 * 4
    assert int((ids == tokenizer.convert_tokens_to_ids("<row_2_col_2>")).sum()) == 2
    assert supervised_text(tokenizer, full) == " red<end_of_utterance>\n green<end_of_utterance>\n"

    # A limit inside the second image's tiles: the text is cut before the image, whose views all go.
    fake = (ids == tokenizer.convert_tokens_to_ids("<fake_token_around_image>")).nonzero().flatten().tolist()
    second_image_start = fake[len(fake) // 2]
    limit = second_image_start + 12
    truncated = ConversationEncoder(tiling_processor, family.image_token, EncoderSettings(limit))(sample)
    length = truncated["input_ids"].shape[1]
    assert length <= second_image_start
    assert torch.equal(truncated["input_ids"][0], ids[:length])
    assert truncated["pixel_values"].shape[:2] == (1, 5)
    assert supervised_text(tokenizer, truncated) == " red<end_of_utterance>\n"

    model = family.model_class.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.isfinite(model(**full).loss) and torch.isfinite(model(**truncated).loss)


# ---- kernels ---------------------------------------------------------------------------------------
def test_the_rms_norm_patch_tells_gemmas_norms_from_llamas_and_leaves_other_norms_alone():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRMSNorm

    from vlm.kernels.rms_norm import GEMMA, LLAMA
    from vlm.patching.modules import patch_rms_norms, rms_norm_variant
    from vlm.patching.report import PatchReport

    class DoubledRMSNorm(Qwen3VLTextRMSNorm):  # the attributes of a norm, not its formula
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    gemma, qwen, doubled = Gemma3RMSNorm(64, eps=1e-6), Qwen3VLTextRMSNorm(64), DoubledRMSNorm(64)
    with torch.no_grad():
        for norm in (gemma, qwen, doubled):
            norm.weight.normal_(0, 1)
    assert rms_norm_variant(gemma, 1e-6) is GEMMA
    assert rms_norm_variant(qwen, 1e-6) is LLAMA
    assert rms_norm_variant(doubled, 1e-6) is None

    report = PatchReport()
    patch_rms_norms(torch.nn.ModuleList([gemma.to(torch.bfloat16), doubled]), report)
    assert report.patched["rms_norm"] == 1 and sum(report.skipped.values()) == 1
    assert "forward" not in vars(doubled)
    report.undo()


def test_the_fused_cross_entropy_leaves_soft_capped_logits_alone():
    from vlm.patching.loss import patch_fused_cross_entropy
    from vlm.patching.report import PatchReport

    config = transformers.Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=64, final_logit_softcapping=30.0,
    )
    report = PatchReport()
    patch_fused_cross_entropy(transformers.Gemma3ForCausalLM(config), report)
    assert report.patched["cross_entropy"] == 0 and report.skipped["cross_entropy: soft-capped logits"] == 1


# ---- quantization ----------------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_dynamic_keeps_what_calibration_chose_and_the_model_loads_exactly_that(model_type, tiny_checkpoint,
                                                                            one_cpu_thread):
    from vlm.build.planning import plan_checkpoint
    from vlm.quant.bnb_layers import quantized_layer_names
    from vlm.quant.calibrate import CalibrationSettings

    family, path = get_family(model_type), tiny_checkpoint(model_type)
    batch = one_image_conversation(load_processor(path, family))
    quant = QuantConfig(policy="dynamic")
    settings = CalibrationSettings(budget_fraction=0.2, random_baselines=0, fidelity_batches=1, cache=False)
    planning = plan_checkpoint(path, family, quant, settings, calibration_batches=[batch], heldout_batches=[batch])
    kept = set(planning.plan.kept) - {"lm_head"}
    assert kept and planning.plan.quantized
    model, report = load_model(path, family, quant, quant_plan=planning.plan)
    assert set(quantized_layer_names(model)) == set(planning.plan.quantized) == set(report.plan.quantized)


# ---- transformers versions -------------------------------------------------------------------------
class FutureVL(type(get_family("qwen3_vl"))):
    model_type = "future_vl"
    model_class_name = "FutureVLForConditionalGeneration"
    processor_class_name = "FutureVLProcessor"
    min_transformers = "9.1"


def test_a_family_the_installed_transformers_lacks_is_refused_naming_the_release_it_needs(monkeypatch, tmp_path):
    monkeypatch.setitem(FAMILIES, "future_vl", FutureVL)
    message = (rf"model\.family=future_vl needs transformers >= 9\.1 \(it has no FutureVLForConditionalGeneration, "
               rf"FutureVLProcessor\); installed: {transformers.__version__}")
    with pytest.raises(ConfigError, match=message):
        get_family("future_vl")

    # vlm-train refuses it before any weights load.
    from vlm.cli.train import train
    from vlm.models import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    cfg = compose_small("train", tmp_path, "model.family=future_vl", "logger=csv")
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_a_pil_image_processor_listed_as_a_placeholder_is_imported_from_its_module(monkeypatch):
    # transformers 5.17 lists SmolVLM's and Idefics3's PIL processors as placeholders needing torchvision.
    real = slow_image_processor_class("SmolVLMImageProcessor")
    placeholder = type("Placeholder", (), {"__module__": real.__module__})
    placeholder.__qualname__, placeholder.__name__ = "_LazyModule.__getattr__.<locals>.Placeholder", real.__name__
    monkeypatch.setattr(transformers, real.__name__, placeholder, raising=False)
    assert slow_image_processor_class("SmolVLMImageProcessor") is real


# ---- the step benchmark's full-size models ---------------------------------------------------------
# Parameter counts of the reference checkpoints, and the tokens of the benchmark's 1024x768 image.
FULL_SIZE = {
    "qwen3_vl": (8.77e9, 768),  # Qwen3-VL-8B-Instruct: 32x24 merged 32 px patches
    "gemma3": (4.30e9, 256),  # gemma-3-4b-it: any image is 256 soft tokens
    "smolvlm": (2.25e9, 13 * 81),  # SmolVLM2-2.2B: scaled to 1536x1152, 4x3 tiles and the global view
    "idefics3": (2.25e9, 13 * 81),  # SmolVLM-Instruct
}


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_the_benchmarked_architecture_is_the_reference_checkpoints(model_type):
    from vlm.bench.work import full_size_parts

    bench = load_bench_step()
    family = get_family(model_type)
    processor, config = full_size_parts(family)
    with torch.device("meta"):
        model = family.model_class(config)
    parameters, image_tokens = FULL_SIZE[model_type]
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.005)

    batch = bench.family_batch(processor, 2048, bench.BENCH_IMAGE_SIZE)
    assert {key: value.shape[1] for key, value in batch.items() if key in ("input_ids", "labels", "attention_mask")} == {
        "input_ids": 2048, "labels": 2048, "attention_mask": 2048,
    }
    assert int((batch["input_ids"] == config.image_token_id).sum()) == image_tokens
    # The filler after the prompt is supervised, the prompt and its image are not.
    supervised = batch["labels"][0] != IGNORE_INDEX
    first = int(supervised.nonzero()[0])
    assert first > image_tokens and bool(supervised[first:].all())


@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_the_step_benchmark_runs_its_path_on_the_tiny_variant(model_type, tiny_checkpoint, one_cpu_thread, capsys):
    bench = load_bench_step()
    argv = ["--smoke", "--family", model_type, "--tokens", "96", "--model-dir", tiny_checkpoint(model_type)]
    result = bench.main(argv)
    assert result["family"] == model_type and result["tokens"] == 96 and result["image_tokens"] == 4
    assert len(result["times"]) == 3 and torch.isfinite(torch.tensor(result["loss"]))
    assert capsys.readouterr().out.splitlines()[-1] == "RESULT " + json.dumps(result)


# ---- a short demo run learns ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("model_type", NEW_FAMILIES)
def test_a_short_demo_run_of_the_tiny_variant_learns(model_type, tmp_path, one_cpu_thread):
    from vlm.cli.train import train

    cfg = compose_small(
        "train", tmp_path, f"model=tiny_{model_type}", "trainer.max_steps=30", "trainer.val_check_interval=30",
        "trainer.enable_progress_bar=false", "logger=csv", "callbacks=default",
    )
    summary = train(cfg)
    assert summary["status"] == "completed" and summary["family"] == model_type
    assert summary["final_val_loss"] < 0.5 * summary["initial_val_loss"]


@pytest.mark.parametrize("model_type", ["smolvlm", "idefics3"])
def test_smolvlm_image_features_enter_the_text_embeddings_in_their_dtype_whatever_autocast_made_them(
    model_type, tiny_models
):
    # CUDA autocast runs the vision tower's layer norms in fp32, so the connector's 4-bit layer returns
    # fp32 into bf16 embeddings; here the last norm's output is made fp32 by hand, as autocast would.
    family, processor, checkpoint = tiny_models[model_type]
    model, _ = load_model(checkpoint, family, QuantConfig())
    vision = model.get_submodule(family.vision_tower)
    vision.post_layernorm.register_forward_hook(lambda module, args, output: output.float())
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many shapes are there ?"}]}],
        tokenize=False, add_generation_prompt=True,
    )
    inputs = processor(text=[text], images=[[image((200, 40, 40))]], return_tensors="pt")
    inputs = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
