"""The QLoRA linear kernel against a float64 reference and PEFT on bitsandbytes (its NF4 dequantization:
test_nf4.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from kernel_checks import assert_close_at_scale, assert_same_bits, dtype_id, quantized_nf4_weight

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

from vlm.kernels.qlora_linear import (  # noqa: E402
    DEFAULT_QLORA_TUNING,
    QLoRATuning,
    dequantize_nf4,
    lora_inside_gemm,
    qlora_linear,
    qlora_linear_reference,
)

# Errors are measured on tensors divided by the float64 result's RMS (matmul sums grow with their
# length), so these are relative to the tensor's scale: a few units in the last place of each dtype.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
DTYPES = list(TOLERANCES)
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small inputs take the host-bound path by default (cuBLAS thin products, no side stream); each check also
# runs with that path switched off, so the Triton thin products are tested whatever the size.
PATHS = {"host_bound_path": DEFAULT_QLORA_TUNING, "kernel_path": QLoRATuning(host_bound_max_rows=0)}


# ----------------------------------------------------------------------------- the linear layer


def _random_layer(out_features, in_features, rank, dtype, with_bias, generator, device=DEVICE):
    packed, quant_state = quantized_nf4_weight(out_features, in_features, dtype, True, generator, device)
    lora_A = torch.randn(rank, in_features, generator=generator) / in_features**0.5
    lora_B = torch.randn(out_features, rank, generator=generator) / rank**0.5  # not zero, unlike LoRA's init
    bias = torch.randn(out_features, generator=generator) if with_bias else None
    to = dict(device=device, dtype=dtype)
    return packed, quant_state, lora_A.to(**to), lora_B.to(**to), None if bias is None else bias.to(**to)


def _forward_and_grads(fn, x, lora_A, lora_B, grad_out, **kwargs):
    x, lora_A, lora_B = (t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B))
    out = fn(x, lora_A=lora_A, lora_B=lora_B, **kwargs)
    out.backward(grad_out.to(out.dtype))
    return out, x.grad, lora_A.grad, lora_B.grad


def _check_against_float64_reference(
    x_shape, out_features, rank, dtype, with_bias, device=DEVICE, seed=0, tuning=DEFAULT_QLORA_TUNING
):
    """Forward and grads of ``qlora_linear`` with ``tuning`` against the float64 reference; returns the layer's
    QuantState."""
    generator = torch.Generator().manual_seed(seed)
    in_features = x_shape[-1]
    packed, quant_state, lora_A, lora_B, bias = _random_layer(
        out_features, in_features, rank, dtype, with_bias, generator, device
    )
    x = torch.randn(x_shape, generator=generator).to(device=device, dtype=dtype)
    grad_out = torch.randn(*x_shape[:-1], out_features, generator=generator).to(device)
    scaling = 2.0 if rank > 1 else 0.3  # PEFT's alpha / r, and one that is not a power of two
    common = dict(weight4bit=packed, quant_state=quant_state, scaling=scaling)

    actual = _forward_and_grads(qlora_linear, x, lora_A, lora_B, grad_out, bias=bias, tuning=tuning, **common)
    f64 = torch.float64
    expected = _forward_and_grads(
        qlora_linear_reference, x.to(f64), lora_A.to(f64), lora_B.to(f64), grad_out.to(f64),
        bias=None if bias is None else bias.to(f64), **common,
    )
    for name, a, e in zip(["out", "grad_x", "grad_A", "grad_B"], actual, expected):
        assert a.dtype == dtype and a.shape == e.shape, name
        assert_close_at_scale(a, e, TOLERANCES[dtype])
    return quant_state


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("rank", [1, 8])
@pytest.mark.parametrize(
    "x_shape, out_features",
    [((1, 64), 32), ((2, 3, 100), 48)],
    ids=["one_row", "3d_input_width_100_two_programs"],
)
def test_qlora_linear_matches_float64_reference_forward_and_backward(x_shape, out_features, rank, with_bias, dtype,
                                                                     path):
    _check_against_float64_reference(x_shape, out_features, rank, dtype, with_bias, tuning=PATHS[path])


def test_small_inputs_take_the_host_bound_path_and_large_ones_the_kernels():
    assert DEFAULT_QLORA_TUNING.host_bound(2048) and DEFAULT_QLORA_TUNING.host_bound(4096)
    assert not DEFAULT_QLORA_TUNING.host_bound(4097)
    assert not QLoRATuning(host_bound_max_rows=0).host_bound(1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rank", [1, 8, 32])
@pytest.mark.parametrize("inside", [True, False], ids=["lora_inside_gemm", "lora_before_gemm"])
def test_both_forward_paths_match_float64_reference(inside, rank, dtype, path):
    # [x | x_a] @ [W | B].T, or the LoRA product first and the GEMM accumulating onto it: chosen by the shape
    # against the tuning's widening threshold (here 128 -> 96, which by default goes before the GEMM).
    tuning = dataclasses.replace(PATHS[path], lora_inside_gemm_min_widening=0.0 if inside else float("inf"))
    quant_state = _check_against_float64_reference((2, 3, 128), 96, rank, dtype, with_bias=True, tuning=tuning)
    assert lora_inside_gemm(quant_state, rank, tuning) == inside
    assert not lora_inside_gemm(quant_state, rank, DEFAULT_QLORA_TUNING)


@pytest.mark.parametrize("path", PATHS)
def test_fp32_lora_weights_are_cast_inside_and_their_grads_come_back_in_fp32(path):
    # As PEFT keeps them: fp32 adapters on a bf16 model. The same bits as casting them through autograd first.
    generator = torch.Generator().manual_seed(4)
    packed, quant_state, lora_A, lora_B, _ = _random_layer(96, 128, 8, torch.bfloat16, False, generator)
    lora_A, lora_B = lora_A.float(), lora_B.float()
    x = torch.randn(2, 5, 128, generator=generator).to(DEVICE, torch.bfloat16)
    grad_out = torch.randn(2, 5, 96, generator=generator).to(DEVICE, torch.bfloat16)
    common = dict(weight4bit=packed, quant_state=quant_state, scaling=2.0, tuning=PATHS[path])

    def cast_first(x, lora_A, lora_B, **kwargs):
        return qlora_linear(x, lora_A=lora_A.to(torch.bfloat16), lora_B=lora_B.to(torch.bfloat16), **kwargs)

    inside = _forward_and_grads(qlora_linear, x, lora_A, lora_B, grad_out, **common)
    outside = _forward_and_grads(cast_first, x, lora_A, lora_B, grad_out, **common)
    assert inside[2].dtype == inside[3].dtype == torch.float32
    for a, b in zip(inside, outside):  # out, grad x, grad A, grad B
        assert_same_bits(a, b)


def test_only_lora_grads_when_input_is_frozen():
    generator = torch.Generator().manual_seed(2)
    packed, quant_state, lora_A, lora_B, _ = _random_layer(40, 70, 4, torch.float32, False, generator)
    x = torch.randn(5, 70, generator=generator).to(DEVICE)
    lora_A.requires_grad_(True)
    lora_B.requires_grad_(True)
    qlora_linear(x, packed, quant_state, lora_A, lora_B, 2.0).sum().backward()
    expected_A, expected_B = lora_A.detach().clone().requires_grad_(), lora_B.detach().clone().requires_grad_()
    qlora_linear_reference(x, packed, quant_state, expected_A, expected_B, 2.0).sum().backward()
    torch.testing.assert_close(lora_A.grad, expected_A.grad, **TOLERANCES[torch.float32])
    torch.testing.assert_close(lora_B.grad, expected_B.grad, **TOLERANCES[torch.float32])


def test_no_dequantized_weight_is_kept_for_backward():
    generator = torch.Generator().manual_seed(3)
    packed, quant_state, lora_A, lora_B, _ = _random_layer(48, 80, 4, torch.bfloat16, False, generator)
    x = torch.randn(6, 80, generator=generator).to(DEVICE, torch.bfloat16).requires_grad_(True)
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        qlora_linear(x, packed, quant_state, lora_A.requires_grad_(True), lora_B.requires_grad_(True), 2.0)
    assert saved_shapes and (48, 80) not in saved_shapes


# ----------------------------------------------------------------------------- PEFT on bitsandbytes


class _TinyBlock(torch.nn.Module):
    def __init__(self, in_features, out_features, dtype):
        super().__init__()
        self.proj = bnb.nn.Linear4bit(
            in_features, out_features, bias=True, compute_dtype=dtype, quant_type="nf4", compress_statistics=True
        )

    def forward(self, x):
        return self.proj(x)


def _peft_lora_layer(in_features, out_features, dtype, generator):
    peft = pytest.importorskip("peft")
    block = _TinyBlock(in_features, out_features, dtype)
    with torch.no_grad():
        block.proj.weight.data.copy_(torch.randn(out_features, in_features, generator=generator) / in_features**0.5)
        block.proj.bias.copy_(torch.randn(out_features, generator=generator))
    block = block.to(DEVICE)  # quantizes the weight
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"])
    layer = peft.get_peft_model(block, config).base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(8, in_features, generator=generator) / in_features**0.5)
        layer.lora_B["default"].weight.copy_(torch.randn(out_features, 8, generator=generator) / 8**0.5)
    layer.lora_A["default"].to(dtype)
    layer.lora_B["default"].to(dtype)
    layer.base_layer.bias.data = layer.base_layer.bias.data.to(dtype)
    return layer.train()


# Rows a whole number of 64-element blocks wide, as in real checkpoints: on other widths
# bitsandbytes' own CPU dequantization is wrong (vlm.quant.bnb_layers.misread_on_cpu), and
# test_bitsandbytes_cpu.py shows that no model we load on the CPU has such a layer.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("in_features, out_features", [(128, 192), (192, 64)], ids=["wider_output", "narrower_output"])
def test_qlora_linear_and_its_reference_equal_peft_lora_on_bitsandbytes_linear4bit(dtype, in_features, out_features):
    generator = torch.Generator().manual_seed(4)
    layer = _peft_lora_layer(in_features, out_features, dtype, generator)
    weight, lora_A, lora_B = layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x = torch.randn(2, 5, in_features, generator=generator).to(DEVICE, dtype).requires_grad_(True)
    grad_out = torch.randn(2, 5, out_features, generator=generator).to(DEVICE, dtype)

    expected = layer(x)
    expected.backward(grad_out)
    expected_grads = [t.grad.clone() for t in (x, lora_A, lora_B)]

    for op in (qlora_linear, qlora_linear_reference):
        inputs = [t.detach().clone().requires_grad_(True) for t in (x, lora_A, lora_B)]
        scaling = layer.scaling["default"]
        out = op(inputs[0], weight, weight.quant_state, inputs[1], inputs[2], scaling, bias=layer.base_layer.bias)
        out.backward(grad_out)
        assert_close_at_scale(out, expected, TOLERANCES[dtype])
        for actual, wanted in zip([t.grad for t in inputs], expected_grads):
            assert_close_at_scale(actual, wanted, TOLERANCES[dtype])


# ----------------------------------------------------------------------------- real size


@pytest.mark.gpu
def test_qlora_linear_at_mlp_size_on_cuda():
    generator = torch.Generator().manual_seed(5)
    packed, quant_state = quantized_nf4_weight(14336, 4096, torch.bfloat16, True, generator, device="cuda")
    assert_same_bits(dequantize_nf4(packed, quant_state), bnb_functional.dequantize_4bit(packed, quant_state))
    _check_against_float64_reference((4096, 4096), 14336, 16, torch.bfloat16, True, device="cuda", seed=5)


@pytest.mark.gpu
@pytest.mark.parametrize("on_default_stream", [True, False], ids=["default_stream", "user_stream"])
def test_side_stream_overlap_changes_no_bit_of_outputs_or_grads(on_default_stream):
    generator = torch.Generator().manual_seed(6)
    packed, quant_state, lora_A, lora_B, bias = _random_layer(1536, 1024, 16, torch.bfloat16, True, generator, "cuda")
    x = torch.randn(2048, 1024, generator=generator).to("cuda", torch.bfloat16)
    grad_out = torch.randn(2048, 1536, generator=generator).to("cuda", torch.bfloat16)
    common = dict(weight4bit=packed, quant_state=quant_state, scaling=2.0, bias=bias)

    results = {}
    for overlap in (False, True):
        tuning = QLoRATuning(overlap_on_side_stream=overlap, host_bound_max_rows=0)  # 2048 rows: use it anyway
        stream = torch.cuda.current_stream() if on_default_stream else torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            results[overlap] = _forward_and_grads(qlora_linear, x, lora_A, lora_B, grad_out, tuning=tuning, **common)
        torch.cuda.synchronize()
    for serial, overlapped in zip(results[False], results[True]):  # out, grad x, grad A, grad B
        assert_same_bits(overlapped, serial)
