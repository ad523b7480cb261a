"""``FusedAdamW8bit``: AdamW with 8-bit states in one launch per group. It follows AdamW within the 8-bit
states' rounding, leaves a parameter without a grad alone, and resumes from its state dict exactly."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("bitsandbytes")

from vlm.training.fused_adamw import FusedAdamW8bit  # noqa: E402
from vlm.training.optim import AdamWSettings, adamw  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(16, 64), (64, 16), (300,)]  # the last is not whole state blocks
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(DEVICE) * 0.1) for s in shapes]


def _grads(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator).to(DEVICE) for p in params]


def _run(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], steps: range) -> None:
    for step in steps:
        for param, grad in zip(params, _grads(step, params)):
            param.grad = grad
        optimizer.step()


def test_it_follows_adamw_within_the_rounding_of_8_bit_states():
    fused, plain = _params(), _params()
    start = [p.detach().clone() for p in plain]
    _run(FusedAdamW8bit(fused, lr=1e-2, weight_decay=0.01), fused, range(30))
    _run(torch.optim.AdamW(plain, lr=1e-2, weight_decay=0.01), plain, range(30))
    for f, p, s in zip(fused, plain, start):
        moved = (p.detach() - s).abs().max()
        assert moved > 0.1  # 30 steps of up to lr each
        assert (f.detach() - p.detach()).abs().max() < 0.05 * moved


def test_a_parameter_without_a_grad_is_left_alone():
    params = _params()
    optimizer = FusedAdamW8bit(params, lr=1e-2)
    _run(optimizer, params, range(2))
    kept = params[1].detach().clone()
    state = {k: v.clone() for k, v in optimizer.state[params[0]].items() if torch.is_tensor(v)}
    for param, grad in zip(params, _grads(5, params)):
        param.grad = grad
    params[1].grad = None
    optimizer.step()
    assert torch.equal(params[1].detach(), kept)
    assert not torch.equal(params[0].detach(), _params()[0].detach())
    # Its states stand where they stood: the second parameter's blocks follow the first's 1024 values.
    first_blocks = params[0].numel() // 256
    second = slice(first_blocks, first_blocks + params[1].numel() // 256)
    now = optimizer.state[params[0]]
    assert torch.equal(now["m_absmax"][second], state["m_absmax"][second])
    assert torch.equal(now["v_codes"][256 * second.start:256 * second.stop],
                       state["v_codes"][256 * second.start:256 * second.stop])


def test_it_resumes_from_its_state_dict_exactly():
    straight = _params()
    optimizer = FusedAdamW8bit(straight, lr=1e-2, weight_decay=0.01)
    _run(optimizer, straight, range(6))

    resumed = _params()
    first = FusedAdamW8bit(resumed, lr=1e-2, weight_decay=0.01)
    _run(first, resumed, range(3))
    saved = first.state_dict()
    again = FusedAdamW8bit(resumed, lr=1e-2, weight_decay=0.01)
    again.load_state_dict(saved)
    _run(again, resumed, range(3, 6))
    for a, b in zip(straight, resumed):
        assert torch.equal(a.detach(), b.detach())
    assert again.state[resumed[0]]["m_absmax"].dtype == torch.float32


def test_only_fp32_parameters_are_taken():
    with pytest.raises(ValueError, match="fp32 parameters"):
        FusedAdamW8bit([torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))], lr=1e-3)


def test_the_setting_is_true_false_or_auto_and_without_cuda_adamw_stays_torchs():
    with pytest.raises(ValueError, match=r"optimizer\.fused_8bit='yes' must be true, false or 'auto'"):
        AdamWSettings(lr=1e-3, fused_8bit="yes")
    assert AdamWSettings(lr=1e-3).fused_8bit == "auto"
    assert AdamWSettings(lr=1e-3, fused_8bit="False").fused_8bit is False
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    for fused in (True, "auto"):
        assert type(adamw(params, lr=1e-3, fused_8bit=fused)) is torch.optim.AdamW


def test_auto_fuses_the_8bit_states_exactly_where_they_are_used_and_fsdp_does_not_shard_them():
    auto = AdamWSettings(lr=1e-3)
    on_cuda = auto.resolved("cuda")
    assert (on_cuda.paged_8bit, on_cuda.fused_8bit) == (True, True)
    assert auto.resolved("cuda:1").fused_8bit is True
    assert (auto.resolved("cpu").paged_8bit, auto.resolved("cpu").fused_8bit) == (False, False)
    assert auto.resolved("cuda", sharded=True).fused_8bit is False  # FusedAdamW8bit is not tried under FSDP
    assert auto.resolved("cuda", fp32=False).fused_8bit is False  # it updates fp32 parameters only
    assert AdamWSettings(lr=1e-3, paged_8bit=False).resolved("cuda").fused_8bit is False  # no 8-bit states


def test_an_explicit_fused_8bit_is_what_is_asked_on_every_device():
    for device in ("cuda", "cpu"):
        assert AdamWSettings(lr=1e-3, fused_8bit=True).resolved(device, sharded=True).fused_8bit is True
        assert AdamWSettings(lr=1e-3, fused_8bit=False).resolved(device).fused_8bit is False


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_fused_8bit_picks_the_fused_optimizer_and_auto_does_too():
    import bitsandbytes as bnb

    params = [torch.nn.Parameter(torch.randn(64, 64, device="cuda"))]
    assert type(adamw(params, lr=1e-3, fused_8bit=True)) is FusedAdamW8bit
    assert type(adamw(params, lr=1e-3)) is FusedAdamW8bit
    assert type(adamw(params, lr=1e-3, fused_8bit=False)) is bnb.optim.PagedAdamW8bit
    bf16 = [torch.nn.Parameter(torch.randn(64, 64, device="cuda", dtype=torch.bfloat16))]
    assert type(adamw(bf16, lr=1e-3)) is bnb.optim.PagedAdamW8bit
