"""The work a benchmark times: a random-init full-size checkpoint saved with a locally built processor,
and one batch of it, the same for every recipe.

Weight values change neither time nor memory, so a random-init model costs what the real checkpoint
does. ``smoke`` work is the family's tiny variant on the CPU, so that the benchmark's code path is
tested where no GPU is.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The image every family but Mllama benchmarks with: a 4:3 photo, as large as a phone's preview.
BENCH_IMAGE_SIZE = (1024, 768)
SMOKE_IMAGE_SIZE = (64, 48)
# Words the benchmark tokenizer knows; the text of a batch is the filler word repeated.
FILLER = "w"


# What the reference measurements of each family used (the seeds' settings): its image, sequences a
# step, and LoRA (rank, and the language model's linears it adapts).
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FamilyWork:
    image_size: tuple[int, int] = BENCH_IMAGE_SIZE
    batch_size: int = 1
    lora_r: int = 16
    lora_targets: tuple[str, ...] = LM_LINEARS


FAMILY_WORK = {
    "qwen2_vl": FamilyWork(image_size=(448, 448)),  # 256 image tokens
    "qwen2_5_vl": FamilyWork(image_size=(448, 448)),
    "llava": FamilyWork(image_size=(336, 336), batch_size=2, lora_r=64, lora_targets=LM_LINEARS[:4]),
}


def family_work(family: str) -> FamilyWork:
    return FAMILY_WORK.get(family, FamilyWork())


@dataclass(frozen=True)
class BenchWork:
    """What every recipe trains on: ``family``'s full-size architecture (or tiny variant where
    ``smoke``), ``batch_size`` sequences of ``tokens`` tokens with one image each."""

    family: str = "mllama"
    tokens: int = 2048
    batch_size: int = 1
    smoke: bool = False
    model_dir: str | None = None

    @property
    def setting(self) -> FamilyWork:
        return family_work(self.family)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def checkpoint_dir(self) -> Path:
        if self.model_dir:
            return Path(self.model_dir)
        name = f"vlm-bench-{self.family}" + ("-tiny" if self.smoke else "")
        return Path(tempfile.gettempdir()) / name


def ensure_checkpoint(work: BenchWork) -> Path:
    """The checkpoint directory of ``work``, built on first use."""
    from vlm.models.families import get_family

    family = get_family(work.family)
    path = work.checkpoint_dir()
    if work.smoke:
        from vlm.data.demo import DEMO_VOCABULARY
        from vlm.models.tiny import build_tiny_checkpoint

        return build_tiny_checkpoint(family, path, DEMO_VOCABULARY)
    if work.family == "mllama":
        return ensure_mllama_dir(path)
    if getattr(family, "full_size_config", None) is None:
        raise SystemExit(f"--family {work.family}: no full-size architecture is described for this family yet")
    return ensure_family_dir(family, path)


def make_batch(work: BenchWork, checkpoint: Path) -> dict[str, torch.Tensor]:
    """The batch of ``work`` on its device (Mllama full size: random ids and 4 random tiles at 560 px,
    as the peers' reference measured; otherwise the family's processor on a random image)."""
    from vlm.models.families import get_family
    from vlm.models.loading import load_config, load_processor

    family = get_family(work.family)
    if work.family == "mllama" and not work.smoke:
        batch = mllama_batch(load_config(str(checkpoint), family), work.tokens)
    else:
        size = SMOKE_IMAGE_SIZE if work.smoke else work.setting.image_size
        batch = family_batch(load_processor(str(checkpoint), family), work.tokens, size)
    batch = {key: value.repeat(work.batch_size, *([1] * (value.dim() - 1))) for key, value in batch.items()}
    return {key: value.to(work.device) for key, value in batch.items()}


# --------------------------------------------------------------------------- Mllama, as the peers measured it
def ensure_mllama_dir(path: Path) -> Path:
    """The random-init 11B checkpoint and a word-level processor, built on first use."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    if not (path / "config.json").exists():
        config = MllamaConfig()  # its defaults are the 11B architecture
        config.vision_config.image_size = 560
        save_random_init(MllamaForConditionalGeneration, config, path)
    if not (path / "tokenizer.json").exists():
        save_mllama_processor(path)
    return path


def save_random_init(model_class: type, config: Any, path: Path, finish: Callable[[Any], None] | None = None) -> None:
    """``model_class(config)`` with seeded random bf16 weights, built on the GPU, saved to ``path``;
    ``finish`` changes the model before it is saved."""
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = model_class(config)
    torch.set_default_dtype(torch.float32)
    if finish is not None:
        finish(model)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()


def save_mllama_processor(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import MllamaImageProcessor, MllamaProcessor, PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|image|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>", "<|finetune_right_pad_id|>"]
    words = specials + [f"w{i}" for i in range(1000)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|finetune_right_pad_id|>", model_max_length=131072)
    fast.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    template = ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
                "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% else %}{{ c['text'] }}"
                "{% endif %}{% endfor %}<|eot_id|>{% endfor %}")
    MllamaProcessor(image_processor=MllamaImageProcessor(), tokenizer=fast, chat_template=template).save_pretrained(path)


def mllama_batch(config: Any, tokens: int) -> dict[str, torch.Tensor]:
    """``tokens`` random ids with one image token, and one random image of 4 tiles."""
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.text_config.vocab_size - 1, (1, tokens), generator=generator)
    ids[:, 1] = config.image_token_index
    labels = ids.clone()
    labels[:, :2] = -100
    return {
        "input_ids": ids,
        "labels": labels,
        "pixel_values": torch.randn(1, 1, 4, 3, size, size, generator=generator).to(torch.bfloat16),
        "aspect_ratio_ids": torch.tensor([[6]]),
        "aspect_ratio_mask": torch.tensor([[[1, 1, 1, 1]]]),
        "cross_attention_mask": torch.ones(1, tokens, 1, 4, dtype=torch.long),
    }


# --------------------------------------------------------------------------- the other families
def full_size_parts(family: Any) -> tuple[Any, Any]:
    """The full-size processor of ``family`` around a small BPE tokenizer, and the model config with the
    tokenizer's special tokens (the model keeps the real vocabulary size; the tokenizer's ids are a part of it)."""
    from vlm.models.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(
        [f"{FILLER} " * 8, "user assistant model system"], family.tiny_special_tokens(), vocab_size=512,
        bos_token=family.tiny_bos, eos_token=family.tiny_eos, pad_token=family.tiny_pad,
        chat_template=family.tiny_chat_template,
    )
    processor = family.full_size_processor(tokenizer)
    token_ids = {token: processor.tokenizer.convert_tokens_to_ids(token) for token in family.tiny_special_tokens()}
    return processor, family.full_size_config(token_ids)


def ensure_family_dir(family: Any, path: Path) -> Path:
    """The random-init full-size checkpoint of ``family`` and its processor (:func:`full_size_parts`),
    built on first use."""
    if not (path / "config.json").exists():
        processor, config = full_size_parts(family)
        processor.save_pretrained(path)  # first: the model's config.json marks the directory complete
        save_random_init(family.model_class, config, path)
    return path


def family_batch(processor: Any, tokens: int, image_size: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One user turn of one random image and filler text, exactly ``tokens`` long, the filler supervised.

    The processor renders and expands the image as training does; filler tokens then fill the rest of
    every tensor along the sequence: ids and labels with the filler, the token-level masks with what text
    has there, any other (Mllama's cross-attention mask) with its last position's value.
    """
    from PIL import Image

    from vlm.data.encoding import IGNORE_INDEX, TOKEN_LEVEL_KEYS

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(image_size[1], image_size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": FILLER}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    out = processor(text=[text], images=[[Image.fromarray(pixels)]], return_tensors="pt")
    batch = {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}
    length = batch["input_ids"].shape[1]
    if length > tokens:
        raise SystemExit(f"--tokens {tokens}: the prompt with its image alone takes {length} tokens")
    filler = processor.tokenizer.convert_tokens_to_ids(processor.tokenizer.tokenize(f" {FILLER}")[0])
    batch["labels"] = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    extra = tokens - length
    for key, value in batch.items():
        if value.dim() < 2 or value.shape[1] != length:
            continue  # per-image tensors
        if key in TOKEN_LEVEL_KEYS:
            fill = {"input_ids": filler, "labels": filler, "attention_mask": 1}.get(key, 0)
            tail = value.new_full((1, extra, *value.shape[2:]), fill)
        else:
            tail = value[:, -1:].expand(1, extra, *value.shape[2:])
        batch[key] = torch.cat([value, tail], dim=1)
    return batch
