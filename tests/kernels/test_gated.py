"""What both gated activations (SwiGLU, GeGLU) do through their shared launchers (``vlm.kernels._gated``):
strided halves of a fused projection are read, mismatched inputs refused, empty ones give empty outputs, and
gradients written over the inputs equal fresh ones (but not for inputs sharing memory)."""

import pytest
import torch
from kernel_checks import gated_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _gated_ops():
    from vlm.kernels.geglu import geglu, geglu_reference
    from vlm.kernels.swiglu import swiglu, swiglu_reference

    return {
        "swiglu": (swiglu, swiglu_reference),
        "geglu": (lambda g, u, **kw: geglu(g, u, "tanh", **kw), lambda g, u: geglu_reference(g, u, "tanh")),
    }


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_halves_of_a_fused_gate_up_projection_need_not_be_contiguous(name):
    op, reference = _gated_ops()[name]
    fused = torch.randn(4, 2 * 300, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    torch.testing.assert_close(op(gate, up), reference(gate, up), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_mismatched_gate_and_up_are_rejected(name):
    op, _ = _gated_ops()[name]
    gate, up = gated_inputs((2, 8), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="must match"):
        op(gate, up[:, :4])
    with pytest.raises(ValueError, match="must match"):
        op(gate, up.half())


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_empty_input_gives_empty_output(name):
    op, _ = _gated_ops()[name]
    gate, up = gated_inputs((0, 16), torch.float32, DEVICE)
    assert op(gate, up).shape == (0, 16)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_gated_grads_written_over_the_inputs_equal_fresh_ones(name):
    op, _ = _gated_ops()[name]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(3, 5, 100, generator=generator).to(DEVICE).requires_grad_()
    grad_out = torch.randn(3, 5, 100, generator=generator).to(DEVICE)
    grads = {}
    for in_place in (False, True):
        x.grad = None
        gate, up = x * 2.0, x - 1.0  # fresh intermediates, as an MLP's projections are
        seen = []
        gate.register_hook(lambda grad, seen=seen: seen.append(grad.data_ptr()))
        gate_ptr = gate.data_ptr()
        op(gate, up, grads_into_inputs=in_place).backward(grad_out)
        grads[in_place] = x.grad.clone()
        assert (seen[0] == gate_ptr) == in_place  # the gate's grad lives in the gate's own buffer
    torch.testing.assert_close(grads[True], grads[False], atol=0, rtol=0)


@pytest.mark.parametrize("name", ["swiglu", "geglu"])
def test_gated_grads_in_place_refuse_a_gate_that_is_also_up(name):
    op, _ = _gated_ops()[name]
    x = torch.randn(4, 8, device=DEVICE).requires_grad_()
    shared = x * 1.0
    with pytest.raises(ValueError, match="share memory"):
        op(shared, shared, grads_into_inputs=True).sum().backward()
