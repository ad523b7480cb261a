"""One whole training step of a full-size Llama-3.2-11B-Vision, built as ``vlm-train`` builds it.

Random-init weights (the 11B architecture, images of 4 tiles at 560 px) and a locally built
processor, saved once to ``--model-dir`` and loaded through ``from_pretrained``; then
``vlm.build.model.build_model`` (NF4, LoRA r16 on the language model, the kernels asked for,
gradient checkpointing), 8-bit AdamW, bf16 autocast, batch 1 with one image. Prints one ``RESULT``
JSON line: the median step after two warm-up steps, tokens/s and peak allocated memory.

    python scripts/bench_step.py --kernels none --frozen-parts on --tokens 2048

Run each setting in its own process: peak memory is per process. Results go in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def ensure_model_dir(path: Path) -> Path:
    """The random-init 11B checkpoint and a word-level processor, built on first use."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    if not (path / "config.json").exists():
        config = MllamaConfig()  # its defaults are the 11B architecture
        config.vision_config.image_size = 560
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = MllamaForConditionalGeneration(config)
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    if not (path / "tokenizer.json").exists():
        save_processor(path)
    return path


def save_processor(path: Path) -> None:
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


def random_batch(config, tokens: int) -> dict[str, torch.Tensor]:
    """``tokens`` random ids with one image token, and one random image of 4 tiles."""
    size = config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.text_config.vocab_size - 1, (1, tokens), generator=generator)
    ids[:, 1] = config.image_token_index
    labels = ids.clone()
    labels[:, :2] = -100
    return {
        "input_ids": ids.cuda(),
        "labels": labels.cuda(),
        "pixel_values": torch.randn(1, 1, 4, 3, size, size, generator=generator).to("cuda", torch.bfloat16),
        "aspect_ratio_ids": torch.tensor([[6]], device="cuda"),
        "aspect_ratio_mask": torch.tensor([[[1, 1, 1, 1]]], device="cuda"),
        "cross_attention_mask": torch.ones(1, tokens, 1, 4, dtype=torch.long, device="cuda"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", choices=("none", "all"), default="none")
    parser.add_argument("--frozen-parts", choices=("on", "off"), default="on", help="BuildSteps.frozen_parts_forward_only")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/mllama11b"))
    args = parser.parse_args()

    from vlm.build.model import BuildSteps, ModelRecipe, build_model
    from vlm.build.planning import plan_checkpoint
    from vlm.models.families import get_family
    from vlm.models.lora import LoraSettings
    from vlm.patching import KERNELS, KernelSettings
    from vlm.quant.calibrate import CalibrationSettings
    from vlm.quant.config import QuantConfig
    from vlm.training.optim import adamw

    path = str(ensure_model_dir(args.model_dir))
    family, quant = get_family("mllama"), QuantConfig()
    planning = plan_checkpoint(path, family, quant, CalibrationSettings(measure=False), device="cuda")
    kernels = KernelSettings(**{name: args.kernels == "all" for name in KERNELS})
    recipe = ModelRecipe(path, family, quant, LoraSettings(r=16, alpha=16), kernels, device="cuda")
    torch.cuda.reset_peak_memory_stats()
    built = build_model(recipe, planning, BuildSteps(frozen_parts_forward_only=args.frozen_parts == "on"))
    print(built.summary(), flush=True)
    model = built.model.train()
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    batch = random_batch(model.config, args.tokens)

    times, loss = [], None
    for _ in range(args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step = statistics.median(times[2:])
    print("RESULT", json.dumps({
        "kernels": args.kernels, "frozen_parts": args.frozen_parts, "tokens": args.tokens, "step_s": round(step, 3),
        "tokens_per_s": round(args.tokens / step), "peak_allocated_GB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "loss": round(float(loss), 4), "times": [round(t, 3) for t in times],
    }), flush=True)


if __name__ == "__main__":
    main()
