"""A tiny Llama loaded in 4-bit with LoRA: the smallest real QLoRA model, for the training tests."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from vlm.quant.bnb_layers import keep_cpu_weights_trainable

VOCAB = 128
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_LINEAR_4BIT = 2 * len(LORA_TARGETS)  # two decoder layers; lm_head stays bf16


def save_tiny_llama(path: Path) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,  # heads 64 wide and every width a multiple of 64, as in real checkpoints
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.1,  # the default 0.02 gives logits too flat to memorise a batch
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def load_4bit(path: Path) -> torch.nn.Module:
    """The saved tiny Llama in NF4, guarded as `vlm.models.loading.load_model` guards every model it loads."""
    model = LlamaForCausalLM.from_pretrained(
        path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map={"": "cpu"},
    )
    keep_cpu_weights_trainable(model)
    return model


def qlora_model(path: Path) -> torch.nn.Module:
    """A fresh 4-bit + LoRA tiny Llama: the same base weights and the same LoRA init every time."""
    torch.manual_seed(1)
    return get_peft_model(load_4bit(path), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS))


def make_batch(seed: int, batch: int = 2, seq: int = 16, prompt: int = 6, pad: int = 3) -> dict[str, torch.Tensor]:
    """Row 0 unpadded, row 1 right-padded by ``pad``; labels -100 on the prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    if batch > 1 and pad:
        attention_mask[1, seq - pad :] = 0
        input_ids[1, seq - pad :] = 0
    labels = input_ids.clone()
    labels[:, :prompt] = -100
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def loader(batches: list[dict[str, torch.Tensor]]) -> DataLoader:
    return DataLoader(list(batches), batch_size=None)


def cpu_trainer(tmp_path: Path, **kwargs):
    """A quiet CPU Trainer logging every step to a CSV log under ``tmp_path``; ``kwargs`` override."""
    import lightning
    from lightning.pytorch.loggers import CSVLogger

    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(tmp_path / "logs"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    settings.update(kwargs)
    return lightning.Trainer(**settings)
