"""`vlm-train` on a full-size Llama-3.2-11B-Vision on one GPU, once with ``trainer=fsdp`` and once
with ``trainer=ddp``: the whole command as a user runs it, on the demo data set.

The checkpoint is the 11B architecture with random weights (no download), saved once to
``--model-dir`` with a processor whose tokenizer is trained on the demo data's words, so that the
demo conversations encode as real text and the loss can fall. Each run trains ``--steps`` steps
(NF4, LoRA r16 on the language model, gradient checkpointing, bf16-mixed), validating twice; the
script prints, per strategy, the training and validation loss before and after, tokens per second
and peak GPU memory, writes them to ``--out/summary.json``, and exits with 1 unless every loss fell.

    python scripts/full_size_run.py --out /tmp/full-size

About 25 GB of disk for the checkpoint; on an H200 a few minutes in all, most of it writing and
loading the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def ensure_checkpoint(path: Path) -> Path:
    """The random-init 11B Mllama and a processor for the demo data, written on first use."""
    if (path / "config.json").is_file() and (path / "tokenizer.json").is_file():
        return path
    import transformers

    from vlm.bench.work import save_random_init
    from vlm.data.demo import DEMO_VOCABULARY
    from vlm.models.families import get_family
    from vlm.models.families.base import image_processor
    from vlm.models.tiny import TEMPLATE_WORDS
    from vlm.models.tokenizer import train_bpe_tokenizer

    family = get_family("mllama")
    tokenizer = train_bpe_tokenizer(
        [*DEMO_VOCABULARY, *TEMPLATE_WORDS], family.tiny_special_tokens(), vocab_size=512,
        bos_token=family.tiny_bos, eos_token=family.tiny_eos, pad_token=family.tiny_pad,
        chat_template=family.tiny_chat_template,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in family.tiny_special_tokens()}
    config = transformers.MllamaConfig()  # its defaults are the 11B architecture
    config.vision_config.image_size = 560
    config.image_token_index = ids[family.image_token]
    for part in (config, config.text_config):
        part.bos_token_id, part.eos_token_id, part.pad_token_id = ids[family.tiny_bos], ids[family.tiny_eos], ids[family.tiny_pad]
    # The cross-attention gates opened, as in a trained checkpoint.
    save_random_init(transformers.MllamaForConditionalGeneration, config, path, finish=family.finish_tiny_init)
    processor = transformers.MllamaProcessor(
        image_processor=image_processor("Mllama", size={"height": 560, "width": 560}, max_image_tiles=4),
        tokenizer=tokenizer,
        chat_template=family.tiny_chat_template,
    )
    processor.save_pretrained(path)
    return path


def train(checkpoint: Path, out: Path, strategy: str, steps: int) -> dict:
    """One ``vlm-train`` run; its metrics.json."""
    run = out / strategy
    command = [
        sys.executable, "-m", "vlm.cli.train",
        "model=llama32_vision_11b", f"model.checkpoint={checkpoint}",
        f"trainer={strategy}", "trainer.devices=1", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}", "trainer.limit_val_batches=4", "trainer.log_every_n_steps=1",
        "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=2", "optimizer.lr=1e-3",
        # The 16-bit model would load whole to measure each layer's quantization error: not what is measured here.
        "calibration.measure=false",
        "logger=csv", "callbacks=default", f"hydra.run.dir={run}", f"paths.cache_dir={out / 'cache'}",
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return json.loads((run / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/mllama11b-demo"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/full-size"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strategies", nargs="+", default=["fsdp", "ddp"], choices=["fsdp", "ddp", "gpu"])
    args = parser.parse_args()

    checkpoint = ensure_checkpoint(args.model_dir)
    rows = {}
    for strategy in args.strategies:
        m = train(checkpoint, args.out, strategy, args.steps)
        rows[strategy] = {key: m.get(key) for key in (
            "status", "first_train_loss", "last_train_loss", "initial_val_loss", "final_val_loss",
            "tokens_per_s", "peak_memory_bytes", "mean_step_time_s", "wall_time_s", "weight_bytes", "strategy")}
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"{'':6}{'train loss':>22}{'val loss':>22}{'tokens/s':>10}{'peak GiB':>10}")
    fell = True
    for strategy, r in rows.items():
        fell &= r["last_train_loss"] < r["first_train_loss"] and r["final_val_loss"] < r["initial_val_loss"]
        print(f"{strategy:6}{r['first_train_loss']:>10.4f} → {r['last_train_loss']:<9.4f}"
              f"{r['initial_val_loss']:>10.4f} → {r['final_val_loss']:<9.4f}"
              f"{r['tokens_per_s']:>10.0f}{r['peak_memory_bytes'] / 2**30:>10.2f}")
    print(f"RESULT {json.dumps(rows)}")
    sys.exit(0 if fell else 1)


if __name__ == "__main__":
    main()
