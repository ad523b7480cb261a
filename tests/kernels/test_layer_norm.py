"""The LayerNorm kernel computes ``torch.nn.functional.layer_norm`` over the last dimension (vision towers),
forward and backward for input, weight and bias, for any leading shape and fp32/bf16/fp16 inputs."""


import pytest
import torch
from kernel_checks import summed_over_rows

from vlm.kernels.layer_norm import layer_norm, layer_norm_reference

# Against a float64 reference the output and each grad are rounded to nearest once, half an epsilon:
# rtol is a little over one epsilon of the dtype, atol a floor near zero; fp32 also leaves room for
# fp32 sums over a row and, for the weight and bias grads, over all rows.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float16: dict(atol=1e-3, rtol=1.25e-3),
}
DTYPES = list(TOLERANCES)
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


EPS = 1e-5


def _inputs(shape, width, dtype, param_dtype, device=DEVICE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 1.0 + 2.0 * torch.randn(*shape, width, generator=generator)  # a non-zero mean to subtract
    weight = 1.0 + 0.5 * torch.randn(width, generator=generator)
    bias = 0.5 * torch.randn(width, generator=generator)
    to = dict(device=device, dtype=param_dtype)
    return x.to(device=device, dtype=dtype), weight.to(**to), bias.to(**to), generator


def _assert_matches_float64_reference(shape, width, dtype, param_dtype=None, device=DEVICE, params_require_grad=True):
    param_dtype = param_dtype or dtype
    x, weight, bias, generator = _inputs(shape, width, dtype, param_dtype, device)
    leaves = [x.requires_grad_(True), weight.requires_grad_(params_require_grad), bias.requires_grad_(params_require_grad)]
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]

    out = layer_norm(x, weight, bias, EPS)
    expected = layer_norm_reference(*leaves64, EPS)
    grad_out = torch.randn(out.shape, generator=generator).to(device=device, dtype=out.dtype)
    out.backward(grad_out)
    expected.backward(grad_out.double())

    tolerance = TOLERANCES[dtype]
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **tolerance)
    assert x.grad.dtype == dtype
    torch.testing.assert_close(x.grad.double(), leaves64[0].grad, **tolerance)
    summed = summed_over_rows(tolerance, x.numel() // width)
    for param, param64 in zip(leaves[1:], leaves64[1:]):
        if params_require_grad:
            assert param.grad.dtype == param_dtype
            torch.testing.assert_close(param.grad.double(), param64.grad, **summed)


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
    x = (1.0 + torch.randn(100, 5, generator=generator)).to(DEVICE).t().requires_grad_(True)  # 5 rows of width 100
    weight = (1.0 + 0.5 * torch.randn(100, generator=generator)).to(DEVICE).requires_grad_(True)
    bias = (0.5 * torch.randn(100, generator=generator)).to(DEVICE).requires_grad_(True)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, weight, bias)]
    grad_out = torch.randn(5, 100, generator=generator).to(DEVICE)

    out = layer_norm(x, weight, bias, EPS)
    expected = layer_norm_reference(*leaves64, EPS)
    out.backward(grad_out)
    expected.backward(grad_out.double())

    pairs = [(out, expected)] + [(t.grad, t64.grad) for t, t64 in zip((x, weight, bias), leaves64)]
    for actual, wanted in pairs:
        torch.testing.assert_close(actual.double(), wanted, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_params_with_half_input_keep_the_input_dtype(dtype):
    # QLoRA keeps norm parameters in fp32 while activations are bf16: F.layer_norm returns x's dtype.
    _assert_matches_float64_reference((7,), 100, dtype, param_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_frozen_params_still_give_input_grad(dtype):
    _assert_matches_float64_reference((7,), 100, dtype, params_require_grad=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_matches_torch_layer_norm_module(dtype):
    x, weight, bias, _ = _inputs((2, 5), 64, dtype, dtype, DEVICE)
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
