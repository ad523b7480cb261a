"""GeGLU (``gelu(gate) * up``, tanh and exact erf GELU): the Triton op against its float64 reference, and
the reference against Hugging Face's GELU MLPs (GemmaMLP for tanh)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_forward_swap_matches, assert_gated_matches_float64, gated_inputs

from vlm.kernels._gated import GATED_BLOCK
from vlm.kernels.geglu import geglu, geglu_reference

# The op computes in fp32 and rounds once to the input dtype: one machine epsilon of relative slack per
# dtype (round-to-nearest on a GPU needs half of it; Triton's interpreter truncates fp32 -> bf16 and needs
# all of it), and an absolute floor for results near zero, where fp32 cancellation (gelu'(g) vanishes
# at g = -0.75) dominates.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-3, rtol=2.0**-7),
    torch.float16: dict(atol=1e-4, rtol=2.0**-10),
}
DTYPES = list(TOLERANCES)
APPROXIMATIONS = ["tanh", "none"]
# One row; a width that is no power of two; more elements than one block (with a ragged tail).
SHAPES = [(1, 1, 7), (3, 5, 100), (2, 1000)]
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Hugging Face's ACT2FN names of the two GELUs.
HF_ACTIVATIONS = {"tanh": "gelu_pytorch_tanh", "none": "gelu"}

# The interpreter's numpy sigmoid overflows exp(-x) to inf for very negative x, which still yields 0.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def assert_matches_float64_reference(shape, dtype, approximate, device):
    assert_gated_matches_float64(
        lambda gate, up: geglu(gate, up, approximate), lambda gate, up: geglu_reference(gate, up, approximate),
        shape, dtype, device, TOLERANCES[dtype],
    )


def test_shapes_include_one_wider_than_a_block():
    assert any(torch.Size(shape).numel() > GATED_BLOCK for shape in SHAPES)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_and_backward_match_float64_reference(shape, dtype, approximate):
    assert_matches_float64_reference(shape, dtype, approximate, DEVICE)


def test_tanh_is_the_default_approximation():
    gate, up = gated_inputs((2, 1000), torch.float32, DEVICE)
    assert torch.equal(geglu(gate, up), geglu(gate, up, approximate="tanh"))
    assert torch.equal(geglu_reference(gate, up), geglu_reference(gate, up, approximate="tanh"))


def test_the_two_approximations_differ():
    gate, up = gated_inputs((2, 1000), torch.float32, DEVICE)
    assert not torch.allclose(geglu(gate, up, "tanh"), geglu(gate, up, "none"), atol=1e-6, rtol=0)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_gelu_times_up_in_the_tensor_dtype(dtype, approximate):
    from transformers.activations import ACT2FN

    gate, up = gated_inputs((3, 5, 100), dtype, DEVICE)
    expected = F.gelu(gate, approximate=approximate) * up
    assert torch.equal(geglu_reference(gate, up, approximate), expected)
    assert torch.equal(ACT2FN[HF_ACTIVATIONS[approximate]](gate) * up, expected)


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_only_inputs_that_require_grad_get_one(approximate):
    gate, up = gated_inputs((2, 1000), torch.float32, DEVICE)
    up.requires_grad_()
    geglu(gate, up, approximate).sum().backward()
    up64 = up.detach().double().requires_grad_()
    geglu_reference(gate.double(), up64, approximate).sum().backward()
    assert gate.grad is None
    torch.testing.assert_close(up.grad.double(), up64.grad, **TOLERANCES[torch.float32])


def test_an_unknown_approximation_is_rejected():
    gate, up = gated_inputs((2, 8), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="approximate"):
        geglu(gate, up, approximate="sigmoid")


def tiny_gelu_mlp(approximate):
    """GemmaMLP for the tanh GELU; Gemma maps every GELU to tanh, so the exact one uses LlamaMLP's layout."""
    from transformers import GemmaConfig, LlamaConfig
    from transformers.models.gemma.modeling_gemma import GemmaMLP
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    if approximate == "tanh":
        mlp = GemmaMLP(GemmaConfig(hidden_size=32, intermediate_size=88, hidden_act="gelu_pytorch_tanh"))
    else:
        mlp = LlamaMLP(LlamaConfig(hidden_size=32, intermediate_size=88, hidden_act="gelu"))
    assert mlp.act_fn.__class__.__name__ == {"tanh": "GELUTanh", "none": "GELUActivation"}[approximate]
    return mlp.to(DEVICE)


def geglu_mlp_forward(mlp, x, approximate):
    return mlp.down_proj(geglu(mlp.gate_proj(x), mlp.up_proj(x), approximate))


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_mlp_with_geglu_matches_the_stock_module(approximate):
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    forward = lambda mlp, x: geglu_mlp_forward(mlp, x, approximate)  # noqa: E731
    assert_forward_swap_matches(tiny_gelu_mlp(approximate), forward, x, TOLERANCES[torch.float32])


@pytest.mark.parametrize("approximate", APPROXIMATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_matches_the_mlp_activation(dtype, approximate):
    mlp = tiny_gelu_mlp(approximate).to(dtype)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(4)).to(device=DEVICE, dtype=dtype)
    gate, up = mlp.gate_proj(x), mlp.up_proj(x)
    assert torch.equal(mlp.down_proj(geglu_reference(gate, up, approximate)), mlp(x))


def test_gemma3_mlp_is_the_tanh_geglu_the_kernel_computes():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

    torch.manual_seed(0)
    mlp = Gemma3MLP(Gemma3TextConfig(hidden_size=32, intermediate_size=88)).to(DEVICE)  # its default activation
    assert mlp.act_fn.__class__.__name__ == "GELUTanh"
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    assert torch.equal(mlp.down_proj(geglu_reference(mlp.gate_proj(x), mlp.up_proj(x), "tanh")), mlp(x))
    forward = lambda mlp, x: geglu_mlp_forward(mlp, x, "tanh")  # noqa: E731
    assert_forward_swap_matches(mlp, forward, x, TOLERANCES[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("approximate", APPROXIMATIONS)
def test_real_size_matches_float64_reference_on_cuda(approximate):
    # 8192 tokens x Llama-3.2-11B's intermediate size.
    assert_matches_float64_reference((8192, 14336), torch.bfloat16, approximate, "cuda")
