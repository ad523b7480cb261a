"""What patching did to a model: how many places got each kernel, what was left alone and why,
and how to undo every patch."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

from torch import nn


@dataclass
class PatchReport:
    """How many places each kernel was patched into, and what was left alone and why."""

    patched: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)  # "kernel: reason" → count
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        done = ", ".join(f"{name} ×{n}" for name, n in sorted(self.patched.items())) or "none"
        left = ", ".join(f"{why} ×{n}" for why, n in sorted(self.skipped.items()))
        return f"kernels patched: {done}" + (f"; left alone: {left}" if left else "")

    def replace_forward(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        """``module.forward`` becomes ``forward`` bound to it, until :meth:`undo`."""
        self.replace_attribute(module, "forward", MethodType(forward, module))

    def replace_attribute(self, owner: Any, name: str, value: Any) -> None:
        """``owner.name`` becomes ``value`` until :meth:`undo`, which puts back what was there
        (or, for an attribute the instance did not hold itself, lets the class's show again)."""
        own = name in vars(owner)
        before = vars(owner).get(name)
        setattr(owner, name, value)
        self._undo.append(lambda: setattr(owner, name, before) if own else delattr(owner, name))

    def undo(self) -> None:
        """Every patch taken back, the last first."""
        while self._undo:
            self._undo.pop()()
