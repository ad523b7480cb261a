"""``model.compile=layers``: the trainable decoder layers run compiled in training steps and compute what the
eager layers compute; frozen layers, evaluation and generation stay eager."""

from __future__ import annotations

import pytest
import torch
from test_models import loss_and_grads, one_image_conversation, qlora_with_live_adapters

from vlm.build.model import run_frozen_parts_forward_only
from vlm.models.checkpointing import enable_checkpointing
from vlm.models.compiling import check_compile, compile_decoder_layers, trainable_decoder_layers
from vlm.models.families import get_family
from vlm.models.loading import load_model, load_processor
from vlm.quant.config import QuantConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles anew, and the compiled layers round where the eager ones do: inductor otherwise keeps
    a fused chain of bf16 ops in fp32, which is more exact but not bit for bit eager."""
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    with torch._inductor.config.patch(emulate_precision_casts=True):
        yield
    torch._dynamo.reset()


def _model(tiny_checkpoint, model_type: str, checkpointing: str = "standard"):
    """A tiny QLoRA model as the build makes it, with non-zero LoRA B so that every LoRA grad is non-zero."""
    family = get_family(model_type)
    path = tiny_checkpoint(model_type)
    model = qlora_with_live_adapters(path, family)
    run_frozen_parts_forward_only(model, family)
    enable_checkpointing(model, checkpointing)
    return model.train(), one_image_conversation(load_processor(path, family))


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_layers_train_as_the_eager_layers_do_and_evaluation_runs_the_eager_ones(tiny_checkpoint,
                                                                                        one_cpu_thread):
    """Mllama (self- and cross-attention layers) with standard checkpointing, recomputed inside the compiled region."""
    from torch._dynamo.utils import counters

    eager, batch = _model(tiny_checkpoint, "mllama")
    expected_loss, expected_grads = loss_and_grads(eager, batch)
    model, _ = _model(tiny_checkpoint, "mllama")
    assert compile_decoder_layers(model) == len(trainable_decoder_layers(model)) > 0
    graphs = []
    for _ in range(2):  # the first step compiles, the second runs what was compiled
        loss, grads = loss_and_grads(model, batch)
        graphs.append(_compiled_graphs())
        assert torch.equal(loss, expected_loss)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    # Compiled whole, not run eagerly around a break, and once: the second step compiled nothing.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0] == graphs[1] > 0

    model.eval()
    eager.eval()
    with torch.no_grad():
        logits, expected = model(**batch).logits, eager(**batch).logits
    assert _compiled_graphs() == graphs[-1]  # nothing more compiled: the eager layers ran
    assert torch.equal(logits, expected)  # the same weights: no optimizer step ran


def test_only_the_trainable_layers_are_compiled(tiny_checkpoint):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model, _ = _model(tiny_checkpoint, "qwen2_vl")
    compile_decoder_layers(model)
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    compiled = [m for m in layers if "forward" in vars(m)]
    frozen = [m for m in layers if not any(p.requires_grad for p in m.parameters())]
    assert compiled and frozen  # the frozen vision tower's blocks are checkpointed layers too
    assert all(any(p.requires_grad for p in m.parameters()) for m in compiled)
    assert not any("forward" in vars(m) for m in frozen)


def test_a_model_without_trainable_decoder_layers_is_refused(tiny_checkpoint):
    family = get_family("qwen2_vl")
    model, _ = load_model(tiny_checkpoint("qwen2_vl"), family, QuantConfig())
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no decoder layer with a trainable weight"):
        compile_decoder_layers(model)


def test_compile_values_and_the_offload_combination_are_checked():
    assert check_compile("none", "offload") == "none"
    assert check_compile("layers", "standard") == "layers"
    with pytest.raises(ValueError, match=r"model\.compile='all' must be one of none, layers"):
        check_compile("all")
    with pytest.raises(ValueError, match=r"model\.compile=layers does not combine with model\.checkpointing=offload"):
        check_compile("layers", "offload")
