"""SwiGLU (``silu(gate) * up``): the Triton op against its float64 reference, and the reference against
Hugging Face's LlamaMLP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_forward_swap_matches, assert_gated_matches_float64, gated_inputs

from vlm.kernels._gated import GATED_BLOCK
from vlm.kernels.swiglu import swiglu, swiglu_reference

# The op computes in fp32 and rounds once to the input dtype: one machine epsilon of relative slack per
# dtype (round-to-nearest on a GPU needs half of it; Triton's interpreter truncates fp32 -> bf16 and needs
# all of it), and an absolute floor for results near zero, where fp32 cancellation (silu'(g) vanishes
# at g = -1.28) dominates.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-3, rtol=2.0**-7),
    torch.float16: dict(atol=1e-4, rtol=2.0**-10),
}
DTYPES = list(TOLERANCES)
# One row; a width that is no power of two; more elements than one block (with a ragged tail).
SHAPES = [(1, 1, 7), (3, 5, 100), (2, 1000)]
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The interpreter's numpy sigmoid overflows exp(-g) to inf for very negative g, which still yields 0.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def assert_matches_float64_reference(shape, dtype, device):
    assert_gated_matches_float64(swiglu, swiglu_reference, shape, dtype, device, TOLERANCES[dtype])


def test_shapes_include_one_wider_than_a_block():
    assert any(torch.Size(shape).numel() > GATED_BLOCK for shape in SHAPES)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward_match_float64_reference(shape, dtype):
    assert_matches_float64_reference(shape, dtype, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_silu_times_up_in_the_tensor_dtype(dtype):
    gate, up = gated_inputs((3, 5, 100), dtype, DEVICE)
    assert torch.equal(swiglu_reference(gate, up), F.silu(gate) * up)


def test_only_inputs_that_require_grad_get_one():
    gate, up = gated_inputs((2, 1000), torch.float32, DEVICE)
    gate.requires_grad_()
    swiglu(gate, up).sum().backward()
    gate64 = gate.detach().double().requires_grad_()
    swiglu_reference(gate64, up.double()).sum().backward()
    assert up.grad is None
    torch.testing.assert_close(gate.grad.double(), gate64.grad, **TOLERANCES[torch.float32])


def tiny_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="silu")).to(DEVICE)


def swiglu_mlp_forward(mlp, x):
    return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def test_llama_mlp_with_swiglu_matches_the_stock_module():
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    assert_forward_swap_matches(tiny_llama_mlp(), swiglu_mlp_forward, x, TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_the_llama_mlp_activation(dtype):
    mlp = tiny_llama_mlp().to(dtype)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)).to(device=DEVICE, dtype=dtype)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.equal(swiglu_reference(gate, up), mlp.act_fn(gate) * up)
    assert torch.equal(mlp.down_proj(swiglu_reference(gate, up)), mlp(x))


@pytest.mark.gpu
def test_real_size_matches_float64_reference_on_cuda():
    # 8192 tokens x Llama-3.2-11B's intermediate size.
    assert_matches_float64_reference((8192, 14336), torch.bfloat16, "cuda")
