"""The RoPE kernel rotates q and k as Hugging Face's ``apply_rotary_pos_emb`` does (Llama-style, cos/sin
[batch, seq, head_dim]) and as Qwen2-VL's multimodal RoPE does (cos/sin [3, batch, seq, head_dim] recomposed
by ``mrope_section``), forward and backward, for fp32/bf16/fp16 and grouped-query attention."""

import pytest
import torch

from vlm.kernels.rope import (
    DEFAULT_ROPE_TILING,
    RopeTiling,
    apply_multimodal_rotary,
    apply_multimodal_rotary_reference,
    apply_rotary,
    apply_rotary_reference,
    select_mrope_sections,
)

# Against a float64 reference: the kernel computes in fp32 from exactly representable inputs and rounds once,
# so one unit in the last place of the output dtype relative, plus a floor for outputs near zero.
TOLERANCES = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.bfloat16: dict(atol=1e-5, rtol=2**-7),
    torch.float16: dict(atol=1e-5, rtol=2**-10),
}
DTYPES = list(TOLERANCES)
# The small cases run wherever Triton can: the interpreter on CPU, or the GPU when there is one.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_qk(batch, q_heads, k_heads, seq, head_dim, dtype, device, generator):
    q = torch.randn(batch, q_heads, seq, head_dim, generator=generator)
    k = torch.randn(batch, k_heads, seq, head_dim, generator=generator)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def _random_cos_sin(leading, seq, head_dim, dtype, device, generator):
    """Angles of any size per column (halves not duplicated, so the exact HF formula is what is tested)."""
    angle = 100 * torch.rand(*leading, seq, head_dim, generator=generator)
    return angle.cos().to(device=device, dtype=dtype), angle.sin().to(device=device, dtype=dtype)


def _assert_kernel_matches_float64_reference(kernel, reference, q, k, cos, sin, generator):
    dtype = q.dtype
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    q64, k64 = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)

    q_out, k_out = kernel(q, k, cos, sin)
    q_expected, k_expected = reference(q64, k64, cos.double(), sin.double())
    grad_q_out = torch.randn(q_out.shape, generator=generator).to(device=q.device, dtype=dtype)
    grad_k_out = torch.randn(k_out.shape, generator=generator).to(device=q.device, dtype=dtype)
    torch.autograd.backward((q_out, k_out), (grad_q_out, grad_k_out))
    torch.autograd.backward((q_expected, k_expected), (grad_q_out.double(), grad_k_out.double()))

    tolerance = TOLERANCES[dtype]
    for actual, expected in [(q_out, q_expected), (k_out, k_expected), (q.grad, q64.grad), (k.grad, k64.grad)]:
        assert actual.dtype == dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual.double(), expected, **tolerance)


def _check_standard(
    batch, q_heads, k_heads, seq, head_dim, dtype, device=DEVICE, cos_batch=None, tiling=DEFAULT_ROPE_TILING
):
    generator = torch.Generator().manual_seed(0)
    q, k = _random_qk(batch, q_heads, k_heads, seq, head_dim, dtype, device, generator)
    cos, sin = _random_cos_sin((batch if cos_batch is None else cos_batch,), seq, head_dim, dtype, device, generator)

    def kernel(q, k, cos, sin):
        return apply_rotary(q, k, cos, sin, tiling=tiling)

    _assert_kernel_matches_float64_reference(kernel, apply_rotary_reference, q, k, cos, sin, generator)


def _check_multimodal(
    batch, q_heads, k_heads, seq, head_dim, section, dtype, device=DEVICE, tiling=DEFAULT_ROPE_TILING
):
    generator = torch.Generator().manual_seed(0)
    q, k = _random_qk(batch, q_heads, k_heads, seq, head_dim, dtype, device, generator)
    cos, sin = _random_cos_sin((3, batch), seq, head_dim, dtype, device, generator)

    def kernel(q, k, cos, sin):
        return apply_multimodal_rotary(q, k, cos, sin, section, tiling=tiling)

    def reference(q, k, cos, sin):
        return apply_multimodal_rotary_reference(q, k, cos, sin, section)

    _assert_kernel_matches_float64_reference(kernel, reference, q, k, cos, sin, generator)


# --------------------------------------------------------------------------- the references are Hugging Face's


def _tiny_llama_cos_sin(head_dim, position_ids, dtype):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim)
    return LlamaRotaryEmbedding(config).to(DEVICE)(torch.zeros(1, dtype=dtype, device=DEVICE), position_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_hugging_face_apply_rotary_pos_emb(dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(0)
    q, k = _random_qk(2, 4, 2, 9, 64, dtype, DEVICE, generator)
    position_ids = torch.randint(0, 4096, (2, 9), generator=generator).to(DEVICE)
    cos, sin = _tiny_llama_cos_sin(64, position_ids, dtype)

    for actual, expected in zip(apply_rotary_reference(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)):
        assert torch.equal(actual, expected)


def _tiny_qwen2_vl_rotary(head_dim, section):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    rope_parameters = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section}
    config = Qwen2VLTextConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope_parameters
    )
    return Qwen2VLRotaryEmbedding(config).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multimodal_reference_is_hugging_face_qwen2_vl_rope(dtype):
    """transformers 5 recomposes the three streams inside ``Qwen2VLRotaryEmbedding`` and then applies the standard
    rotation; the reference takes the per-stream cos/sin [3, B, S, D] and must give the same q and k."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb

    head_dim, section = 32, [4, 6, 6]
    rotary = _tiny_qwen2_vl_rotary(head_dim, section)
    generator = torch.Generator().manual_seed(0)
    q, k = _random_qk(2, 4, 2, 9, head_dim, dtype, DEVICE, generator)
    position_ids = torch.randint(0, 4096, (3, 2, 9), generator=generator).to(DEVICE)  # temporal, height, width differ
    hf_cos, hf_sin = rotary(torch.zeros(1, dtype=dtype, device=DEVICE), position_ids)

    freqs = position_ids[..., None].float() * rotary.inv_freq
    angle = torch.cat([freqs, freqs], dim=-1)
    cos = (angle.cos() * rotary.attention_scaling).to(dtype)
    sin = (angle.sin() * rotary.attention_scaling).to(dtype)

    assert torch.equal(select_mrope_sections(cos, section), hf_cos)
    assert torch.equal(select_mrope_sections(sin, section), hf_sin)
    actual = apply_multimodal_rotary_reference(q, k, cos, sin, section)
    for actual_tensor, expected in zip(actual, apply_rotary_pos_emb(q, k, hf_cos, hf_sin)):
        assert torch.equal(actual_tensor, expected)


# --------------------------------------------------------------------------- kernel vs float64 reference


STANDARD_SHAPES = {
    "one_token": (1, 1, 1, 1, 64),
    "gqa_two_position_tiles": (2, 4, 2, 17, 128),
    "equal_heads": (1, 3, 3, 5, 64),
    "half_dim_not_power_of_two": (1, 2, 1, 7, 80),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(STANDARD_SHAPES.values()), ids=list(STANDARD_SHAPES))
def test_rotary_forward_and_grads_match_float64_reference(shape, dtype):
    _check_standard(*shape, dtype)


MULTIMODAL_SHAPES = {
    "one_token": (1, 1, 1, 1, 64, [8, 12, 12]),
    "qwen2_vl_sections_gqa": (2, 4, 2, 17, 128, [16, 24, 24]),
    "uneven_sections": (1, 2, 1, 6, 80, [4, 30, 6]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(MULTIMODAL_SHAPES.values()), ids=list(MULTIMODAL_SHAPES))
def test_multimodal_rotary_forward_and_grads_match_float64_reference(shape, dtype):
    _check_multimodal(*shape, dtype)


def test_cos_sin_shared_across_the_batch_are_broadcast():
    """Llama builds cos/sin from position_ids [1, seq] when none are given: batch 1 against q's batch 2."""
    _check_standard(2, 2, 1, 5, 64, torch.bfloat16, cos_batch=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_hugging_face_transposed_q_and_k_layout_is_read_in_place(dtype):
    """HF passes q/k as [B, S, H, D] memory viewed as [B, H, S, D]; the result keeps that layout."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 4, 64, generator=generator).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    k = torch.randn(2, 6, 2, 64, generator=generator).to(device=DEVICE, dtype=dtype).transpose(1, 2)
    cos, sin = _random_cos_sin((2,), 6, 64, dtype, DEVICE, generator)
    q_out, _ = apply_rotary(q, k, cos, sin)
    assert q_out.stride() == q.stride()
    _assert_kernel_matches_float64_reference(apply_rotary, apply_rotary_reference, q, k, cos, sin, generator)


def test_heads_split_over_several_programs():
    """More heads than one program rotates: full and partial groups of q heads and a partial group of k heads."""
    tiling = RopeTiling(heads_per_program=3)
    _check_standard(1, 4, 2, 5, 64, torch.float32, tiling=tiling)
    _check_multimodal(1, 4, 2, 5, 64, [8, 12, 12], torch.float32, tiling=tiling)


def test_positions_split_over_several_tiles():
    """A tile of 64 elements holds two positions of half head_dim 32: 5 positions take three tiles, the last ragged."""
    _check_standard(1, 2, 1, 5, 64, torch.float32, tiling=RopeTiling(tile_elements=64))


def test_cos_and_sin_get_no_gradient():
    generator = torch.Generator().manual_seed(0)
    q, k = _random_qk(1, 2, 1, 3, 64, torch.float32, DEVICE, generator)
    cos, sin = (t.requires_grad_(True) for t in _random_cos_sin((1,), 3, 64, torch.float32, DEVICE, generator))
    q_out, k_out = apply_rotary(q.requires_grad_(True), k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    assert q.grad is not None and cos.grad is None and sin.grad is None


def test_mrope_section_must_cover_half_the_head_dim():
    generator = torch.Generator().manual_seed(0)
    q, k = _random_qk(1, 2, 1, 3, 64, torch.float32, DEVICE, generator)
    cos, sin = _random_cos_sin((3, 1), 3, 64, torch.float32, DEVICE, generator)
    with pytest.raises(ValueError, match="mrope_section"):
        apply_multimodal_rotary(q, k, cos, sin, [16, 24, 24])


# --------------------------------------------------------------------------- real sizes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_real_sizes_on_gpu_match_float64_reference(dtype):
    _check_standard(1, 32, 8, 8192, 128, dtype, device="cuda")  # Llama-3 8B / Llama-3.2-11B-Vision text
    _check_multimodal(1, 28, 4, 4096, 128, [16, 24, 24], dtype, device="cuda")  # Qwen2-VL-7B
