"""Padding collation of encoded samples (see :mod:`vlm.data.encoding`) into one batch.

Three kinds of tensors, told apart by name:

* token-level (``input_ids``, ``attention_mask``, ``labels``, ``mm_token_type_ids``,
  ``token_type_ids``; shaped ``[1, seq]``): padded to the longest sequence on ``padding_side``
  (``input_ids`` with the pad token, ``labels`` with -100, the rest with 0);
* batch-major image tensors (the family's ``batch_major_image_keys``, e.g. Mllama's
  ``pixel_values [1, n_images, n_tiles, C, H, W]``): every non-batch dimension is zero-padded
  to the batch's largest; a dimension 1 that runs along the sequence (Mllama's
  ``cross_attention_mask [1, seq, n_images, n_tiles]``) is padded on ``padding_side`` like the
  tokens. A sample without the key (a text-only sample) gets zeros, except in a mask over an
  image's tiles (``tile_mask_keys``, Mllama's ``aspect_ratio_mask``), where a padded image slot
  marks its first tile valid, as the processor does: the slot still runs through the vision
  encoder, and with no valid tile its attention has nothing to attend to;
* per-image tensors (everything else, stacked per image along dim 0, e.g. LLaVA-NeXT's
  ``pixel_values [n_images, n_patches, C, H, W]``): zero-padded in the non-leading dimensions and
  concatenated; samples without the key add nothing.

Dtypes are kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .encoding import TOKEN_LEVEL_KEYS


def collate(
    samples: Sequence[dict[str, torch.Tensor]],
    *,
    pad_token_id: int,
    batch_major_keys: frozenset[str],
    tile_mask_keys: frozenset[str] = frozenset(),
    padding_side: str = "right",
) -> dict[str, torch.Tensor]:
    """One batch from encoded samples (each with a batch dimension of 1)."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side={padding_side!r} must be 'right' or 'left'")
    for n, sample in enumerate(samples):
        if "input_ids" not in sample:
            raise KeyError(f"sample {n} of the batch has no 'input_ids'")
    lengths = [int(sample["input_ids"].shape[-1]) for sample in samples]
    longest = max(lengths)
    left = padding_side == "left"

    keys = list(dict.fromkeys(key for sample in samples for key in sample))
    batch: dict[str, torch.Tensor] = {}
    for key in keys:
        present = [(n, sample[key]) for n, sample in enumerate(samples) if key in sample]
        ndims = {value.dim() for _, value in present}
        if len(ndims) != 1:
            raise ValueError(f"{key!r} has different numbers of dimensions across the batch: {sorted(ndims)}")
        if key in TOKEN_LEVEL_KEYS:
            if len(present) != len(samples):
                raise KeyError(f"{key!r} is missing from some samples of the batch")
            value = TOKEN_LEVEL_KEYS[key]
            pad = pad_token_id if value is None else value
            batch[key] = torch.cat(
                [_pad(t, (t.shape[0], longest, *t.shape[2:]), pad, left_dims={1} if left else set()) for _, t in present]
            )
        elif key in batch_major_keys:
            batch[key] = _batch_major(key, present, samples, lengths, longest, left)
            if key in tile_mask_keys:
                _mark_first_tile_of_empty_slots(batch[key])
        else:
            target = _max_shape(t for _, t in present)
            batch[key] = torch.cat([_pad(t, (t.shape[0], *target[1:]), 0) for _, t in present])
    return batch


def _batch_major(
    key: str,
    present: list[tuple[int, torch.Tensor]],
    samples: Sequence[dict[str, torch.Tensor]],
    lengths: list[int],
    longest: int,
    left: bool,
) -> torch.Tensor:
    along_sequence = all(t.dim() >= 2 and t.shape[1] == lengths[n] for n, t in present)
    target = list(_max_shape(t for _, t in present))
    if along_sequence:
        target[1] = longest
    left_dims = {1} if along_sequence and left else set()
    reference = present[0][1]
    by_sample = dict(present)
    parts = []
    for n in range(len(samples)):
        t = by_sample.get(n)
        if t is None:
            parts.append(reference.new_zeros((reference.shape[0], *target[1:])))
        else:
            parts.append(_pad(t, (t.shape[0], *target[1:]), 0, left_dims=left_dims))
    return torch.cat(parts)


def _mark_first_tile_of_empty_slots(mask: torch.Tensor) -> None:
    """In a ``[batch, images, tiles]`` mask, image slots without any valid tile get their first one."""
    empty = mask.sum(dim=-1) == 0
    mask[..., 0][empty] = 1


def _max_shape(tensors) -> tuple[int, ...]:
    shapes = [tuple(t.shape) for t in tensors]
    return tuple(max(dims) for dims in zip(*shapes))


def _pad(t: torch.Tensor, shape: tuple[int, ...], value: int | float, left_dims: set[int] = frozenset()) -> torch.Tensor:
    """``t`` inside a tensor of ``shape`` filled with ``value``: padded before ``t`` along the dims in
    ``left_dims``, after it along the others."""
    if tuple(t.shape) == tuple(shape):
        return t
    out = t.new_full(shape, value)
    index = tuple(
        slice(size - own, size) if d in left_dims else slice(0, own)
        for d, (own, size) in enumerate(zip(t.shape, shape))
    )
    out[index] = t
    return out


__all__ = ["collate"]
