"""The one-launch AdamW step with 8-bit blockwise states against its PyTorch reference: the same parameters
and the same states (codes and block maxima), blocks flagged inactive untouched."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from vlm.kernels.adamw_8bit import (  # noqa: E402
    STATE_BLOCK,
    adamw_8bit_step,
    adamw_8bit_step_reference,
    state_blocks,
)
from vlm.training.fused_adamw import state_maps  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HYPER = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _state(numel: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Parameters and states as a run leaves them: random codes and positive block maxima."""
    blocks = state_blocks(numel)
    return [
        torch.randn(numel, generator=generator).to(DEVICE),
        torch.randint(0, 256, (numel,), generator=generator, dtype=torch.uint8).to(DEVICE),
        torch.randint(0, 256, (numel,), generator=generator, dtype=torch.uint8).to(DEVICE),
        (torch.rand(blocks, generator=generator) * 1e-2).to(DEVICE),
        (torch.rand(blocks, generator=generator) * 1e-4).to(DEVICE),
    ]


@pytest.mark.parametrize("numel", [STATE_BLOCK * 8, 3 * STATE_BLOCK + 17, 5], ids=["whole_blocks", "partial_block", "tiny"])
def test_the_step_is_the_reference_step(numel):
    generator = torch.Generator().manual_seed(numel)
    actual = _state(numel, generator)
    expected = [t.clone() for t in actual]
    active = (torch.rand(state_blocks(numel), generator=generator) > 0.3).to(torch.uint8).to(DEVICE)
    active[0] = 1
    maps = state_maps(DEVICE)
    for step in (1, 2, 9):
        grad = torch.randn(numel, generator=generator).to(DEVICE) * 1e-2
        adamw_8bit_step(actual[0], grad, *actual[1:], active, maps, step=step, **HYPER)
        adamw_8bit_step_reference(expected[0], grad, *expected[1:], active, maps, step=step, **HYPER)
    # On a GPU every bit; the CPU interpreter evaluates some fp32 expressions in double: one ulp.
    ulp = 0 if DEVICE == "cuda" else 2**-23
    torch.testing.assert_close(actual[0], expected[0], rtol=ulp, atol=0)
    for got, want in zip(actual[1:], expected[1:]):
        assert torch.equal(got, want)


def test_inactive_blocks_are_left_as_they_are():
    generator = torch.Generator().manual_seed(0)
    numel = 4 * STATE_BLOCK
    state = _state(numel, generator)
    before = [t.clone() for t in state]
    active = torch.tensor([1, 0, 1, 0], dtype=torch.uint8, device=DEVICE)
    grad = torch.randn(numel, generator=generator).to(DEVICE)
    adamw_8bit_step(state[0], grad, *state[1:], active, state_maps(DEVICE), step=3, **HYPER)
    idle = slice(STATE_BLOCK, 2 * STATE_BLOCK)
    for now, then in zip(state[:3], before[:3]):
        assert torch.equal(now[idle], then[idle]) and torch.equal(now[3 * STATE_BLOCK:], then[3 * STATE_BLOCK:])
        assert not torch.equal(now[:STATE_BLOCK], then[:STATE_BLOCK])
    for now, then in zip(state[3:], before[3:]):
        assert torch.equal(now[1::2], then[1::2]) and not torch.equal(now[0::2], then[0::2])


def test_a_state_of_the_wrong_size_is_refused():
    state = _state(300, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="one entry per block of 256: 2"):
        adamw_8bit_step(state[0], state[0].clone(), *state[1:3], state[3][:1], state[4], state[4].to(torch.uint8),
                        state_maps(DEVICE), step=1, **HYPER)
