"""Tokenizers built locally: the tiny models need one without downloading anything."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def train_bpe_tokenizer(
    corpus: Iterable[str],
    special_tokens: list[str],
    *,
    vocab_size: int = 512,
    bos_token: str | None,
    eos_token: str,
    pad_token: str,
    chat_template: str,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``.

    Byte-level, so any text encodes (unseen words fall back to byte tokens) and offsets map back to
    characters, which label masking relies on. Special tokens get the lowest ids, in the given order.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        padding_side="right",
    )
    wrapped.chat_template = chat_template
    return wrapped
