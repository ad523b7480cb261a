"""Kernels patched into a tiny QLoRA model: the same loss and gradients as the unpatched model.

The comparison runs in fp32 (compute dtype and LoRA weights), where the tolerances can be tight:
the only differences left are the order of floating-point operations.
"""

from __future__ import annotations

import pytest
import torch
from test_models import one_image_conversation

from vlm.models.families import get_family
from vlm.models.loading import load_model, load_processor
from vlm.models.lora import LoraSettings, apply_lora
from vlm.patching import KernelSettings
from vlm.patching import apply_kernels as patch_kernels
from vlm.quant.config import QuantConfig

# Triton runs CUDA tensors, or CPU tensors in its interpreter (set by conftest without a GPU).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOSS_TOLERANCE = dict(rtol=1e-4, atol=1e-5)
GRAD_TOLERANCE = dict(rtol=1e-3, atol=1e-5)
ALL = KernelSettings(rms_norm=True, layer_norm=True, rope=True, swiglu=True, geglu=True, cross_entropy=True, lora=True)

# What each tiny family must get patched (at least these many places).
EXPECTED = {
    "qwen2_5_vl": {"rms_norm": 6, "swiglu": 4, "rope": 1, "cross_entropy": 1, "lora": 14},
    "mllama": {"rms_norm": 6, "layer_norm": 4, "swiglu": 3, "rope": 1, "cross_entropy": 1, "lora": 21},
    # q_norm and k_norm included; the rotary kernel applies the cos/sin that interleaved mrope composed.
    "qwen3_vl": {"rms_norm": 9, "layer_norm": 6, "swiglu": 2, "rope": 1, "cross_entropy": 1, "lora": 14},
    # Gemma's (1 + w) norms, the projector's among them, and its tanh-GELU MLPs.
    "gemma3": {"rms_norm": 14, "layer_norm": 5, "geglu": 2, "rope": 1, "cross_entropy": 1, "lora": 14},
    "smolvlm": {"rms_norm": 5, "layer_norm": 5, "swiglu": 2, "rope": 1, "cross_entropy": 1, "lora": 14},
    "idefics3": {"rms_norm": 5, "layer_norm": 5, "swiglu": 2, "rope": 1, "cross_entropy": 1, "lora": 14},
}


def qlora_model(model_type: str, path: str):
    family = get_family(model_type)
    model, _ = load_model(path, family, QuantConfig(compute_dtype="float32"), device=DEVICE)
    torch.manual_seed(0)
    model = apply_lora(model, family, LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # fresh LoRA B is zero: the gradient of A would be zero and prove nothing
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    return model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.fixture
def apply_kernels():
    """``apply_kernels`` whose patches are undone after the test: the rotary patch replaces functions
    of transformers' modeling modules, which outlive the test's model."""
    reports = []

    def apply(model, settings):
        reports.append(patch_kernels(model, settings))
        return reports[-1]

    yield apply
    for report in reversed(reports):
        report.undo()


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_patched_model_has_the_same_loss_and_gradients(model_type, tiny_checkpoint, one_cpu_thread, apply_kernels):
    path = tiny_checkpoint(model_type)
    processor = load_processor(path, get_family(model_type))
    batch = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in one_image_conversation(processor).items()}

    model = qlora_model(model_type, path)
    reference_loss, reference_grads = loss_and_grads(model, batch)
    report = apply_kernels(model, ALL)
    for kernel, at_least in EXPECTED[model_type].items():
        assert report.patched[kernel] >= at_least, report.summary()
    loss, grads = loss_and_grads(model, batch)

    torch.testing.assert_close(loss, reference_loss, **LOSS_TOLERANCE)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], **GRAD_TOLERANCE, msg=lambda m, n=name: f"{n}: {m}")


def test_undo_takes_every_patch_back(tiny_checkpoint):
    import sys

    model = qlora_model("qwen2_5_vl", tiny_checkpoint("qwen2_5_vl"))
    modeling = {name: dict(vars(sys.modules[name])) for name in {type(m).__module__ for m in model.modules()}}
    own_forwards = {name for name, module in model.named_modules() if "forward" in vars(module)}

    report = patch_kernels(model, ALL)
    assert sum(report.patched.values()) > 20
    report.undo()

    assert {name for name, module in model.named_modules() if "forward" in vars(module)} == own_forwards
    for name, attributes in modeling.items():
        now = vars(sys.modules[name])
        assert all(now[key] is value for key, value in attributes.items() if key.startswith("apply_")), name


def test_each_kernel_switches_on_alone(tiny_checkpoint, apply_kernels):
    model = qlora_model("qwen2_5_vl", tiny_checkpoint("qwen2_5_vl"))
    report = apply_kernels(model, KernelSettings(rms_norm=True))
    assert set(report.patched) == {"rms_norm"}
    assert apply_kernels(model, KernelSettings()).patched == {}


def test_an_auto_switch_is_on_for_cuda_and_off_elsewhere_and_the_others_stay_as_given():
    settings = KernelSettings(rms_norm=True, cross_entropy="auto")
    assert settings.resolved("cuda") == KernelSettings(rms_norm=True, cross_entropy=True)
    assert settings.resolved("cuda:1").enabled() == ["rms_norm", "cross_entropy"]
    assert settings.resolved("cpu") == KernelSettings(rms_norm=True, cross_entropy=False)
    assert settings.auto_summary("cpu") == "cross_entropy: auto → off (not CUDA)"
    assert settings.auto_summary("cuda") == "cross_entropy: auto → on (CUDA)"
    assert KernelSettings(lora=True).auto_summary("cuda") == ""


def test_what_reads_the_switches_takes_them_resolved_for_a_device():
    """``auto`` would read as on: ``enabled()`` and ``apply_kernels`` refuse it unresolved."""
    settings = KernelSettings(cross_entropy="auto")
    assert not settings.is_resolved and settings.resolved("cpu").is_resolved
    with pytest.raises(ValueError, match=r"auto switches: take KernelSettings\.resolved\(device\) first"):
        settings.enabled()
    with pytest.raises(ValueError, match="auto switches"):
        patch_kernels(torch.nn.Linear(2, 2), settings)
    assert patch_kernels(torch.nn.Linear(2, 2), settings.resolved("cpu")).patched == {}


def test_a_switch_is_true_false_or_auto():
    for value in ("maybe", "on", 1, None):
        with pytest.raises(ValueError, match=rf"kernels\.rope={value!r} must be true, false or auto"):
            KernelSettings(rope=value)


def test_the_auto_group_turns_on_only_the_loss_kernel_and_only_on_cuda():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from vlm.configs import config_dir

    settings = instantiate(OmegaConf.load(config_dir() / "kernels" / "auto.yaml"))
    assert settings.resolved("cuda").enabled() == ["cross_entropy"]
    assert settings.resolved("cpu").enabled() == []


@pytest.mark.parametrize("model_type", ["mllama", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava", "llava_next", "gemma3",
                                        "smolvlm", "idefics3"])
def test_a_model_with_the_loss_kernel_generates_what_it_generated_before(model_type, tiny_checkpoint, one_cpu_thread,
                                                                          apply_kernels):
    """Generation passes no labels, so the loss kernel is not called, but ``generate()`` checks its inputs (the
    image's ``pixel_values``, ``image_sizes``, ...) against the forward's named parameters: the patched forward
    shows the original's."""
    path = tiny_checkpoint(model_type)
    prompt = one_image_conversation(load_processor(path, get_family(model_type)))
    prompt = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in prompt.items() if k != "labels"}
    model = qlora_model(model_type, path).eval()
    expected = model.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert apply_kernels(model, KernelSettings(cross_entropy=True)).patched == {"cross_entropy": 1}
    assert torch.equal(model.generate(**prompt, max_new_tokens=3, do_sample=False), expected)


def test_lora_dropout_keeps_peft_forward(tiny_checkpoint, apply_kernels):
    family = get_family("qwen2_5_vl")
    model, _ = load_model(tiny_checkpoint("qwen2_5_vl"), family, QuantConfig(compute_dtype="float32"), device=DEVICE)
    model = apply_lora(model, family, LoraSettings(r=4, alpha=8, dropout=0.1))
    report = apply_kernels(model, KernelSettings(lora=True))
    assert report.patched["lora"] == 0 and report.skipped["lora: dropout, several adapters or a variant"] == 14


def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act="silu")).to(DEVICE)


@pytest.mark.parametrize("hooked", [False, True], ids=["no_hook", "hook_keeps_output"])
def test_patched_mlp_overwrites_its_projections_only_when_no_hook_can_see_them(hooked, apply_kernels):
    mlp = _llama_mlp()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kept = []
    if hooked:
        mlp.gate_proj.register_forward_hook(lambda module, args, output: kept.append((output, output.clone())))
    expected = torch.autograd.grad(mlp(x.requires_grad_()).sum(), x)[0]
    assert apply_kernels(mlp, KernelSettings(swiglu=True)).patched["swiglu"] == 1
    kept.clear()

    grad = torch.autograd.grad(mlp(x).sum(), x)[0]

    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    if hooked:  # what the hook kept is still the forward output
        output, copy = kept[0]
        torch.testing.assert_close(output, copy, rtol=0, atol=0)


def test_patched_mlp_keeps_a_projection_output_that_its_own_op_saved_for_backward(apply_kernels):
    # tanh saves its result for backward: writing the gate's grad over it would corrupt gate_proj's grads.
    mlp = _llama_mlp()
    mlp.gate_proj = torch.nn.Sequential(mlp.gate_proj, torch.nn.Tanh())
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def grads():
        mlp.zero_grad(set_to_none=True)
        mlp(x).square().sum().backward()
        return {name: p.grad.clone() for name, p in mlp.named_parameters()}

    expected = grads()
    assert apply_kernels(mlp, KernelSettings(swiglu=True)).patched["swiglu"] == 1
    actual = grads()
    for name, grad in actual.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)


class _Doubled(torch.autograd.Function):
    """A custom autograd Function that saves its input, as most do."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a * 2

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return grad * 2 + 0 * a


class _DoubledModule(torch.nn.Module):
    def forward(self, a):
        return _Doubled.apply(a)


@pytest.mark.parametrize("gate_from", ["linear", "custom_function"])
def test_patched_mlp_under_activation_checkpointing_recomputes_once_and_matches(gate_from, apply_kernels):
    # From a custom Function, deciding whether the gate may be overwritten must not unpack that Function's
    # saved tensors in forward, which under checkpointing would run an extra recomputation.
    from torch.utils.checkpoint import checkpoint

    mlp = _llama_mlp()
    if gate_from == "custom_function":
        mlp.gate_proj = torch.nn.Sequential(mlp.gate_proj, _DoubledModule())
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE).requires_grad_()
    expected = torch.autograd.grad(checkpoint(mlp, x, use_reentrant=False).square().sum(), x)[0]
    apply_kernels(mlp, KernelSettings(swiglu=True))
    calls = []
    mlp.up_proj.register_forward_pre_hook(lambda module, args: calls.append(1))

    grad = torch.autograd.grad(checkpoint(mlp, x, use_reentrant=False).square().sum(), x)[0]

    assert len(calls) == 2  # the forward and one recomputation in backward
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
