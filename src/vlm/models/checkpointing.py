"""Activation checkpointing of the decoder layers: ``none``, ``standard`` or ``offload``.

- ``none``: every activation is kept for the backward. The fastest where they fit.
- ``standard``: each decoder layer keeps only its input and recomputes the rest in the backward
  (Hugging Face's gradient checkpointing, non-reentrant).
- ``offload``: as ``standard``, and the kept layer inputs go to pinned host memory, copied on a
  stream of their own while the next layers compute. In the backward each comes back on that
  stream one layer ahead of its recomputation. The GPU then holds no layer's input between its
  forward and its backward: at 16k tokens on an 11B model that is 5 GB.

Only what the checkpoint itself keeps is offloaded: a layer's positional tensor inputs (its
hidden states). Keyword inputs shared by all layers, such as masks, position embeddings and the
cross-attention states, stay where they are.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINTING = ("none", "standard", "offload")
# Below this size a tensor is not worth a copy each way (a 1-token input, a scalar).
OFFLOAD_MIN_BYTES = 1 << 20


def check_checkpointing(mode: object, key: str = "model.checkpointing") -> str:
    if mode not in CHECKPOINTING:
        raise ValueError(f"{key}={mode!r} must be one of {', '.join(CHECKPOINTING)}")
    return mode


def enable_checkpointing(
    model: nn.Module, mode: str, offloader: ActivationOffloader | None = None
) -> ActivationOffloader | None:
    """Set ``model``'s decoder layers to ``mode`` (whatever they were set to before); returns the
    offloader under ``offload`` (``offloader``, or a new one)."""
    check_checkpointing(mode)
    renamed = hasattr(model, "activation_checkpointing_enable")  # the names from transformers 5.2x on
    if mode == "none":
        if getattr(model, "is_activation_checkpointing" if renamed else "is_gradient_checkpointing", False):
            (model.activation_checkpointing_disable if renamed else model.gradient_checkpointing_disable)()
        return None
    kwargs = {"use_reentrant": False}  # non-reentrant: frozen inputs need no grad hook
    if renamed:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None:
            config.use_cache = False  # a KV cache is useless in training and clashes with recomputation
    if mode == "standard":
        return None
    offloader = offloader or ActivationOffloader()
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True
              and hasattr(m, "_gradient_checkpointing_func")]
    if not layers:
        raise ValueError("model.checkpointing=offload: the model has no layer that Hugging Face checkpoints")
    for layer in layers:
        layer._gradient_checkpointing_func = offloader.checkpoint
    return offloader


@dataclass(eq=False)
class _Offloaded:
    """A layer input in host memory, and, once fetched, its copy back on the device."""

    host: torch.Tensor
    device: torch.device
    fetched: torch.Tensor | None = None
    ready: torch.cuda.Event | None = None


@dataclass
class OffloadCounts:
    offloaded: int = 0  # layer inputs sent to host memory
    fetched_ahead: int = 0  # brought back while the layer after them ran its backward
    fetched_on_demand: int = 0  # brought back only when needed (the first layer of a backward)
    offloaded_bytes: int = 0


@dataclass(eq=False)
class ActivationOffloader:
    """Checkpoints whose kept inputs live in host memory between forward and backward.

    Each layer input is packed in forward order; the backward unpacks them in reverse, and each
    unpack starts the copy of the one packed before it, so that it arrives while this layer's
    backward runs.
    """

    min_bytes: int = OFFLOAD_MIN_BYTES
    counts: OffloadCounts = field(default_factory=OffloadCounts)
    # Weak references to the packed inputs, in forward order; those read back or freed are dropped from
    # the end as the backward reaches them.
    _order: list = field(default_factory=list)
    _streams: dict = field(default_factory=dict)

    def checkpoint(self, function, *args):  # noqa: ANN001, ANN201  (Hugging Face's _gradient_checkpointing_func)
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return checkpoint(function, *args, use_reentrant=False)

    def run_keeping_inputs(self, run, function, *args):  # noqa: ANN001, ANN201
        """``run(function, *args)``, a compiled program that checkpoints ``function`` itself, with the layer inputs
        ``args`` that it keeps for the backward in host memory. Of what the program keeps, they alone move: it
        keeps the weights and the inputs every layer shares as well, which stay where they are."""
        inputs = {arg.untyped_storage().data_ptr() for arg in args if isinstance(arg, torch.Tensor)}

        def pack(tensor: torch.Tensor) -> torch.Tensor | _Offloaded:
            return self._pack(tensor) if tensor.untyped_storage().data_ptr() in inputs else tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, self._unpack):
            return run(function, *args)

    # ------------------------------------------------------------------ forward: to host memory
    def _pack(self, tensor: torch.Tensor) -> torch.Tensor | _Offloaded:
        size = tensor.numel() * tensor.element_size()
        # Empty tensors hold nothing to move (some torch releases save an empty marker with each checkpoint).
        if size == 0 or size < self.min_bytes or not tensor.is_contiguous():
            return tensor
        if tensor.is_cuda:
            stream = self._stream(tensor.device)
            stream.wait_stream(torch.cuda.current_stream(tensor.device))  # after the layer input is written
            with torch.cuda.stream(stream):
                host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
                host.copy_(tensor, non_blocking=True)
            tensor.record_stream(stream)  # its memory is not reused before the copy has read it
        else:
            host = tensor.clone()  # already in host memory: copied all the same, so the path is the one a GPU takes
        entry = _Offloaded(host, tensor.device)
        self._order.append(weakref.ref(entry))
        self.counts.offloaded += 1
        self.counts.offloaded_bytes += tensor.numel() * tensor.element_size()
        return entry

    # ------------------------------------------------------------------ backward: back, one layer ahead
    def _unpack(self, packed: torch.Tensor | _Offloaded) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if packed.host is None:
            raise RuntimeError("an offloaded layer input was read twice: model.checkpointing=offload cannot "
                               "run a backward through the same graph again (retain_graph)")
        if packed.fetched is None:
            self._fetch(packed)
            self.counts.fetched_on_demand += 1
        else:
            self.counts.fetched_ahead += 1
        following = self._next_needed(packed)
        if following is not None and following.fetched is None:
            self._fetch(following)
        tensor = packed.fetched
        if tensor.is_cuda:
            current = torch.cuda.current_stream(tensor.device)
            current.wait_event(packed.ready)
            tensor.record_stream(current)  # allocated on the copy stream, used on this one
        packed.host = packed.fetched = packed.ready = None  # the graph holds it from here
        return tensor

    def _next_needed(self, packed: _Offloaded) -> _Offloaded | None:
        """The input the backward needs after ``packed``: the one packed last before it. The backward runs
        in reverse, so ``packed`` is the last one waiting; it and what was read back or freed behind it
        leave the end of the order."""
        order = self._order
        while order and ((last := order[-1]()) is None or last is packed or last.host is None):
            order.pop()
        return order[-1]() if order else None

    def waiting(self) -> list[_Offloaded]:
        """The inputs packed and not yet read back, in forward order."""
        entries = (ref() for ref in self._order)
        return [e for e in entries if e is not None and e.host is not None]

    def _fetch(self, entry: _Offloaded) -> None:
        if entry.device.type == "cuda":
            stream = self._stream(entry.device)
            with torch.cuda.stream(stream):
                tensor = torch.empty(entry.host.shape, dtype=entry.host.dtype, device=entry.device)
                tensor.copy_(entry.host, non_blocking=True)
                entry.ready = stream.record_event()
        else:
            tensor = entry.host.clone()
        entry.fetched = tensor

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]
