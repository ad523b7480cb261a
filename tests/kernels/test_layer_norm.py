"""The LayerNorm kernel computes ``torch.nn.functional.layer_norm`` over the last dimension (vision towers),
forward and backward for input, weight and bias, for any leading shape and fp32/bf16/fp16 inputs."""


import pytest
import torch
from kernel_checks import NORM_CASES, NORM_TOLERANCES, assert_norm_matches_float64, norm_inputs

from vlm.kernels._row_tiling import DEFAULT_ROW_TILING
from vlm.kernels.layer_norm import layer_norm, layer_norm_reference

TOLERANCES = NORM_TOLERANCES
DTYPES = list(TOLERANCES)
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


EPS = 1e-5


def _inputs(shape, width, dtype, param_dtype, device=DEVICE):
    """x with a non-zero mean to subtract, weight and bias."""
    return norm_inputs(shape, width, dtype, param_dtype, device, x_mean=1.0, x_scale=2.0, with_bias=True)


def _assert_matches_float64_reference(
    shape, width, dtype, param_dtype=None, device=DEVICE, params_require_grad=True, tiling=DEFAULT_ROW_TILING
):
    x, (weight, bias), generator = _inputs(shape, width, dtype, param_dtype or dtype, device)
    params = [weight.requires_grad_(params_require_grad), bias.requires_grad_(params_require_grad)]
    assert_norm_matches_float64(
        lambda x, w, b: layer_norm(x, w, b, EPS, tiling=tiling), lambda x, w, b: layer_norm_reference(x, w, b, EPS),
        x, params, generator, TOLERANCES[dtype], out_dtype=dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, width, tiling", NORM_CASES)
def test_forward_and_grads_match_float64_reference(shape, width, tiling, dtype):
    _assert_matches_float64_reference(shape, width, dtype, tiling=tiling)


def test_non_contiguous_input_matches_reference():
    generator = torch.Generator().manual_seed(1)
    x = (1.0 + torch.randn(100, 5, generator=generator)).to(DEVICE).t()  # 5 rows of width 100
    weight = (1.0 + 0.5 * torch.randn(100, generator=generator)).to(DEVICE).requires_grad_(True)
    bias = (0.5 * torch.randn(100, generator=generator)).to(DEVICE).requires_grad_(True)
    assert_norm_matches_float64(
        lambda x, w, b: layer_norm(x, w, b, EPS), lambda x, w, b: layer_norm_reference(x, w, b, EPS),
        x, [weight, bias], generator, TOLERANCES[torch.float32], out_dtype=torch.float32,
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_params_with_half_input_keep_the_input_dtype(dtype):
    # QLoRA keeps norm parameters in fp32 while activations are bf16: F.layer_norm returns x's dtype.
    _assert_matches_float64_reference((7,), 100, dtype, param_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_params_still_give_input_grad(dtype):
    _assert_matches_float64_reference((7,), 100, dtype, params_require_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_torch_layer_norm_module(dtype):
    x, (weight, bias), _ = _inputs((2, 5), 64, dtype, dtype, DEVICE)
    module = torch.nn.LayerNorm(64, eps=EPS).to(device=DEVICE, dtype=dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
        module.bias.copy_(bias)
        torch.testing.assert_close(layer_norm_reference(x, weight, bias, EPS), module(x), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_size_mllama_vit_on_cuda(dtype):
    # Mllama ViT: 4 tiles of 1601 patches (with class token), width 1280.
    _assert_matches_float64_reference((4 * 1601,), 1280, dtype, device="cuda")
