"""Work run on a second CUDA stream beside the current one. Dequantization and the LoRA products are memory-bound
and leave the GPU room: on a side stream they run beside the QLoRA layer's products (and, in backward, grad A
beside the big GEMM) instead of after them."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)  # one side stream per device, made once: a new stream per call would cost a creation each time
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


class SideStream:
    """Work queued on a side stream, after what the current stream has queued so far; without CUDA (or not
    ``enabled``) it simply runs in order, on the current stream."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.enabled = enabled and device.type == "cuda"
        if self.enabled:
            self.main, self.side = torch.cuda.current_stream(device), _side_stream(device)
            self.side.wait_stream(self.main)

    def start(self, work, *uses: torch.Tensor):  # noqa: ANN001, ANN205
        """``work()`` on the side stream (after the current stream's queue so far, once more); ``uses`` are the
        current stream's tensors it reads. Returns a handle for ``result``."""
        if not self.enabled:
            return work(), None
        self.side.wait_stream(self.main)
        for tensor in uses:
            tensor.record_stream(self.side)  # not reused before the side stream has read it
        with torch.cuda.stream(self.side):
            value = work()
        done = torch.cuda.Event()
        done.record(self.side)
        return value, done

    def result(self, handle) -> torch.Tensor:  # noqa: ANN001
        """The work's result, with the current stream waiting for it (and only for it)."""
        value, done = handle
        if done is not None:
            self.main.wait_event(done)
            value.record_stream(self.main)
        return value
