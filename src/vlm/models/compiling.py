"""``torch.compile`` of the decoder layers that train: ``model.compile=none|layers``.

At a few thousand tokens the step of a QLoRA model waits on the host: each decoder layer's forward, its
recomputation and its backward are hundreds of small Python calls, each queuing a kernel or two. Compiled,
a layer's forward and its backward are one generated program each, which queues the same matrix
products with little host work between them, and fuses the elementwise ops (norms, rotary embedding,
the gated activation, the LoRA sums) into a few kernels.

- Only layers holding a trainable weight are compiled; the frozen vision tower runs forward only anyway.
- Layers of one class share one compiled program: the first step compiles each class once (the warm-up
  the bench reports), and one further compile follows the first change of sequence length, after which
  the length is symbolic.
- Checkpointing stays what ``model.checkpointing`` says, inside the compiled region: the compiled
  backward recomputes the layer from its input.
- Only training steps run compiled (module in training mode, grad enabled); evaluation and generation,
  with their caches, run the eager layers.
"""

from __future__ import annotations

import torch
from torch import nn

COMPILE = ("none", "layers")
# Kernels patched into the decoder layers' modules. Compiled, a layer fuses those ops itself, and our
# kernels' launch code is not traced: only the kernels outside the layers (the loss) combine with it.
KERNELS_INSIDE_LAYERS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "lora")


def check_compile(mode: object, checkpointing: str | None = None, key: str = "model.compile") -> str:
    if mode not in COMPILE:
        raise ValueError(f"{key}={mode!r} must be one of {', '.join(COMPILE)}")
    if mode == "layers" and checkpointing == "offload":
        # The offloader's saved-tensor hooks cannot be traced, and outside the compiled region they would see
        # every tensor the compiled backward keeps (weights included), not the layer inputs alone.
        raise ValueError(f"{key}=layers does not combine with model.checkpointing=offload: "
                         "use model.checkpointing=standard or none with it, or model.compile=none")
    return mode


def kernels_inside_layers(enabled: list[str]) -> list[str]:
    """Those of the ``enabled`` kernels that ``model.compile=layers`` does not take."""
    return [name for name in enabled if name in KERNELS_INSIDE_LAYERS]


def trainable_decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The outermost decoder layers (Hugging Face's ``GradientCheckpointingLayer``) that hold a trainable weight."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    found: list[nn.Module] = []
    inside: set[int] = set()
    for module in model.modules():  # parents come before their children
        if id(module) in inside or not isinstance(module, GradientCheckpointingLayer):
            continue
        inside.update(id(m) for m in module.modules())
        if any(p.requires_grad for p in module.parameters()):
            found.append(module)
    return found


def compile_decoder_layers(model: nn.Module) -> int:
    """Compile each trainable decoder layer of ``model`` for its training steps; returns how many."""
    layers = trainable_decoder_layers(model)
    if not layers:
        raise ValueError("model.compile=layers: the model has no decoder layer with a trainable weight")
    for layer in layers:
        _compile_for_training(layer)
    return len(layers)


def _compile_for_training(layer: nn.Module) -> None:
    eager = layer.forward  # the class's forward, bound: Hugging Face's checkpointing wrapper included
    compiled = torch.compile(eager)

    def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if layer.training and torch.is_grad_enabled():
            return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    layer.forward = forward
