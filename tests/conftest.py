"""Shared fixtures: tiny checkpoints of every family, built once per test session."""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter: set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vlm.data.demo import DEMO_VOCABULARY
from vlm.models.families import FAMILIES, get_family
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


@pytest.fixture
def one_cpu_thread():
    """The tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
    threads spinning against other processes make them 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny random-init Llama (text only), for the training tests."""
    from tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_models(tiny_checkpoint):
    """name → (family, processor, checkpoint dir) for every family, built once per session."""
    from vlm.models.loading import load_processor

    return {
        name: (get_family(name), load_processor(tiny_checkpoint(name), get_family(name)), tiny_checkpoint(name))
        for name in sorted(FAMILIES)
    }


@pytest.fixture
def make_qlora_model(tiny_llama_dir):
    """``make_qlora_model()`` → a fresh 4-bit + LoRA tiny Llama, the same one every call."""
    from tiny_llama import qlora_model

    return lambda: qlora_model(tiny_llama_dir)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The run directory of the default demo (``vlm-train`` with no arguments), trained once per session.

    Only where it writes differs from the README's command (and the validation set is 64 samples
    rather than 128, to keep evaluation short); the data, model and recipe are the demo's.
    """
    from hydra import compose, initialize_config_dir

    from vlm.cli.train import train
    from vlm.configs import config_dir, register_resolvers

    root = tmp_path_factory.mktemp("demo-run")
    register_resolvers()
    overrides = [
        f"paths.output_dir={root / 'run'}",
        f"paths.cache_dir={root / 'cache'}",
        "demo_data.n_val=64",
        "trainer.enable_progress_bar=false",
    ]
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    summary = train(cfg)
    assert summary["status"] == "completed", summary
    return root / "run"
