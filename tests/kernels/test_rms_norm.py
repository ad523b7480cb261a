"""The RMSNorm kernel computes Hugging Face ``LlamaRMSNorm`` (fp32 normalize, cast to x's dtype, then weight),
forward and backward, for any leading shape and fp32/bf16/fp16 inputs."""


import pytest
import torch
from kernel_checks import summed_over_rows

from vlm.kernels.rms_norm import rms_norm, rms_norm_reference

# Against a float64 reference the output is rounded to nearest up to twice (the normalized row to x's dtype, then
# the product), half an epsilon each: rtol is a little over one epsilon of the dtype, atol a floor near zero.
# fp32 also leaves room for fp32 sums over a row and, for the weight grad, over all rows.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1.25e-3),
}
DTYPES = list(TOLERANCES)
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


EPS = 1e-6


def _inputs(shape, width, dtype, weight_dtype, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, width, generator=generator)
    weight = 1.0 + 0.5 * torch.randn(width, generator=generator)
    return x.to(device=device, dtype=dtype), weight.to(device=device, dtype=weight_dtype), generator


def _assert_matches_float64_reference(shape, width, dtype, weight_dtype=None, device=DEVICE, weight_requires_grad=True):
    weight_dtype = weight_dtype or dtype
    x, weight, generator = _inputs(shape, width, dtype, weight_dtype, device)
    x.requires_grad_(True)
    weight.requires_grad_(weight_requires_grad)
    x64 = x.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(weight_requires_grad)

    out = rms_norm(x, weight, EPS)
    expected = rms_norm_reference(x64, weight64, EPS)
    grad_out = torch.randn(out.shape, generator=generator).to(device=device, dtype=out.dtype)
    out.backward(grad_out)
    expected.backward(grad_out.double())

    tolerance = TOLERANCES[dtype]
    assert out.dtype == torch.promote_types(weight_dtype, dtype)
    torch.testing.assert_close(out.double(), expected, **tolerance)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), x64.grad, **tolerance)
    if weight_requires_grad:
        assert weight.grad.dtype == weight_dtype
        summed = summed_over_rows(tolerance, x.numel() // width)
        torch.testing.assert_close(weight.grad.double(), weight64.grad, **summed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("width", [64, 100, 1000])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_forward_and_grads_match_float64_reference(rows, width, dtype):
    _assert_matches_float64_reference((rows,), width, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_any_leading_shape_is_normalized_over_the_last_dimension(dtype):
    _assert_matches_float64_reference((2, 3), 100, dtype)


def test_non_contiguous_input_matches_reference():
    generator = torch.Generator().manual_seed(1)
    # 5 rows of width 100, row stride 1
    x = torch.randn(100, 5, generator=generator).to(DEVICE).t().requires_grad_(True)
    weight = (1.0 + 0.5 * torch.randn(100, generator=generator)).to(DEVICE).requires_grad_(True)
    x64, weight64 = x.detach().double().requires_grad_(True), weight.detach().double().requires_grad_(True)
    grad_out = torch.randn(5, 100, generator=generator).to(DEVICE)

    out = rms_norm(x, weight, EPS)
    expected = rms_norm_reference(x64, weight64, EPS)
    out.backward(grad_out)
    expected.backward(grad_out.double())

    for actual, wanted in [(out, expected), (x.grad, x64.grad), (weight.grad, weight64.grad)]:
        torch.testing.assert_close(actual.double(), wanted, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_with_half_input_promotes_output_to_fp32(dtype):
    # QLoRA keeps norm weights in fp32 while activations are bf16: HF then returns fp32.
    _assert_matches_float64_reference((7,), 100, dtype, weight_dtype=torch.float32)


def test_bf16_output_is_within_one_ulp_of_the_reference_run_in_bf16():
    x, weight, _ = _inputs((33,), 1000, torch.bfloat16, torch.bfloat16, DEVICE)
    out = rms_norm(x, weight, EPS)
    expected = rms_norm_reference(x, weight, EPS)
    # Same roundings in the same order; only fp32 sum order and rsqrt may flip a rounding.
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(1.0)
    assert ((out.float() - expected.float()).abs() <= ulp).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_weight_still_gives_input_grad(dtype):
    _assert_matches_float64_reference((7,), 100, dtype, weight_requires_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_hugging_face_llama_rms_norm(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, weight, _ = _inputs((2, 5), 64, dtype, dtype, DEVICE)
    module = LlamaRMSNorm(64, eps=EPS).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        torch.testing.assert_close(rms_norm_reference(x, weight, EPS), module(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_size_llama_hidden_on_cuda(dtype):
    # Llama-3.2-11B-Vision text hidden size, 8192 tokens.
    _assert_matches_float64_reference((8192,), 4096, dtype, device="cuda")
