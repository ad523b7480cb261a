"""``SideStream``: work queued beside the current CUDA stream, its result waited for by that stream alone; off
the GPU, or disabled, the same work run in order."""

import pytest
import torch

from vlm.kernels.qlora.side_stream import SideStream


@pytest.mark.parametrize("device, enabled", [("cpu", True), ("cpu", False)])
def test_without_cuda_the_work_runs_at_once_in_order(device, enabled):
    order = []
    beside = SideStream(torch.device(device), enabled)
    assert not beside.enabled
    handle = beside.start(lambda: order.append("side") or torch.ones(3))
    order.append("main")
    assert order == ["side", "main"]
    assert torch.equal(beside.result(handle), torch.ones(3))


@pytest.mark.gpu
@pytest.mark.parametrize("enabled", [True, False], ids=["side_stream", "in_order"])
def test_on_cuda_the_result_is_ready_for_the_current_stream(enabled):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 4096, generator=generator).to("cuda")
    expected = x @ x
    beside = SideStream(x.device, enabled)
    assert beside.enabled == enabled
    handle = beside.start(lambda: x @ x, x)
    torch.testing.assert_close(beside.result(handle), expected)
