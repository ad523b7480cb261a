"""The frozen NF4 linear that ``torch.compile`` traces: its dequantization operator gives bitsandbytes' bits,
the layer computes what ``Linear4bit`` computes, forward and backward, compiled or not, and it keeps no
16-bit copy of the weight for the backward. Its LoRA form computes base plus scaled adapter as a float64
reference does, and in bf16 keeps as much of an adapter's small update as the device's ``addmm`` keeps: on the CPU
all of it, where PEFT's separately rounded sum loses most."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_close_at_scale, assert_same_bits, dtype_id, quantized_nf4_weight

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from vlm.kernels.nf4_linear import (  # noqa: E402
    _storage_args,
    dequantize_nf4_op,
    nf4_linear,
    nf4_linear_reference,
    nf4_lora_linear,
    nf4_lora_linear_reference,
)

# On a GPU the operator runs the Triton kernel; elsewhere its plain-indexing body.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DOUBLE_QUANT = pytest.mark.parametrize("double_quant", [False, True], ids=["absmax_fp32", "double_quant"])


@pytest.mark.parametrize("quant_dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("shape", [(70, 130), (64, 256)], ids=["blocks_straddle_rows", "aligned"])
@DOUBLE_QUANT
def test_the_dequantization_operator_gives_bitsandbytes_bits(shape, quant_dtype, out_dtype, double_quant):
    generator = torch.Generator().manual_seed(0)
    packed, quant_state = quantized_nf4_weight(*shape, quant_dtype, double_quant, generator, DEVICE)
    tensors, (out_features, in_features, blocksize, nested_blocksize, dtype) = _storage_args(quant_state)
    weight = dequantize_nf4_op(packed, *tensors, out_features, in_features, blocksize, nested_blocksize, dtype, out_dtype)
    assert_same_bits(weight, bnb_functional.dequantize_4bit(packed, quant_state).to(out_dtype))


def _inputs(double_quant: bool, with_bias: bool, seed: int = 1):  # noqa: ANN202
    generator = torch.Generator().manual_seed(seed)
    packed, quant_state = quantized_nf4_weight(96, 128, torch.bfloat16, double_quant, generator, DEVICE)
    x = torch.randn(2, 7, 128, generator=generator).to(DEVICE, torch.bfloat16)
    bias = torch.randn(96, generator=generator).to(DEVICE, torch.bfloat16) if with_bias else None
    grad_output = torch.randn(2, 7, 96, generator=generator).to(DEVICE, torch.bfloat16)
    return x, packed, quant_state, bias, grad_output


def _run(linear, x, packed, quant_state, bias, grad_output):  # noqa: ANN001, ANN202
    x = x.clone().requires_grad_()
    bias = None if bias is None else bias.clone().requires_grad_()
    y = linear(x, packed, quant_state, bias)
    y.backward(grad_output)
    return y.detach(), x.grad, None if bias is None else bias.grad


@DOUBLE_QUANT
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "trainable_bias"])
def test_forward_and_grads_are_those_of_the_bitsandbytes_layer(double_quant, with_bias):
    inputs = _inputs(double_quant, with_bias)
    actual, expected = _run(nf4_linear, *inputs), _run(nf4_linear_reference, *inputs)
    for got, want in zip(actual, expected):
        if want is not None:
            assert_same_bits(got, want)


def test_compiled_whole_it_computes_what_it_computes_eagerly():
    import torch._dynamo

    torch._dynamo.reset()
    inputs = _inputs(double_quant=True, with_bias=True, seed=3)
    compiled = torch.compile(nf4_linear, fullgraph=True)  # a graph break would raise
    for got, want in zip(_run(compiled, *inputs), _run(nf4_linear, *inputs)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.gpu
def test_a_compiled_program_launches_the_dequantization_kernel_itself():
    """The operator's Python (its launch arguments, the custom-op dispatch) runs once, while compiling: the
    program calls the Triton kernel directly, once for the forward and once for the backward."""
    import torch._dynamo

    torch._dynamo.reset()
    inputs = _inputs(double_quant=True, with_bias=False, seed=4)
    compiled = torch.compile(nf4_linear, fullgraph=True)
    expected = _run(nf4_linear, *inputs)
    _run(compiled, *inputs)  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as profile:
        got = _run(compiled, *inputs)
    names = [event.name for event in profile.events()]
    assert "vlm::dequantize_nf4" not in names
    assert sum("_dequantize_nf4_plain_kernel" in name and event.device_type == torch.autograd.DeviceType.CUDA
               for name, event in zip(names, profile.events())) == 2
    for a, b in zip(got[:2], expected[:2]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch._dynamo.reset()


def test_the_backward_keeps_the_packed_weight_not_a_16_bit_copy():
    x, packed, quant_state, _, _ = _inputs(double_quant=True, with_bias=False)
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        nf4_linear(x.clone().requires_grad_(), packed, quant_state)
    assert saved and any(tensor is packed for tensor in saved)
    assert not [t for t in saved if t.is_floating_point() and t.numel() >= packed.numel()]


# --------------------------------------------------------------------------- the LoRA form
# Against float64, relative to each result's RMS: fp32 differs by the order of its sums; bf16 by the rounding of
# its inputs and of each product's result.
LORA_TOLERANCE = {torch.float32: {"rtol": 0, "atol": 1e-5}, torch.bfloat16: {"rtol": 0, "atol": 2e-2}}


def _lora_inputs(dtype: torch.dtype, with_bias: bool, seed: int = 5):  # noqa: ANN202
    generator = torch.Generator().manual_seed(seed)
    packed, quant_state = quantized_nf4_weight(96, 128, torch.bfloat16, True, generator, DEVICE)
    tensors = {
        "x": torch.randn(2, 7, 128, generator=generator),
        "lora_A": torch.randn(8, 128, generator=generator) / 128**0.5,
        "lora_B": torch.randn(96, 8, generator=generator) / 8**0.5,
        "bias": torch.randn(96, generator=generator) if with_bias else None,
        "grad_output": torch.randn(2, 7, 96, generator=generator),
    }
    return packed, quant_state, {k: None if t is None else t.to(DEVICE, dtype) for k, t in tensors.items()}


def _run_lora(linear, packed, quant_state, tensors, dtype, scaling=2.0):  # noqa: ANN001, ANN202
    """The output and the grads of x, A, B and the bias, all computed in ``dtype``."""
    leaves = {k: tensors[k].to(dtype).clone().requires_grad_() for k in ("x", "lora_A", "lora_B")}
    bias = None if tensors["bias"] is None else tensors["bias"].to(dtype).clone().requires_grad_()
    out = linear(leaves["x"], packed, quant_state, leaves["lora_A"], leaves["lora_B"], scaling, bias)
    out.backward(tensors["grad_output"].to(dtype))
    grads = [leaves[k].grad for k in ("x", "lora_A", "lora_B")] + ([] if bias is None else [bias.grad])
    return [out.detach(), *grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "trainable_bias"])
def test_the_lora_form_computes_base_plus_scaled_adapter_and_its_grads_as_float64_does(dtype, with_bias):
    packed, quant_state, tensors = _lora_inputs(dtype, with_bias)
    expected = _run_lora(nf4_lora_linear_reference, packed, quant_state, tensors, torch.float64)
    actual = _run_lora(nf4_lora_linear, packed, quant_state, tensors, dtype)
    assert len(actual) == len(expected) == 4 + with_bias
    for got, want in zip(actual, expected):
        assert got.dtype == dtype
        assert_close_at_scale(got, want, LORA_TOLERANCE[dtype])


def test_the_lora_form_compiled_whole_computes_what_it_computes_eagerly():
    import torch._dynamo

    torch._dynamo.reset()
    packed, quant_state, tensors = _lora_inputs(torch.bfloat16, with_bias=True, seed=6)
    compiled = torch.compile(nf4_lora_linear, fullgraph=True)  # a graph break would raise
    for got, want in zip(_run_lora(compiled, packed, quant_state, tensors, torch.bfloat16),
                         _run_lora(nf4_lora_linear, packed, quant_state, tensors, torch.bfloat16)):
        assert_close_at_scale(got, want, LORA_TOLERANCE[torch.bfloat16])
    torch._dynamo.reset()


# (tokens, in, out): a small layer everywhere; on a GPU also the shapes of Llama-3.2-11B-Vision's linears at 2048
# tokens, where cuBLAS may split the inner dimension.
UPDATE_SHAPES = [
    pytest.param((128, 1024, 256), id="small"),
    pytest.param((2048, 14336, 4096), id="down_proj_2048", marks=pytest.mark.gpu),
    pytest.param((2048, 4096, 14336), id="up_proj_2048", marks=pytest.mark.gpu),
]


def _addmm_form(x, packed, quant_state, lora_A, lora_B, scaling):  # noqa: ANN001, ANN202
    """The fused op's sum as its device's bare ``addmm`` makes it: the LoRA product, then the big GEMM onto it."""
    weight = bnb_functional.dequantize_4bit(packed, quant_state).to(x.dtype)
    return torch.addmm(torch.mm(torch.mm(x, lora_A.t()) * scaling, lora_B.t()), x, weight.t())


@pytest.mark.parametrize("shape", UPDATE_SHAPES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_in_bf16_an_adapters_first_update_survives_the_sum_as_the_devices_addmm_keeps_it(shape, compiled):
    """After one AdamW step at lr 2e-4 from PEFT's B = 0, each of B's elements is about +-2e-4, and the adapter adds
    about 4e-4 to outputs of size 1: a twentieth of a bf16 step there. PEFT's sum of two bf16 results rounds a value
    already on bf16's grid plus the update, which brings back the same grid point for most elements: it keeps about
    a quarter of the update. The fused op accumulates the big product onto the adapter's with ``addmm`` and keeps
    what the device's ``addmm`` keeps: all of it where the sum is rounded once from fp32 (measured: 100.5% on an
    AVX512-BF16 CPU), and on an H200 what PEFT's sum keeps (measured: 26%; cuBLAS rounds the product before adding
    the input, with or without its reduced-precision split-K reduction), never less."""
    import torch._dynamo

    tokens, in_features, out_features = shape
    generator = torch.Generator().manual_seed(7)
    packed, quant_state = quantized_nf4_weight(out_features, in_features, torch.bfloat16, True, generator, DEVICE)
    x = torch.randn(tokens, in_features, generator=generator)
    lora_A = (torch.rand(16, in_features, generator=generator) * 2 - 1) / in_features**0.5  # PEFT's init
    lora_B = torch.randn(out_features, 16, generator=generator).sign() * 2e-4
    update = (x.double() @ lora_A.double().T) @ lora_B.double().T  # what B's step adds to the output (scaling 1)
    torch._dynamo.reset()

    def kept(linear) -> float:  # noqa: ANN001
        """The share of ``update`` that the bf16 output moves by when B takes its step."""
        args = [t.to(DEVICE, torch.bfloat16) for t in (x, lora_A, lora_B)]
        with torch.no_grad():
            moved = linear(args[0], packed, quant_state, args[1], args[2], 1.0) - linear(
                args[0], packed, quant_state, args[1], torch.zeros_like(args[2]), 1.0)
        moved = moved.double().cpu()
        return float((moved * update).sum() / update.square().sum())

    fused = kept(torch.compile(nf4_lora_linear, fullgraph=True) if compiled else nf4_lora_linear)
    peft = kept(nf4_lora_linear_reference)
    assert peft < 0.5
    assert fused == pytest.approx(kept(_addmm_form), abs=0.02)
    assert fused > peft - 0.02
    torch._dynamo.reset()
