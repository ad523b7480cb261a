"""Running a 16-bit model as if some of its linear layers were quantized, one layer at a time.

Each chosen layer's weight is swapped for its quantization round trip just before the layer runs
and swapped back right after, so at most one extra layer-sized tensor exists at any moment:
an 11B model can be evaluated under any plan without a second copy of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

from .formats import round_trip


@contextmanager
def simulated_quantization(
    model: nn.Module, names: Iterable[str], method: str, double_quant: bool = True
) -> Iterator[None]:
    """Within the block, the linear layers ``names`` of ``model`` compute with quantized weights."""
    handles, pending = [], []
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise TypeError(f"{name} is a {type(module).__name__}, not an nn.Linear")
        originals: list = []

        def swap_in(module: nn.Linear, args, originals=originals) -> None:  # noqa: ANN001
            originals.append(module.weight.data)
            module.weight.data = round_trip(module.weight.data, method, double_quant)

        def swap_back(module: nn.Linear, args, output, originals=originals) -> None:  # noqa: ANN001
            module.weight.data = originals.pop()

        pending.append((module, originals))
        handles.append(module.register_forward_pre_hook(swap_in))
        handles.append(module.register_forward_hook(swap_back))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module, originals in pending:  # a forward that raised mid-layer leaves a swap behind
            if originals:
                module.weight.data = originals[0]
