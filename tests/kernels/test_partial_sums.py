"""The one-launch reduction of per-program fp32 partial sums (norm weight grads, thin products) into
results of their own dtypes."""

import pytest
import torch

from vlm.kernels._partial_sums import sum_partials

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_two_groups_of_partials_are_summed_over_rows_into_their_own_dtypes():
    # More partial rows and columns than one program covers, so the loop and the column grid both run;
    # the two groups differ in shape, and the first is scaled.
    generator = torch.Generator().manual_seed(0)
    first, second = torch.randn(70, 100, generator=generator).to(DEVICE), torch.randn(3, 130, generator=generator).to(DEVICE)
    weight_grad, bias_grad = sum_partials([first, second], [torch.bfloat16, torch.float32], scales=[0.3, 1.0])

    assert (weight_grad.dtype, bias_grad.dtype) == (torch.bfloat16, torch.float32)
    # bf16: rounded once to nearest from an fp32 sum; fp32: only the sum order differs.
    torch.testing.assert_close(weight_grad.double(), 0.3 * first.double().sum(0), atol=1e-5, rtol=2**-8)
    torch.testing.assert_close(bias_grad.double(), second.double().sum(0), atol=1e-5, rtol=1e-6)


def test_a_single_group_and_a_single_partial_row():
    partials = torch.randn(1, 33, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (grad,) = sum_partials([partials], [torch.float16])
    torch.testing.assert_close(grad, partials[0].half(), atol=0, rtol=0)


def test_groups_dtypes_and_scales_must_agree():
    partials = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="groups"):
        sum_partials([partials] * 3, [torch.float32] * 3)
    with pytest.raises(ValueError, match="groups"):
        sum_partials([partials], [torch.float32], scales=[1.0, 2.0])
    with pytest.raises(ValueError, match="fp32"):
        sum_partials([partials.half()], [torch.float32])
