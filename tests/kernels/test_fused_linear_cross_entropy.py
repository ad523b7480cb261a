"""fused_linear_cross_entropy: LM head + cross-entropy without the full logits, against a float64 reference."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from vlm.kernels.fused_linear_cross_entropy import (
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)

# atol is relative to the largest magnitude of the expected tensor (a mean's gradients are ~1/tokens):
# a few units in the last place of each dtype, the logits being rounded to it before the softmax.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
}
DTYPES = list(TOLERANCES)
IGNORE = -100
LLAMA3_VOCAB = 128256
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_matches(actual, expected, dtype):
    tolerance = TOLERANCES[dtype]
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(
        actual.double(), expected.double(), atol=tolerance["atol"] * max(scale, 1e-30), rtol=tolerance["rtol"]
    )


def make_inputs(num_tokens, hidden_size, vocab_size, dtype, *, with_bias=True, ignore_every=4, seed=0, device=DEVICE):
    """Random hidden [N, H], weight [V, H] with logits of order 1, bias [V], labels with every
    ``ignore_every``-th token ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=generator)
    weight = torch.randn(vocab_size, hidden_size, generator=generator) / hidden_size**0.5
    bias = torch.randn(vocab_size, generator=generator) if with_bias else None
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    if ignore_every:
        labels[::ignore_every] = IGNORE
    inputs = dict(hidden=hidden, weight=weight, bias=bias, labels=labels)
    return {
        name: None if t is None else t.to(device=device, dtype=t.dtype if name == "labels" else dtype)
        for name, t in inputs.items()
    }


def loss_and_grads(fn, inputs, dtype=None, **kwargs):
    """fn's loss and the gradients of every floating input, the inputs first cast to ``dtype``."""
    leaves = {
        name: t.detach().to(dtype or t.dtype).requires_grad_()
        for name, t in inputs.items()
        if t is not None and t.is_floating_point()
    }
    loss = fn(leaves["hidden"], leaves["weight"], inputs["labels"], bias=leaves.get("bias"), **kwargs)
    loss.backward()
    return loss.detach(), {name: t.grad for name, t in leaves.items()}


def assert_op_matches_float64_reference(inputs, dtype, **kwargs):
    reference_kwargs = {k: v for k, v in kwargs.items() if k != "chunk_size"}
    loss, grads = loss_and_grads(fused_linear_cross_entropy, inputs, **kwargs)
    expected_loss, expected_grads = loss_and_grads(
        fused_linear_cross_entropy_reference, inputs, torch.float64, **reference_kwargs
    )
    assert loss.dtype == torch.float32
    assert_matches(loss, expected_loss, dtype)
    for name, expected in expected_grads.items():
        assert grads[name].dtype == dtype, name
        assert_matches(grads[name], expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "num_tokens, hidden_size, vocab_size, chunk_size",
    [
        (1, 32, 128, None),  # one token
        (37, 24, 1000, 8),  # non-power-of-two sizes, five chunks, the last one short
        (16, 64, 9000, 5),  # vocab wider than one kernel block
    ],
)
def test_loss_and_grads_match_float64_reference(dtype, reduction, num_tokens, hidden_size, vocab_size, chunk_size):
    ignore_every = 4 if num_tokens > 1 else 0
    inputs = make_inputs(num_tokens, hidden_size, vocab_size, dtype, ignore_every=ignore_every)
    assert_op_matches_float64_reference(inputs, dtype, reduction=reduction, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", DTYPES)
def test_llama3_vocab_with_few_tokens_matches_reference(dtype):
    inputs = make_inputs(3, 64, LLAMA3_VOCAB, dtype, ignore_every=3)
    assert_op_matches_float64_reference(inputs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_labels_ignored_gives_zero_loss_and_zero_grads_without_nan(dtype, reduction):
    inputs = make_inputs(6, 16, 50, dtype)
    inputs["labels"] = torch.full((6,), IGNORE).to(DEVICE)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, inputs, reduction=reduction)
    assert loss.item() == 0.0
    for name, grad in grads.items():
        assert torch.count_nonzero(grad) == 0, name
    expected_loss, _ = loss_and_grads(fused_linear_cross_entropy_reference, inputs, torch.float64, reduction=reduction)
    assert expected_loss.item() == 0.0


@pytest.mark.parametrize("dtype, logit_step", [(torch.float32, 64), (torch.bfloat16, 64), (torch.float16, 4)])
def test_extreme_logits_stay_finite_and_correct(dtype, logit_step):
    """Logits of order 1e3 (60 for fp16) that the dtype holds exactly (integer multiples of a power of
    two), so the comparison measures the log-sum-exp and not the rounding of the logits."""
    generator = torch.Generator().manual_seed(1)
    num_tokens, hidden_size, vocab_size = 12, 16, 300
    hidden = torch.randint(-3, 4, (num_tokens, hidden_size), generator=generator) * logit_step
    weight = torch.randint(-3, 4, (vocab_size, hidden_size), generator=generator)
    labels = torch.randint(0, vocab_size, (num_tokens,), generator=generator)
    labels[::5] = IGNORE
    inputs = dict(
        hidden=hidden.to(device=DEVICE, dtype=dtype),
        weight=weight.to(device=DEVICE, dtype=dtype),
        bias=None,
        labels=labels.to(DEVICE),
    )
    logits = hidden.double() @ weight.double().T
    assert logits.abs().max() > (1000 if logit_step == 64 else 60)

    loss, grads = loss_and_grads(fused_linear_cross_entropy, inputs, chunk_size=5)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    assert_op_matches_float64_reference(inputs, dtype, chunk_size=5)


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunk_size_does_not_change_the_result(chunk_size):
    inputs = make_inputs(10, 24, 200, torch.float32)
    loss, grads = loss_and_grads(fused_linear_cross_entropy, inputs, chunk_size=chunk_size)
    whole_loss, whole_grads = loss_and_grads(fused_linear_cross_entropy, inputs, chunk_size=10)
    assert_matches(loss, whole_loss, torch.float32)
    for name in grads:
        assert_matches(grads[name], whole_grads[name], torch.float32)


def test_leading_dimensions_are_flattened_like_the_reference():
    inputs = make_inputs(10, 24, 200, torch.float32)
    inputs["hidden"] = inputs["hidden"].reshape(2, 5, 24)
    inputs["labels"] = inputs["labels"].reshape(2, 5)
    assert_op_matches_float64_reference(inputs, torch.float32)


def test_frozen_head_gets_no_grad_and_hidden_grad_still_matches():
    """The QLoRA case: the LM head is frozen, only the hidden states need a gradient."""
    inputs = make_inputs(9, 24, 200, torch.bfloat16, with_bias=False)
    hidden = inputs["hidden"].clone().requires_grad_()
    weight = inputs["weight"]
    fused_linear_cross_entropy(hidden, weight, inputs["labels"]).backward()
    hidden64 = inputs["hidden"].double().requires_grad_()
    fused_linear_cross_entropy_reference(hidden64, weight.double(), inputs["labels"]).backward()
    assert weight.grad is None
    assert_matches(hidden.grad, hidden64.grad, torch.bfloat16)


def test_without_grad_mode_gives_the_same_loss():
    inputs = make_inputs(9, 24, 200, torch.float32)
    with_grad, _ = loss_and_grads(fused_linear_cross_entropy, inputs)
    with torch.no_grad():
        without_grad = fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"], inputs["bias"])
    assert_matches(without_grad, with_grad, torch.float32)


def test_backward_scales_the_grads_by_the_incoming_gradient():
    inputs = make_inputs(9, 24, 200, torch.float32)
    _, grads = loss_and_grads(fused_linear_cross_entropy, inputs)
    _, scaled_grads = loss_and_grads(lambda *a, **k: 3.0 * fused_linear_cross_entropy(*a, **k), inputs)
    for name in grads:
        assert_matches(scaled_grads[name], 3.0 * grads[name], torch.float32)


def test_a_second_backward_through_the_same_loss_is_refused():
    """The saved gradients are scaled in place by the first backward, so a second one would be wrong."""
    inputs = make_inputs(4, 8, 20, torch.float32)
    hidden = inputs["hidden"].requires_grad_()
    loss = fused_linear_cross_entropy(hidden, inputs["weight"], inputs["labels"])
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


def test_unknown_reduction_is_refused():
    inputs = make_inputs(4, 8, 20, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(inputs["hidden"], inputs["weight"], inputs["labels"], reduction="none")


def test_reference_matches_hugging_face_causal_lm_loss():
    """A tiny Llama's own loss (ForCausalLMLoss, which shifts the labels) equals the reference, and the
    fused op, on the final hidden states and lm_head with the labels shifted by the caller."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval().to(DEVICE)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 300, (2, 9), generator=generator).to(DEVICE)
    labels = input_ids.clone()
    labels[:, :3] = IGNORE
    with torch.no_grad():
        hf_loss = model(input_ids=input_ids, labels=labels).loss
        hidden = model.model(input_ids=input_ids).last_hidden_state
        shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
        reference = fused_linear_cross_entropy_reference(hidden, model.lm_head.weight, shifted)
        fused = fused_linear_cross_entropy(hidden, model.lm_head.weight, shifted, chunk_size=4)
    torch.testing.assert_close(reference, hf_loss)
    assert_matches(fused, hf_loss, torch.float32)


def _peak_bytes_of_forward_and_backward(fn, hidden, weight, labels):
    hidden.grad = None
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn(hidden, weight, labels).backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - baseline


@pytest.mark.gpu
def test_llama3_size_on_gpu_matches_fp32_reference_with_a_fraction_of_its_memory():
    """8192 tokens, hidden 4096, vocab 128256 in bf16: loss and grads against an fp32 reference; and in the
    QLoRA case (frozen head) the op's peak memory is under 1/8 of the reference's (~4 GB of fp32 logits)."""
    dtype, device = torch.bfloat16, "cuda"
    inputs = make_inputs(8192, 4096, LLAMA3_VOCAB, dtype, with_bias=False, ignore_every=8, device=device)
    inputs["weight"] = inputs["weight"] * (0.02 * 4096**0.5)  # the init scale of Llama's lm_head

    loss, grads = loss_and_grads(fused_linear_cross_entropy, inputs)
    expected_loss, expected_grads = loss_and_grads(fused_linear_cross_entropy_reference, inputs, torch.float32)
    assert_matches(loss, expected_loss, dtype)
    for name, expected in expected_grads.items():
        assert_matches(grads[name], expected, dtype)
    del grads, expected_grads

    hidden = inputs["hidden"].clone().requires_grad_()
    weight, labels = inputs["weight"], inputs["labels"]
    fused_peak = _peak_bytes_of_forward_and_backward(fused_linear_cross_entropy, hidden, weight, labels)
    reference_peak = _peak_bytes_of_forward_and_backward(fused_linear_cross_entropy_reference, hidden, weight, labels)
    assert fused_peak < reference_peak / 8, (fused_peak, reference_peak)
