"""The RMSNorm kernel computes Hugging Face ``LlamaRMSNorm`` (fp32 normalize, cast to x's dtype, then weight)
and, as its Gemma variant, ``Gemma3RMSNorm`` (normalize and scale by ``1 + weight`` in fp32, then cast), forward
and backward, for any leading shape and fp32/bf16/fp16 inputs."""


import pytest
import torch
from kernel_checks import NORM_CASES, NORM_TOLERANCES, assert_norm_matches_float64, norm_inputs

from vlm.kernels._row_tiling import DEFAULT_ROW_TILING
from vlm.kernels.rms_norm import GEMMA, rms_norm, rms_norm_reference

TOLERANCES = NORM_TOLERANCES
DTYPES = list(TOLERANCES)
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


EPS = 1e-6


def _assert_matches_float64_reference(
    shape, width, dtype, weight_dtype=None, device=DEVICE, weight_requires_grad=True, tiling=DEFAULT_ROW_TILING
):
    weight_dtype = weight_dtype or dtype
    x, (weight,), generator = norm_inputs(shape, width, dtype, weight_dtype, device)
    assert_norm_matches_float64(
        lambda x, w: rms_norm(x, w, EPS, tiling=tiling), lambda x, w: rms_norm_reference(x, w, EPS),
        x, [weight.requires_grad_(weight_requires_grad)], generator, TOLERANCES[dtype],
        out_dtype=torch.promote_types(weight_dtype, dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, width, tiling", NORM_CASES)
def test_forward_and_grads_match_float64_reference(shape, width, tiling, dtype):
    _assert_matches_float64_reference(shape, width, dtype, tiling=tiling)


def test_non_contiguous_input_matches_reference():
    generator = torch.Generator().manual_seed(1)
    # 5 rows of width 100, row stride 1
    x = torch.randn(100, 5, generator=generator).to(DEVICE).t()
    weight = (1.0 + 0.5 * torch.randn(100, generator=generator)).to(DEVICE).requires_grad_(True)
    assert_norm_matches_float64(
        lambda x, w: rms_norm(x, w, EPS), lambda x, w: rms_norm_reference(x, w, EPS),
        x, [weight], generator, TOLERANCES[torch.float32], out_dtype=torch.float32,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_weight_with_half_input_promotes_output_to_fp32(dtype):
    # QLoRA keeps norm weights in fp32 while activations are bf16: HF then returns fp32.
    _assert_matches_float64_reference((7,), 100, dtype, weight_dtype=torch.float32)


def test_bf16_output_is_within_one_ulp_of_the_reference_run_in_bf16():
    x, (weight,), _ = norm_inputs((33,), 1000, torch.bfloat16, torch.bfloat16, DEVICE)
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

    x, (weight,), _ = norm_inputs((2, 5), 64, dtype, dtype, DEVICE)
    module = LlamaRMSNorm(64, eps=EPS).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        torch.testing.assert_close(rms_norm_reference(x, weight, EPS), module(x), rtol=0, atol=0)


# ---- the Gemma variant: scale 1 + weight, all in fp32, one rounding to x's dtype --------------------------------
def _gemma_inputs(shape, width, dtype, weight_dtype, device=DEVICE, seed=0):
    """x and a Gemma weight (stored around 0, so that the scale 1 + w is around 1 as in the Llama cases)."""
    x, (weight,), generator = norm_inputs(shape, width, dtype, weight_dtype, device, seed=seed)
    return x, (weight.float() - 1.0).to(weight_dtype), generator


def _assert_gemma_matches_float64_reference(shape, width, dtype, weight_dtype=None, tiling=DEFAULT_ROW_TILING):
    weight_dtype = weight_dtype or dtype
    x, weight, generator = _gemma_inputs(shape, width, dtype, weight_dtype)
    assert_norm_matches_float64(
        lambda x, w: rms_norm(x, w, EPS, variant=GEMMA, tiling=tiling),
        lambda x, w: rms_norm_reference(x, w, EPS, variant=GEMMA),
        x, [weight.requires_grad_(True)], generator, TOLERANCES[dtype], out_dtype=dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, width, tiling", NORM_CASES)
def test_gemma_variant_forward_and_grads_match_float64_reference(shape, width, tiling, dtype):
    _assert_gemma_matches_float64_reference(shape, width, dtype, tiling=tiling)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gemma_variant_answers_in_the_input_dtype_with_an_fp32_weight(dtype):
    # Unlike Llama's, Gemma's norm casts its fp32 result back to x's dtype whatever the weight's dtype.
    _assert_gemma_matches_float64_reference((7,), 100, dtype, weight_dtype=torch.float32)


def test_gemma_variant_bf16_output_is_within_one_ulp_of_the_reference_run_in_bf16():
    x, weight, _ = _gemma_inputs((33,), 1000, torch.bfloat16, torch.bfloat16)
    out = rms_norm(x, weight, EPS, variant=GEMMA)
    expected = rms_norm_reference(x, weight, EPS, variant=GEMMA)
    ulp = torch.finfo(torch.bfloat16).eps * expected.float().abs().clamp_min(1.0)
    assert ((out.float() - expected.float()).abs() <= ulp).all()


def test_the_two_variants_differ_by_the_unit_offset():
    x, weight, _ = _gemma_inputs((7,), 100, torch.float32, torch.float32)
    torch.testing.assert_close(rms_norm(x, weight, EPS, variant=GEMMA), rms_norm(x, 1.0 + weight, EPS))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gemma_reference_matches_hugging_face_gemma3_rms_norm(dtype):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    x, weight, _ = _gemma_inputs((2, 5), 64, dtype, dtype, seed=1)
    module = Gemma3RMSNorm(64, eps=EPS).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        torch.testing.assert_close(rms_norm_reference(x, weight, EPS, variant=GEMMA), module(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_size_llama_hidden_on_cuda(dtype):
    # Llama-3.2-11B-Vision text hidden size, 8192 tokens.
    _assert_matches_float64_reference((8192,), 4096, dtype, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_size_gemma3_hidden_on_cuda(dtype):
    # gemma-3-4b's hidden size, 8192 tokens.
    x, weight, generator = _gemma_inputs((8192,), 2560, dtype, dtype, device="cuda")
    assert_norm_matches_float64(
        lambda x, w: rms_norm(x, w, EPS, variant=GEMMA), lambda x, w: rms_norm_reference(x, w, EPS, variant=GEMMA),
        x, [weight.requires_grad_(True)], generator, TOLERANCES[dtype], out_dtype=dtype,
    )
