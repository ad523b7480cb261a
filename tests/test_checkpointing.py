"""Activation checkpointing: ``none``, ``standard`` and ``offload`` train the same weights the same way;
``offload`` keeps each checkpointed layer input in host memory from its forward to its backward and
brings it back one layer ahead."""

from __future__ import annotations

import pytest
import torch
from test_models import loss_and_grads, one_image_conversation, qlora_with_live_adapters

from vlm.models.checkpointing import ActivationOffloader, enable_checkpointing
from vlm.models.families import get_family
from vlm.models.loading import load_processor
from vlm.models.spec import ModelSpec

FAMILIES = ["mllama", "qwen2_vl", "llava"]


@pytest.fixture(scope="module")
def built(tiny_checkpoint):
    """A tiny QLoRA model per family, with non-zero LoRA B (so that every LoRA grad is non-zero), and its batch."""
    made = {}

    def build(model_type):
        if model_type not in made:
            family = get_family(model_type)
            path = tiny_checkpoint(model_type)
            model = qlora_with_live_adapters(path, family)
            made[model_type] = model.train(), one_image_conversation(load_processor(path, family))
        return made[model_type]

    return build


def _decoder_layers_checkpointed(model) -> int:
    return sum(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_mode_gives_the_loss_and_grads_of_standard_checkpointing(built, model_type, one_cpu_thread):
    model, batch = built(model_type)
    results = {}
    for mode in ("standard", "none", "offload"):
        enable_checkpointing(model, mode, ActivationOffloader(min_bytes=0))
        results[mode] = loss_and_grads(model, batch)
    loss, grads = results["standard"]
    assert all(g.abs().sum() > 0 for g in grads.values())
    for mode in ("none", "offload"):
        other_loss, other_grads = results[mode]
        assert torch.equal(other_loss, loss), mode  # the same ops on the same values: bit for bit
        for name, grad in grads.items():
            torch.testing.assert_close(other_grads[name], grad, rtol=0, atol=0, msg=f"{mode}: {name}")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_offload_moves_each_layer_input_out_and_back_one_layer_ahead(built, model_type, one_cpu_thread):
    model, batch = built(model_type)
    offloader = enable_checkpointing(model, "offload", ActivationOffloader(min_bytes=0))
    layers = _decoder_layers_checkpointed(model)
    assert layers > 0
    loss = model(**batch).loss
    # Held for the backward: one input per layer whose output the loss depends on through a LoRA
    # weight. (A frozen tower's layers may be checkpointed too, but their graph is dropped at once.)
    held = len(offloader.waiting())
    assert 0 < held <= offloader.counts.offloaded <= layers
    loss.backward()
    counts = offloader.counts
    assert counts.fetched_on_demand == 1  # the last layer: its backward comes first
    assert counts.fetched_ahead == held - 1
    assert offloader.waiting() == []
    model.zero_grad(set_to_none=True)


def test_an_empty_saved_tensor_stays_where_it_is_even_with_no_size_floor():
    """Some torch releases save an empty marker tensor with each checkpoint's inputs: it is not a layer input to
    move. An empty positional input is saved the same way, on every release."""
    offloader = ActivationOffloader(min_bytes=0)
    x = torch.randn(4, 8, requires_grad=True)
    offloader.checkpoint(lambda x, marker: x.sin(), x, torch.empty(0)).sum().backward()
    assert offloader.counts.offloaded == 1 and offloader.counts.offloaded_bytes == x.numel() * x.element_size()
    assert offloader.counts.fetched_on_demand == 1 and offloader.waiting() == []
    torch.testing.assert_close(x.grad, x.detach().cos())


def test_nothing_is_offloaded_without_grad_or_below_the_size_worth_a_copy(built, one_cpu_thread):
    model, batch = built("qwen2_vl")
    offloader = enable_checkpointing(model, "offload", ActivationOffloader(min_bytes=0))
    with torch.no_grad():
        model(**batch)
    model.eval()
    model(**batch)  # eval: Hugging Face does not checkpoint
    model.train()
    assert offloader.counts.offloaded == 0
    small = enable_checkpointing(model, "offload", ActivationOffloader(min_bytes=1 << 30))
    model(**batch).loss.backward()
    assert small.counts.offloaded == 0
    model.zero_grad(set_to_none=True)


def test_a_second_backward_through_the_same_graph_is_refused_with_the_reason(built, one_cpu_thread):
    model, batch = built("qwen2_vl")
    enable_checkpointing(model, "offload", ActivationOffloader(min_bytes=0))
    loss = model(**batch).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()
    model.zero_grad(set_to_none=True)


def test_the_mode_is_checked_where_it_enters(tiny_checkpoint):
    with pytest.raises(ValueError, match=r"model\.checkpointing='sometimes' must be one of none, standard, offload"):
        ModelSpec(family="qwen2_vl", tiny_dir="unused", checkpointing="sometimes")
    with pytest.raises(ValueError, match="must be one of"):
        enable_checkpointing(torch.nn.Linear(2, 2), "on")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_frees_the_layer_inputs_on_the_gpu_and_gives_the_same_grads():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=8)
    model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
    ids = torch.randint(0, 256, (1, 8192), device="cuda")
    layer_input_bytes = ids.numel() * config.hidden_size * 2
    results = {}
    for mode in ("standard", "offload"):
        offloader = enable_checkpointing(model, mode)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        # An allocation makes the allocator release the blocks the copy stream has finished reading.
        torch.empty(1, device="cuda")
        held = torch.cuda.memory_allocated() - before  # what the graph keeps for the backward
        loss.backward()
        torch.cuda.synchronize()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[mode] = held, loss.detach(), grads, offloader
    held_standard, loss, grads, _ = results["standard"]
    held_offload, loss_offload, grads_offload, offloader = results["offload"]
    assert offloader.counts.offloaded == config.num_hidden_layers
    assert offloader.counts.fetched_ahead == config.num_hidden_layers - 1
    assert held_standard - held_offload >= 0.9 * config.num_hidden_layers * layer_input_bytes
    assert torch.equal(loss_offload, loss)  # the same forward
    # Attention's backward kernels need not be deterministic on a GPU (bitwise equality is checked on the CPU): each
    # grad within 2% of its own norm, where a wrong layer input brought back would be as far as the grad is large.
    for name, grad in grads.items():
        gap = (grads_offload[name].float() - grad.float()).norm() / grad.float().norm().clamp(min=1e-30)
        assert gap < 2e-2, f"{name}: {gap:.2%} of its norm apart"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_checkpointed_layers_hold_on_the_gpu_what_the_eager_checkpoint_holds():
    """``model.compile=layers`` keeps, between a forward and its backward, no more than the eager checkpoint: the
    layer inputs (none of them under ``offload``). A program that kept its products' outputs instead, as torch
    2.11's partitioner did with the traced checkpoint alone, would hold each layer's activations (67 MB here)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from vlm.models.compiling import compile_layers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=512, intermediate_size=2048, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8)
    ids = torch.randint(0, 256, (1, 4096), device="cuda")
    layer_input_bytes = ids.numel() * config.hidden_size * 2
    held = {}
    for compiled in (False, True):
        model = LlamaForCausalLM(config).to("cuda", torch.bfloat16).train()
        for mode in ("standard", "offload"):
            offloader = enable_checkpointing(model, mode)
            if compiled:
                compile_layers(model, offloader)
            for _ in range(2):  # the first step compiles
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                torch.empty(1, device="cuda")  # the allocator releases the blocks the copy stream has read
                before = torch.cuda.memory_allocated()
                loss = model(input_ids=ids, labels=ids).loss
                torch.cuda.synchronize()
                torch.empty(1, device="cuda")
                held[compiled, mode] = torch.cuda.memory_allocated() - before
                loss.backward()
            if offloader is not None:
                assert offloader.counts.offloaded == 2 * config.num_hidden_layers
    for mode in ("standard", "offload"):
        assert held[True, mode] <= held[False, mode] + layer_input_bytes, (mode, held)
    assert held[True, "standard"] - held[True, "offload"] >= 0.9 * config.num_hidden_layers * layer_input_bytes
