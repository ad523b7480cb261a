"""The frozen NF4 linear that ``torch.compile`` traces: its dequantization operator gives bitsandbytes' bits,
the layer computes what ``Linear4bit`` computes, forward and backward, compiled or not, and it keeps no
16-bit copy of the weight for the backward."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_same_bits, dtype_id, quantized_nf4_weight

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from vlm.kernels.nf4_linear import _storage_args, dequantize_nf4_op, nf4_linear, nf4_linear_reference  # noqa: E402

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
