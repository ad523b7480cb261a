"""The bitsandbytes layers of a loaded model: which they are, and keeping them trainable on the CPU.

Everything this project needs to know about bitsandbytes' layer internals lives here, so that a
change in a bitsandbytes release is mended in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn

from .formats import BLOCKSIZE

# (logger, message prefix) of what bitsandbytes logs when it is imported on a CPU with AVX512-BF16
# and the optional `kernels` package is missing: the kernel it wants serves only the inference
# layout that `keep_cpu_weights_trainable` switches off, so the notice says nothing about our runs.
CPU_KERNEL_NOTICE = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes-quantized linear layers (4-bit or 8-bit) of ``model``."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def four_bit_matmul_function() -> type:
    """The autograd Function of a ``Linear4bit`` forward that needs grads (it saves its inputs only)."""
    from bitsandbytes.autograd._functions import MatMul4Bit

    return MatMul4Bit


def keep_cpu_weights_trainable(model: nn.Module) -> int:
    """Stop every 4-bit layer of ``model`` from repacking its weight for CPU inference; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (0.49 on) rewrites a ``Linear4bit`` weight **in place**
    into a CPU inference layout the first time the layer runs in eval mode on an input that needs
    no grad, as validation does. The repacking fails for layers narrower than 64, and where it
    succeeds the weight stays repacked, so training after validation breaks. Call it before the
    first eval pass: a weight that was already repacked gets the standard layout back, but its
    block scales were rounded to bf16 on the way.
    """
    import bitsandbytes as bnb

    guarded = 0
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
            module.quant_state = weight.quant_state
        guarded += 1
    return guarded


def repacks_on_cpu(module: nn.Module) -> bool:
    """Whether a ``Linear4bit`` would repack its weight in place in eval mode on this CPU."""
    return bool(getattr(module, "support_avx512bf16_for_cpu", False))


def misread_on_cpu(shapes: Iterable[tuple[str, int]]) -> list[str]:
    """Of ``(name, in_features)`` pairs, the 4-bit layers that bitsandbytes' CPU dequantization gets wrong.

    Its CPU kernel starts a new 64-element block at every row, while the quantized data are
    blocked over the flattened weight: rows that are not a whole number of blocks wide come back
    with errors of the size of the weights themselves (bitsandbytes 0.49 to 0.50.2).
    """
    return [name for name, width in shapes if width % BLOCKSIZE]


def trace_4bit_linears_when_compiled(module: nn.Module) -> int:
    """Make the NF4 ``Linear4bit`` layers inside ``module`` traceable by ``torch.compile``; returns how many.

    Each such layer becomes a ``Linear4bit`` whose forward, while being compiled, is ``vlm.kernels.nf4_linear``
    (a dequantization operator and aten's product, which the compiled program queues without Python), and
    otherwise bitsandbytes' own: eager calls, generation's one-token products among them, keep its kernels.
    The layer stays a ``Linear4bit`` for everything else (state dicts, PEFT, merging).
    """
    import bitsandbytes as bnb

    traceable = _traceable_linear4bit()
    changed = 0
    for layer in module.modules():
        if type(layer) is bnb.nn.Linear4bit and layer.weight.quant_state.quant_type == "nf4":
            layer.__class__ = traceable
            changed += 1
    return changed


@functools.cache
def _traceable_linear4bit() -> type:
    import bitsandbytes as bnb
    import torch

    from vlm.kernels.nf4_linear import nf4_linear

    class TraceableLinear4bit(bnb.nn.Linear4bit):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not torch.compiler.is_compiling():
                return super().forward(x)
            dtype = self.compute_dtype or x.dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            return nf4_linear(x.to(dtype), self.weight, self.weight.quant_state, bias).to(x.dtype)

    return TraceableLinear4bit
