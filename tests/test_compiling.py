"""``model.compile=layers``: the trainable decoder layers run compiled in training steps and compute what the
eager layers compute; frozen layers, evaluation and generation stay eager. ``model.compile=auto``: layers on CUDA,
none elsewhere and where layers would be refused."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from test_models import loss_and_grads, one_image_conversation, qlora_with_live_adapters

from vlm.build.model import run_frozen_parts_forward_only
from vlm.models.checkpointing import enable_checkpointing
from vlm.models.compiling import (
    CompileChoice,
    check_compile,
    compile_layers,
    frozen_repeated_blocks,
    resolve_compile,
    trainable_decoder_layers,
)
from vlm.models.families import get_family
from vlm.models.loading import load_model, load_processor
from vlm.quant.config import QuantConfig


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles anew, and counts its own graph breaks."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


# The compiled and the eager layers are compared in fp32, where they differ only by the order of fp32 sums. In
# bf16, where inductor rounds a fused chain of ops depends on the torch release and on the CPU's instruction set.
LOSS_TOLERANCE = {"rtol": 1e-6, "atol": 1e-6}
GRAD_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}  # the grads reach 0.3; a bf16 rounding would be 1e-3


def _model(tiny_checkpoint, model_type: str, checkpointing: str = "standard"):
    """A tiny fp32 QLoRA model as the build makes it, with non-zero LoRA B so that every LoRA grad is non-zero."""
    family = get_family(model_type)
    path = tiny_checkpoint(model_type)
    model = qlora_with_live_adapters(path, family, QuantConfig(compute_dtype="float32"))
    run_frozen_parts_forward_only(model, family)
    enable_checkpointing(model, checkpointing)
    return model.train(), one_image_conversation(load_processor(path, family))


def _compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("checkpointing", ["standard", "offload"])
def test_compiled_layers_train_as_the_eager_layers_do_and_evaluation_runs_the_eager_ones(tiny_checkpoint, checkpointing,
                                                                                        one_cpu_thread):
    """Mllama (self- and cross-attention layers), each layer recomputed in the backward: inside the compiled program
    (standard), or by the eager checkpoint that sends its input to host memory (offload)."""
    from torch._dynamo.utils import counters

    eager, batch = _model(tiny_checkpoint, "mllama")
    expected_loss, expected_grads = loss_and_grads(eager, batch)
    model, _ = _model(tiny_checkpoint, "mllama")
    offloader = enable_checkpointing(model, checkpointing)
    if offloader is not None:
        offloader.min_bytes = 0  # the tiny model's inputs are a few KB
    compiled = compile_layers(model, offloader)
    assert compiled.trainable == len(trainable_decoder_layers(model)) > 0
    assert compiled.frozen > 0 and compiled.traced_4bit > 0  # the vision tower's blocks, every NF4 linear
    graphs, before = [], _compiled_graphs()
    for step in range(2):  # the first step compiles, the second runs what was compiled
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            loss, grads = loss_and_grads(model, batch)
        graphs.append(_compiled_graphs() - before)
        torch.testing.assert_close(loss, expected_loss, **LOSS_TOLERANCE)
        assert grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, **GRAD_TOLERANCE, msg=name)
    # Compiled whole, not run eagerly around a break, and once: the second step compiled nothing.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[0] == graphs[1] > 0
    assert graphs[0] < compiled.trainable + compiled.frozen  # layers of one class share their programs
    if offloader is not None:  # the hooks saw each layer's input, once a step, and nothing the programs keep
        assert offloader.counts.offloaded == 2 * compiled.trainable
        assert not offloader.waiting()
    # The compiled programs dequantize with our operator (on the CPU it compiles into the layer's program):
    # bitsandbytes runs only the 4-bit layers outside them (the projector), each once, forward only.
    called = [event.name for event in profile.events()]
    outside = [m for m in model.modules() if type(m) is bnb.nn.Linear4bit]
    assert called.count("bitsandbytes::gemm_4bit") == len(outside) == 1

    model.eval()
    eager.eval()
    with torch.no_grad():
        logits, expected = model(**batch).logits, eager(**batch).logits
    assert _compiled_graphs() - before == graphs[-1]  # nothing more compiled: the eager layers ran
    assert torch.equal(logits, expected)  # the same eager layers and weights: no optimizer step ran


# One family for each kind of trainable decoder layer but Mllama's (the test above): LLaVA-NeXT, SmolVLM and Idefics3
# train Llama's layers as LLaVA does, and Qwen2.5-VL's layers are Qwen2-VL's code under another name.
ONE_FAMILY_PER_DECODER_LAYER = ("llava", "gemma3", "qwen2_vl", "qwen3_vl")


@pytest.mark.parametrize("model_type", ONE_FAMILY_PER_DECODER_LAYER)
def test_each_decoder_layer_class_runs_as_its_compiled_program(tiny_checkpoint, model_type, one_cpu_thread):
    """Whatever Python state a family's layers touch (Transformers' output capture, the ``kernels`` package's
    variables), each checkpointed trainable layer runs whole as its compiled program, computing what the eager
    layer computes: had TorchDynamo broken inside one, the checkpoint would have run the layer eagerly, and
    bitsandbytes would have run its NF4 linears. The frozen blocks compile whole too."""
    from torch._dynamo.utils import counters

    eager, batch = _model(tiny_checkpoint, model_type)
    expected_loss, _ = loss_and_grads(eager, batch)
    model, _ = _model(tiny_checkpoint, model_type)
    compiled = compile_layers(model)
    loss_and_grads(model, batch)  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        loss, _ = loss_and_grads(model, batch)
    torch.testing.assert_close(loss, expected_loss, **LOSS_TOLERANCE)
    inside = {id(m) for layer in trainable_decoder_layers(model) for m in layer.modules()}
    outside_layers = [m for m in model.modules() if type(m) is bnb.nn.Linear4bit and id(m) not in inside]
    called = [event.name for event in profile.events()].count("bitsandbytes::gemm_4bit")
    assert compiled.trainable > 0 and called == len(outside_layers)
    # Nor did the frozen towers' blocks break into pieces (Qwen's split their attention by lengths read off a tensor).
    assert not counters["graph_break"], list(counters["graph_break"])


def test_a_compiled_layer_without_a_checkpoint_keeps_no_16_bit_copy_of_its_weights_for_the_backward(tiny_checkpoint,
                                                                                                   one_cpu_thread):
    """``model.checkpointing=none``: the layer keeps its activations, and its backward dequantizes each NF4 weight
    again, as the eager layer does; merged with the forward's, every weight would be kept dequantized for the
    backward, 0.4 GB a layer at a 7B model's widths."""
    model, batch = _model(tiny_checkpoint, "llava", checkpointing="none")
    _, expected_grads = loss_and_grads(model, batch)
    compile_layers(model)
    weight_shapes = {tuple(int(n) for n in m.weight.quant_state.shape) for m in model.modules()
                     if isinstance(m, bnb.nn.Linear4bit)}
    kept_shapes = []

    def pack(tensor):
        if tensor.is_floating_point():
            kept_shapes.append(tuple(tensor.shape))
        return tensor

    loss_and_grads(model, batch)  # compiles
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, grads = loss_and_grads(model, batch)
    assert kept_shapes and weight_shapes and not weight_shapes & set(kept_shapes)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, **GRAD_TOLERANCE, msg=name)


def test_a_layer_whose_checkpoint_cannot_compile_runs_eagerly_and_says_so():
    """TorchDynamo gives a checkpoint up at any break inside it, and runs the layer eagerly: right, but at several
    times the host time, which the run would otherwise not show."""
    from vlm.models.compiling import _compiled_checkpoint

    class Layer(torch.nn.Module):
        def forward(self, x):
            x = torch.sin(x)
            torch._dynamo.graph_break()  # as a ContextVar read or an unsupported call inside a layer would
            return x * 2

    layer, x = Layer(), torch.randn(4, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"broke inside the checkpoint of .*Layer\.forward .*runs eagerly"):
        y = _compiled_checkpoint()(layer.forward, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * torch.cos(x.detach()))


def test_a_frozen_block_that_does_not_compile_runs_eagerly_from_then_on_and_says_so(monkeypatch):
    from vlm.models import compiling

    calls = []

    def failing_compile(function):
        def program(*args, **kwargs):
            calls.append("compiled")
            raise RuntimeError("the backend could not lower this\nsecond line")
        return program

    monkeypatch.setattr(compiling.torch, "compile", failing_compile)
    block = torch.nn.Linear(4, 4).requires_grad_(False).train()
    compiling._compile_frozen_block(block)
    x = torch.randn(2, 4)
    with pytest.warns(RuntimeWarning, match=r"Linear of the frozen tower did not compile \(RuntimeError: the backend "
                                            r"could not lower this\); it runs eagerly"):
        first = block(x)
    second = block(x)
    torch.testing.assert_close(first, x @ block.weight.T + block.bias)
    torch.testing.assert_close(second, first)
    assert calls == ["compiled"]  # tried once, not at every call


def _bytes_kept_for_the_backward(model, batch) -> int:
    """The bytes that one training step keeps for its backward, other than weights, the decoder layers' inputs and
    random-number states (which an eager checkpoint keeps too): what saved-tensor hooks around the whole step see,
    each storage once."""
    from torch.utils._pytree import tree_leaves

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    states = [getattr(getattr(m, "weight", None), "quant_state", None) for m in model.modules()]
    while states:  # the 4-bit weights' states and the states nested in them (double quantization)
        state = states.pop()
        if state is not None:
            weights |= {t.untyped_storage().data_ptr() for t in vars(state).values() if torch.is_tensor(t)}
            states.extend(v for v in vars(state).values() if type(v) is type(state))
    layer_inputs: set[int] = set()

    def note_inputs(module, args, kwargs):
        layer_inputs.update(t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if torch.is_tensor(t))

    hooks = [layer.register_forward_pre_hook(note_inputs, with_kwargs=True) for layer in trainable_decoder_layers(model)]
    kept: dict[int, int] = {}
    rng_state = torch.get_rng_state()  # each checkpoint keeps one, to replay the layer's randomness

    def pack(tensor):
        if not (tensor.dtype == rng_state.dtype and tensor.shape == rng_state.shape):
            kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_and_grads(model, batch)
    for hook in hooks:
        hook.remove()
    left_out = weights | layer_inputs
    return sum(size for pointer, size in kept.items() if pointer not in left_out)


def test_compiled_checkpointed_layers_keep_no_more_for_the_backward_than_the_eager_checkpoint(tiny_checkpoint,
                                                                                            one_cpu_thread):
    """Each compiled layer keeps its inputs and recomputes the rest, as the eager checkpoint does: a program that kept
    its products' outputs instead would be faster and hold every layer's activations (6 GB at 2048 tokens on an 11B
    model)."""
    eager, batch = _model(tiny_checkpoint, "mllama")
    expected = _bytes_kept_for_the_backward(eager, batch)
    model, _ = _model(tiny_checkpoint, "mllama")
    compile_layers(model)
    _bytes_kept_for_the_backward(model, batch)  # the first step compiles
    assert 0 < _bytes_kept_for_the_backward(model, batch) <= expected


def test_trainable_layers_compile_for_training_and_the_frozen_towers_blocks_for_their_forward(tiny_checkpoint):
    """Qwen2-VL: its frozen vision blocks are checkpointed layers too, but they are compiled as frozen blocks."""
    model, _ = _model(tiny_checkpoint, "qwen2_vl")
    trainable = trainable_decoder_layers(model)
    eager_checkpoints = [layer._gradient_checkpointing_func for layer in trainable]
    compiled = compile_layers(model)
    blocks = frozen_repeated_blocks(model, trainable)
    tower = model.get_base_model().get_submodule(get_family("qwen2_vl").vision_tower)
    in_tower = {id(m) for m in tower.modules()}
    assert (compiled.trainable, compiled.frozen) == (len(trainable), len(blocks))
    assert trainable and all(id(layer) not in in_tower for layer in trainable)
    assert blocks and all(id(block) in in_tower for block in blocks)
    # The trainable layers are checkpointed: each runs with its checkpoint as one compiled program, which they share.
    checkpoints = {layer._gradient_checkpointing_func for layer in trainable}
    assert len(checkpoints) == 1 and not checkpoints & set(eager_checkpoints)
    assert all("forward" in vars(block) for block in blocks)

    # The NF4 linears inside the compiled modules, and only those, are traced.
    inside = {id(m) for module in trainable + blocks for m in module.modules() if isinstance(m, bnb.nn.Linear4bit)}
    traced = {id(m) for m in model.modules() if type(m).__name__ == "TraceableLinear4bit"}
    assert traced == inside and len(traced) == compiled.traced_4bit > 0


def test_a_model_without_trainable_decoder_layers_is_refused(tiny_checkpoint):
    family = get_family("qwen2_vl")
    model, _ = load_model(tiny_checkpoint("qwen2_vl"), family, QuantConfig())
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no decoder layer with a trainable weight"):
        compile_layers(model)


def test_compile_values_are_checked():
    assert [check_compile(mode) for mode in ("none", "layers", "auto")] == ["none", "layers", "auto"]
    with pytest.raises(ValueError, match=r"model\.compile='fast' must be one of none, layers, auto"):
        check_compile("fast")
    with pytest.raises(ValueError, match=r"model\.compile='fast' must be one of none, layers, auto"):
        resolve_compile("fast", "cuda")


def test_auto_compiles_the_layers_on_cuda_and_nothing_on_any_other_device():
    for device in ("cuda", "cuda:1"):
        assert resolve_compile("auto", device) == CompileChoice("auto", "layers", "CUDA")
    for device in ("cpu", "mps"):
        assert resolve_compile("auto", device).mode == "none"
    assert resolve_compile("auto", "cpu").summary() == "auto → none (not CUDA)"


def test_auto_compiles_nothing_where_layers_would_be_refused():
    """Under FSDP, and with our kernels patched inside the layers; the loss kernel, outside them, leaves it on."""
    assert resolve_compile("auto", "cuda", sharded=True).summary() == "auto → none (FSDP)"
    inside = resolve_compile("auto", "cuda", ["rms_norm", "cross_entropy", "lora"])
    assert inside.mode == "none" and inside.summary() == "auto → none (kernels inside the layers: rms_norm, lora)"
    assert resolve_compile("auto", "cuda", ["cross_entropy"]).mode == "layers"


def test_an_explicit_compile_mode_is_what_runs_on_every_device():
    """``layers`` is refused where it cannot work by the config checks and the build, not changed here."""
    for device in ("cuda", "cpu"):
        assert resolve_compile("none", device) == CompileChoice("none", "none")
        assert resolve_compile("layers", device, ["rms_norm"], sharded=True) == CompileChoice("layers", "layers")
    assert resolve_compile("layers", "cpu").summary() == "layers"


def test_offloaded_checkpointing_needs_the_layers_checkpointed_first(tiny_checkpoint):
    from vlm.models.checkpointing import ActivationOffloader

    model, _ = _model(tiny_checkpoint, "qwen2_vl", checkpointing="none")
    with pytest.raises(ValueError, match="is not checkpointed"):
        compile_layers(model, ActivationOffloader())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_compiled_checkpointed_layer_holds_one_16_bit_weight_at_a_time_in_its_backward(tmp_path):
    """The backward of a compiled checkpointed QLoRA layer peaks no higher than the eager checkpoint's, which
    dequantizes each weight for its product alone. Had the program one 16-bit copy of each weight serve both the
    recomputed forward and the input grad, a layer's 7 weights (128 MB here, against 4 MB activations) would be
    alive together through its backward."""
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, device_map={"": "cuda"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")).train()
    enable_checkpointing(model, "standard")
    ids = torch.randint(0, 256, (1, 256), device="cuda")
    layer_input_bytes = ids.numel() * config.hidden_size * 2

    def backward_peak() -> int:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        loss.backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    backward_peak()
    eager = backward_peak()
    assert compile_layers(model).traced_4bit == 7 * config.num_hidden_layers
    backward_peak()  # compiles
    compiled = backward_peak()
    assert compiled <= eager + layer_input_bytes, (compiled, eager)
