"""Shared fixtures: tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

from vlm.data.demo import DEMO_VOCABULARY
from vlm.models.families import get_family
from vlm.models.tiny import build_tiny_checkpoint


# Tests never reach W&B's servers: without an API key every run is offline.
os.environ.pop("WANDB_API_KEY", None)
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(model_type)`` → directory of a tiny random-init checkpoint with its processor."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    built: dict[str, str] = {}

    def build(model_type: str) -> str:
        if model_type not in built:
            built[model_type] = str(build_tiny_checkpoint(get_family(model_type), root / model_type, DEMO_VOCABULARY))
        return built[model_type]

    return build
