"""What the launchers need to know of the GPU: its number of SMs, to size persistent grids."""

from functools import lru_cache

import torch


@lru_cache(maxsize=None)  # one query per device: the properties never change while the process runs
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def multiprocessors(tensor: torch.Tensor) -> int:
    """SMs of the CUDA device that holds ``tensor``."""
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    return _multiprocessors(index)
