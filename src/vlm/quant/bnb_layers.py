"""The bitsandbytes layers of a loaded model: which they are, and keeping them trainable on the CPU.

Everything this project needs to know about bitsandbytes' layer internals lives here, so that a
change in a bitsandbytes release is mended in one place.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from torch import nn

from .formats import BLOCKSIZE

# (logger, message prefix) of what is logged when bitsandbytes is imported on a CPU with AVX512-BF16: it asks the
# Hub's `kernels` package (a dependency of transformers from 5.25 on) for a CPU kernel and says so when it gets none;
# offline, `kernels` first says it skips that kernel's trust check. The kernel serves only the inference layout
# that `keep_cpu_weights_trainable` switches off, so neither notice says anything about our runs.
CPU_KERNEL_NOTICES = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'"),
)


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


def fuse_lora_of_4bit_linears_when_compiled(module: nn.Module) -> int:
    """Make each PEFT LoRA layer on an NF4 ``Linear4bit`` inside ``module`` compute, while being compiled, base and
    adapter as one operation (``vlm.kernels.nf4_linear.nf4_lora_linear``); returns how many. Eager calls, and calls
    the fused form does not cover (adapters disabled or merged, another adapter active), run PEFT's forward."""
    import torch

    from vlm.kernels.nf4_linear import nf4_lora_linear

    fused = 0
    for layer in module.modules():
        base = getattr(layer, "base_layer", None)
        if not (isinstance(base, nn.Module) and hasattr(layer, "lora_A") and _is_nf4(base)):
            continue
        adapter = plain_adapter(layer)
        if adapter is None:
            continue
        peft_forward = layer.forward

        def forward(x, *args, layer=layer, peft_forward=peft_forward, adapter=adapter, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            if not (torch.compiler.is_compiling() and runs_plain_adapter(layer, adapter, args, kwargs)):
                return peft_forward(x, *args, **kwargs)
            base = layer.base_layer
            dtype = base.compute_dtype or x.dtype  # as bitsandbytes does: compute in it, answer in x's dtype
            bias = None if base.bias is None else base.bias.to(dtype)
            out = nf4_lora_linear(x.to(dtype), base.weight, base.weight.quant_state, layer.lora_A[adapter].weight.to(dtype),
                                  layer.lora_B[adapter].weight.to(dtype), layer.scaling[adapter], bias)
            return out.to(x.dtype)

        layer.forward = forward
        fused += 1
    return fused


def _is_nf4(layer: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_state.quant_type == "nf4"


def plain_adapter(layer: nn.Module) -> str | None:
    """The one active adapter of a PEFT LoRA layer, where a fused base-plus-adapter op computes what PEFT does (no
    dropout, no variant such as DoRA); ``None`` otherwise."""
    adapters = list(layer.active_adapters)
    adapter = adapters[0] if len(adapters) == 1 else None
    dropout = layer.lora_dropout[adapter] if adapter in layer.lora_dropout else None
    if adapter is None or not isinstance(dropout, nn.Identity) or adapter in getattr(layer, "lora_variant", {}):
        return None
    return adapter


def runs_plain_adapter(layer: nn.Module, adapter: str, args: tuple, kwargs: dict) -> bool:
    """Whether a call of the PEFT LoRA ``layer`` computes its base and ``adapter`` alone (see ``plain_adapter``):
    adapters neither disabled nor merged, no other active, no extra arguments."""
    return not (layer.disable_adapters or layer.merged or args or kwargs or list(layer.active_adapters) != [adapter])
