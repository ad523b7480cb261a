"""Values as plain Python data, which JSON, YAML, loggers and ``torch.load(weights_only=True)`` all take."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import torch


def plain(value: Any) -> Any:
    """``value`` as ``None``, bools, ints, finite floats, strings, lists and string-keyed dicts.

    NaN and infinities become ``None`` (strict JSON has neither); tensors become numbers or
    lists; OmegaConf containers, dataclasses and mappings become dicts; paths, dtypes and enums
    their names; a callable its qualified name (what a Hydra ``_target_`` names). Anything else
    becomes its ``str``.
    """
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Enum):
        value = value.value
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor):
        return plain(value.item() if value.numel() == 1 else value.tolist())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    if hasattr(value, "tolist") and not callable(value):
        return plain(value.tolist())  # numpy arrays and scalars
    if callable(value):
        return qualified_name(value)
    return str(value)


def qualified_name(obj: Any) -> str:
    """``module.QualName`` of a function or class (of an instance's class otherwise)."""
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or type(obj).__qualname__
    return f"{module}.{name}" if module else name
