"""Tiny checkpoints of each family, built from config and saved like a real one.

A tiny checkpoint directory holds the model (random init, safetensors), its tokenizer (trained
locally) and processor, so it loads back through ``from_pretrained`` exactly as a Hub checkpoint
does. Building is deterministic in the seed and skipped when the directory already holds the same
build.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
import transformers

from .families import ModelFamily

BUILD_STAMP = "vlm_tiny_build.json"

# Words every chat template uses; the tokenizer learns them besides the caller's corpus.
TEMPLATE_WORDS = ["USER:", "ASSISTANT:", "system", "user", "assistant", "You are a helpful assistant."]


def build_tiny_checkpoint(
    family: ModelFamily,
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    seed: int = 0,
    vocab_size: int = 512,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write a tiny random-init checkpoint of ``family`` with its processor to ``out_dir``.

    ``corpus`` is the text the tokenizer is trained on (e.g. the demo data set's vocabulary).
    Returns the directory. If it already holds a build with the same family, sizes, seed and
    corpus, nothing is rebuilt.
    """
    out_dir = Path(out_dir)
    corpus = list(corpus) + TEMPLATE_WORDS
    stamp = {
        "model_type": family.model_type,
        "tiny": family.tiny.__dict__,
        "seed": seed,
        "vocab_size": vocab_size,
        "dtype": str(dtype),
        "transformers": transformers.__version__,
        "corpus_size": len(corpus),
        "corpus_hash": _stable_hash(corpus),
        "builder": 3,  # bump when the build itself changes
    }
    stamp_path = out_dir / BUILD_STAMP
    if stamp_path.exists() and json.loads(stamp_path.read_text()) == stamp:
        return out_dir

    from .tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(
        corpus,
        family.tiny_special_tokens(),
        vocab_size=vocab_size,
        bos_token=family.tiny_bos,
        eos_token=family.tiny_eos,
        pad_token=family.tiny_pad,
        chat_template=family.tiny_chat_template,
    )
    token_ids = {token: tokenizer.convert_tokens_to_ids(token) for token in family.tiny_special_tokens()}
    processor = family.tiny_processor(tokenizer)
    config = family.tiny_config(token_ids, vocab_size=_round_up(len(tokenizer), 64))
    # The family's defaults point at the real vocabulary; point them at the tiny one.
    for part in (config, getattr(config, "text_config", None)):
        if part is not None:
            part.bos_token_id = token_ids.get(family.tiny_bos) if family.tiny_bos else None
            part.eos_token_id = token_ids[family.tiny_eos]
            part.pad_token_id = token_ids[family.tiny_pad]

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.model_class(config)
    family.finish_tiny_init(model)
    model = model.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    stamp_path.write_text(json.dumps(stamp, indent=2))
    return out_dir


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _stable_hash(texts: list[str]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
