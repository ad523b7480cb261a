"""``torch.compile`` of the decoder layers that train, and of the frozen tower's blocks: ``model.compile=none|layers|auto``.

At a few thousand tokens the step of a QLoRA model waits on the host: each decoder layer's forward, its
recomputation and its backward are hundreds of small Python calls, each queuing a kernel or two. Compiled,
a layer's forward and its backward are one generated program each, which queues the same matrix
products with little host work between them, and fuses the elementwise ops (norms, rotary embedding,
the gated activation, the LoRA sums) into a few kernels.

- The decoder layers holding a trainable weight are compiled for training steps; the blocks of the frozen
  stacks (the vision tower's), which run forward only, for the forward of those steps.
- Inside both, each NF4 linear is traced as our dequantization operator and aten's product
  (``vlm.kernels.nf4_linear``): bitsandbytes' own forward would cost each call its Python.
- Layers of one class share one compiled program: the first step compiles each class once (the warm-up
  the bench reports), and one further compile follows the first change of sequence length, after which
  the length is symbolic.
- Checkpointing stays what ``model.checkpointing`` says. A checkpointed layer is compiled with its checkpoint
  (the layer's ``_gradient_checkpointing_func``, which Hugging Face calls in training steps with grad), so the
  compiled program keeps only the layer's inputs and its backward recomputes what the gradients need, in one
  program: not the layer's output (the down projection), and with none of an eager checkpoint's host work.
  Under ``offload`` the offloader's saved-tensor hooks run around the compiled program and send the layer
  input it keeps to host memory; the weights and the inputs all layers share, which it keeps too, stay.
- Two pieces of Python state that Transformers' layers touch are made traceable around each compiled call (see
  :func:`_traceable_layer_state`): without that, from Transformers 5.2x on every layer but Mllama's would run
  eagerly behind a silent fallback, and the frozen towers' blocks would break into pieces. A checkpoint that
  TorchDynamo still gives up warns; so does a frozen block that fails to compile, which then runs eagerly.
- Only training steps run compiled (module in training mode; the trainable layers also with grad enabled);
  evaluation and generation, with their caches, run the eager layers.
- ``auto`` (the default) is ``layers`` on CUDA, where the host time it saves is what a step waits on, and ``none``
  elsewhere, and also wherever ``layers`` would be refused: under FSDP, or with our kernels patched inside the layers
  (:func:`resolve_compile`).
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch._dynamo import config as dynamo_config
from torch._functorch import config as partitioner
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from .checkpointing import ActivationOffloader

COMPILE = ("none", "layers", "auto")
# Kernels patched into the decoder layers' modules. Compiled, a layer fuses those ops itself, and our
# kernels' launch code is not traced: only the kernels outside the layers (the loss) combine with it.
KERNELS_INSIDE_LAYERS = ("rms_norm", "layer_norm", "rope", "swiglu", "geglu", "lora")


def check_compile(mode: object, key: str = "model.compile") -> str:
    if mode not in COMPILE:
        raise ValueError(f"{key}={mode!r} must be one of {', '.join(COMPILE)}")
    return mode


def kernels_inside_layers(enabled: Sequence[str]) -> list[str]:
    """Those of the ``enabled`` kernels that ``model.compile=layers`` does not take."""
    return [name for name in enabled if name in KERNELS_INSIDE_LAYERS]


@dataclass(frozen=True)
class CompileChoice:
    """What ``model.compile`` asked for and what runs: ``auto`` decided, and why."""

    asked: str  # none | layers | auto
    mode: str  # none | layers
    why: str = ""  # what decided auto

    def summary(self) -> str:
        """``auto → none (not CUDA)``; an explicit mode as it was given."""
        return f"auto → {self.mode} ({self.why})" if self.asked == "auto" else self.mode


def resolve_compile(asked: str, device: str, enabled_kernels: Sequence[str] = (), sharded: bool = False) -> CompileChoice:
    """What ``model.compile=asked`` runs for a model built on ``device`` (``cuda``, ``cuda:1``, ``cpu``, ...) with the
    ``enabled_kernels`` patched in, under a strategy that shards the weights where ``sharded`` (FSDP).

    ``none`` and ``layers`` stay as they are (``layers`` is refused where it cannot work, by the config checks and
    :func:`~vlm.build.model.build_model`); ``auto`` is ``layers`` on CUDA, and ``none`` on any other device and
    wherever ``layers`` would be refused.
    """
    check_compile(asked)
    if asked != "auto":
        return CompileChoice(asked, asked)
    if torch.device(device).type != "cuda":
        return CompileChoice(asked, "none", "not CUDA")
    if sharded:
        return CompileChoice(asked, "none", "FSDP")
    clashing = kernels_inside_layers(enabled_kernels)
    if clashing:
        return CompileChoice(asked, "none", f"kernels inside the layers: {', '.join(clashing)}")
    return CompileChoice(asked, "layers", "CUDA")


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


@dataclass(frozen=True)
class CompiledLayers:
    """What ``compile_layers`` compiled."""

    trainable: int  # decoder layers with a trainable weight, compiled for training steps
    frozen: int  # blocks of the frozen stacks (the vision tower's), compiled for the forward of training steps
    traced_4bit: int  # NF4 linears inside them that the compiled programs call without bitsandbytes' Python

    def summary(self) -> str:
        return (f"{self.trainable} decoder layers compiled for training steps, {self.frozen} frozen blocks for "
                f"their forward; {self.traced_4bit} NF4 linears traced")


def frozen_repeated_blocks(model: nn.Module, compiled: list[nn.Module]) -> list[nn.Module]:
    """The blocks of the frozen stacks: members of an ``nn.ModuleList`` that hold weights, none trainable, outside
    the ``compiled`` layers (the vision tower's encoder layers, say)."""
    inside = {id(m) for layer in compiled for m in layer.modules()}
    found: list[nn.Module] = []
    for stack in model.modules():
        if not isinstance(stack, nn.ModuleList) or id(stack) in inside:
            continue
        for block in stack:
            parameters = list(block.parameters())
            if id(block) in inside or not parameters or any(p.requires_grad for p in parameters):
                continue
            inside.update(id(m) for m in block.modules())
            found.append(block)
    return found


def compile_layers(model: nn.Module, offloader: ActivationOffloader | None = None) -> CompiledLayers:
    """Compile each trainable decoder layer of ``model`` for its training steps, and each block of its frozen
    stacks for the forward of those steps; their NF4 linears are traced into the compiled programs. A checkpointed
    layer is compiled with its checkpoint, and with the ``offloader`` of ``model.checkpointing=offload`` its hooks
    run around the program.

    The frozen blocks are compiled one by one, not their stack whole: on one H200, Mllama's two encoders
    compiled whole took the first step from 28 to 87 s and measured no faster step (BENCHMARKS.md).
    """
    from vlm.quant.bnb_layers import fuse_lora_of_4bit_linears_when_compiled, trace_4bit_linears_when_compiled

    layers = trainable_decoder_layers(model)
    if not layers:
        raise ValueError("model.compile=layers: the model has no decoder layer with a trainable weight")
    blocks = frozen_repeated_blocks(model, layers)
    traced = sum(trace_4bit_linears_when_compiled(module) for module in layers + blocks)
    for layer in layers:
        fuse_lora_of_4bit_linears_when_compiled(layer)
    for layer in layers:
        if getattr(layer, "gradient_checkpointing", False) is True:
            _compile_with_its_checkpoint(layer, offloader)
        elif offloader is not None:
            raise ValueError(f"model.compile=layers with model.checkpointing=offload: {type(layer).__name__} is not "
                             "checkpointed (enable the checkpointing first)")
        else:
            _compile_without_checkpoint(layer)
    for block in blocks:  # forward only, under no_grad: no cache to keep eager for, but eval stays eager
        _compile_frozen_block(block)
    return CompiledLayers(len(layers), len(blocks), traced)


@contextlib.contextmanager
def _traceable_layer_state() -> Iterator[None]:
    """Python state that Transformers' layers read or write in their forward, made traceable for one compiled call.

    - The collector of Transformers' output capture (``output_hidden_states``, ``output_attentions``): a hook on
      each attention module reads it through a ``ContextVar``, which TorchDynamo cannot trace, so each call broke
      there (the frozen towers' blocks ran in pieces; inside a checkpoint the whole layer ran eagerly). Its
      wrapper reads a plain attribute instead where it is told compilation is on; for this call it is, holding the
      collector that is active now.
    - The ``kernels`` package (a dependency of Transformers 5.2x) sets and resets a variable of its own around
      each attention forward. Inside a checkpoint a mutation of outer state is refused unless it need not be
      replayed by the recomputation; these, which leave the state as they found it, need not.
    """
    collector = _output_collector()
    shimmed = collector is not None and collector.compiling is False
    if shimmed:
        collector.global_var, collector.compiling = collector.get(), True
    try:
        with _compiler_settings(dynamo_config, **_SIDE_EFFECTS_NOT_REPLAYED):
            yield
    finally:
        if shimmed:
            collector.global_var, collector.compiling = None, False


# Where the torch release has the setting (it reads the kernels package's set and reset as harmless).
_SIDE_EFFECTS_NOT_REPLAYED = {name: True for name in ("skip_fwd_side_effects_in_bwd_under_checkpoint",)
                              if hasattr(dynamo_config, name)}


@functools.cache
def _output_collector():  # noqa: ANN202
    """Transformers' output-capture collector where it is one that can be told compilation is on, else ``None``."""
    try:
        from transformers.utils import output_capturing
    except ImportError:  # a release without it captures outputs otherwise
        return None
    collector = getattr(output_capturing, "_active_collector", None)
    return collector if hasattr(collector, "global_var") and hasattr(collector, "compiling") else None


@contextlib.contextmanager
def _compiler_settings(config, **values) -> Iterator[None]:  # noqa: ANN001, ANN003
    """``config``'s settings set to ``values`` for one call, and back after. Plain attribute writes: the config module's
    own ``patch`` costs about 25 µs of host time each, and this runs at every call of every compiled layer."""
    before = {name: getattr(config, name) for name in values}
    for name, value in values.items():
        setattr(config, name, value)
    try:
        yield
    finally:
        for name, value in before.items():
            setattr(config, name, value)


def _compile_without_checkpoint(layer: nn.Module) -> None:
    """Run a trainable ``layer`` that keeps its activations compiled in training steps with grad, eagerly elsewhere.

    Its backward dequantizes each NF4 weight again, as the eager layer's does: AOTAutograd's common-subexpression
    pass would otherwise merge the forward's and the backward's dequantization and keep every 16-bit weight for the
    backward (0.4 GB a layer at LLaVA-1.5-7B's widths, measured on the CPU, more than its activations at 4096 tokens).
    """
    eager = layer.forward  # the class's forward, bound
    compiled = torch.compile(eager)

    def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if layer.training and torch.is_grad_enabled():
            with _traceable_layer_state(), _compiler_settings(partitioner, cse=False):
                return compiled(*args, **kwargs)
        return eager(*args, **kwargs)

    layer.forward = forward


def _compile_frozen_block(block: nn.Module) -> None:
    """Run a block of a frozen tower compiled in training steps, eagerly elsewhere (evaluation).

    - Values read off a tensor are traced as symbolic sizes: Qwen's vision blocks split their attention per image by
      lengths read with ``.tolist()``, which otherwise breaks each block into pieces. The read syncs with the device
      in the program as it does eagerly.
    - A block whose program fails to compile runs eagerly from then on, with a warning: it runs forward only,
      without autograd, so running it again eagerly repeats nothing.
    """
    eager = block.forward
    compiled = torch.compile(eager)
    failed: list[str] = []

    def forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if block.training and not failed:
            try:
                with _traceable_layer_state(), _compiler_settings(dynamo_config, capture_scalar_outputs=True):
                    return compiled(*args, **kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as error:  # noqa: BLE001  (any failure of the compiler: the eager block is the answer)
                failed.append(f"{type(error).__name__}: {_headline(str(error))}")
                warnings.warn(f"model.compile=layers: {type(block).__name__} of the frozen tower did not compile "
                              f"({failed[0][:300]}); it runs eagerly", RuntimeWarning, stacklevel=2)
        return eager(*args, **kwargs)

    block.forward = forward


def _compile_with_its_checkpoint(layer: nn.Module, offloader: ActivationOffloader | None) -> None:
    """Hugging Face checkpoints ``layer`` only in training steps with grad, through ``_gradient_checkpointing_func``:
    that call runs the checkpointed layer as one compiled program (with the ``offloader``'s hooks around it).
    Outside it (evaluation, no grad) the layer runs eagerly."""
    run = _compiled_checkpoint()
    layer._gradient_checkpointing_func = run if offloader is None else functools.partial(offloader.run_keeping_inputs,
                                                                                         run)


def graph_breaks() -> dict[str, int]:
    """The graph breaks TorchDynamo counted in this process, by the first line of their reason."""
    from torch._dynamo.utils import counters

    found: dict[str, int] = {}
    for reason, count in counters["graph_break"].items():
        found[_headline(reason)] = found.get(_headline(reason), 0) + count
    return found


def _headline(text: str) -> str:
    """The first line of a reason or an error message."""
    return text.strip().splitlines()[0] if text.strip() else "(no reason given)"


def _warn_if_given_up(function, breaks_before: int) -> None:  # noqa: ANN001
    """Warn, once per reason, where TorchDynamo broke inside a layer's checkpoint: it then runs that layer eagerly,
    at several times the host time of its compiled program, and nothing else would say so."""
    from torch._dynamo.utils import counters

    reasons = list(counters["graph_break"])
    for reason in reasons[breaks_before:]:
        layer = getattr(getattr(function, "func", function), "__qualname__", "a layer")
        warnings.warn(f"model.compile=layers: TorchDynamo broke inside the checkpoint of {layer} ({_headline(reason)}); the "
                      "layer runs eagerly", RuntimeWarning, stacklevel=4)


def _checkpointed(function, *args):  # noqa: ANN001, ANN002, ANN202
    return checkpoint(function, *args, use_reentrant=False)


@functools.cache
def _compiled_checkpoint():  # noqa: ANN202
    # One compiled caller for every layer: TorchDynamo keys its programs by the code it traces (the layer
    # class's forward), so layers of one class share one.
    from torch._dynamo.utils import counters

    compiled = torch.compile(_checkpointed)

    def run(function, *args):  # noqa: ANN001, ANN002, ANN202
        # The program keeps only its inputs for the backward, which recomputes the rest. The traced checkpoint
        # says so, but not every torch release's partitioner reads it: on one H200 with torch 2.11 the programs
        # kept the products' outputs instead (6 GB more at 2048 tokens on Mllama 11B). A memory budget of 0 is
        # read by all of them; it is a setting of the compiler, read when a call compiles.
        breaks_before = len(counters["graph_break"])  # a new reason is a new break: compiled calls add none
        try:
            with _compiler_settings(partitioner, activation_memory_budget=0.0), _traceable_layer_state():
                return compiled(function, *args)
        finally:
            if len(counters["graph_break"]) != breaks_before:
                _warn_if_given_up(function, breaks_before)

    return run
