"""`vlm-train` on a full-size Llama-3.2-11B-Vision on one GPU, once with ``trainer=fsdp`` and once
with ``trainer=ddp``: the whole command as a user runs it, on the demo data set. ``--architecture 90b``
does the same with the Llama-3.2-90B-Vision architecture, made directly in 4-bit (never whole in
16-bit: ``vlm.bench.quantized_init``), on ``--devices`` GPUs.

The checkpoint is the 11B architecture with random weights (no download), saved once to
``--model-dir`` with a processor whose tokenizer is trained on the demo data's words, so that the
demo conversations encode as real text and the loss can fall. Each run trains ``--steps`` steps
(NF4, LoRA r16 on the language model, gradient checkpointing, bf16-mixed), validating twice; the
script prints, per strategy, the training and validation loss before and after, tokens per second
and peak GPU memory, and the validation loss of the saved adapter read back by ``vlm-eval``; writes
them to ``--out/summary.json``, and exits with 1 unless every loss fell and the reloaded adapter scores
what the run validated.

    python scripts/full_size_run.py --out /tmp/full-size
    python scripts/full_size_run.py --architecture 90b --strategies fsdp --devices 2 --model-dir /tmp/mllama90b
    python scripts/full_size_run.py --strategies ddp --devices 1 2 kernels=all model.checkpointing=offload  # scaling

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


def mllama_90b_config():  # noqa: ANN201
    """Llama-3.2-90B-Vision: the 11B's vision tower, a language model of 100 layers 8192 wide (every fifth,
    from the fourth, a cross-attention layer); 88,566,075,963 parameters."""
    import transformers

    config = transformers.MllamaConfig()
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_attention_heads = 8192, 28672, 64
    text.num_hidden_layers, text.cross_attention_layers = 100, list(range(3, 100, 5))
    return config


def ensure_checkpoint(path: Path, architecture: str = "11b") -> Path:
    """The random-init Mllama of ``architecture`` and a processor for the demo data, written on first use."""
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
    config = transformers.MllamaConfig() if architecture == "11b" else mllama_90b_config()  # defaults: the 11B
    config.vision_config.image_size = 560
    config.image_token_index = ids[family.image_token]
    for part in (config, config.text_config):
        part.bos_token_id, part.eos_token_id, part.pad_token_id = ids[family.tiny_bos], ids[family.tiny_eos], ids[family.tiny_pad]
    # The cross-attention gates opened, as in a trained checkpoint.
    if architecture == "11b":
        save_random_init(transformers.MllamaForConditionalGeneration, config, path, finish=family.finish_tiny_init)
    else:
        from vlm.bench.quantized_init import save_random_init_4bit
        from vlm.quant.config import QuantConfig

        # Stored as FSDP shards it (packed weights in bf16 beside the bf16 ones); plain DDP reads that too.
        save_random_init_4bit(family, config, path, QuantConfig().for_strategy(shards_parameters=True),
                              finish=family.finish_tiny_init)
    processor = transformers.MllamaProcessor(
        image_processor=image_processor("Mllama", size={"height": 560, "width": 560}, max_image_tiles=4),
        tokenizer=tokenizer,
        chat_template=family.tiny_chat_template,
    )
    processor.save_pretrained(path)
    return path


VALIDATION_SAMPLES = 16  # trainer.limit_val_batches=4 batches of data.val_batch_size=4


def train(checkpoint: Path, run: Path, strategy: str, steps: int, devices: int = 1, overrides: tuple = ()) -> dict:
    """One ``vlm-train`` run into ``run``; its metrics.json."""
    command = [
        sys.executable, "-m", "vlm.cli.train",
        "model=llama32_vision_11b", f"model.checkpoint={checkpoint}",
        f"trainer={strategy}", f"trainer.devices={devices}", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps // 2}", "trainer.limit_val_batches=4", "trainer.log_every_n_steps=1",
        "data.batch_size=4", "data.val_batch_size=4", "data.num_workers=2", "optimizer.lr=1e-3",
        # The 16-bit model would load whole to measure each layer's quantization error: not what is measured here.
        "calibration.measure=false",
        "logger=csv", "callbacks=default", f"hydra.run.dir={run}", f"paths.cache_dir={run.parent / 'cache'}",
        *overrides,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "WANDB_MODE": "offline"})
    return json.loads((run / "metrics.json").read_text())


def reloaded_losses(run: Path, samples: int) -> dict:
    """The run's adapter read back from disk by ``vlm-eval`` and scored, with its base, on the first
    ``samples`` validation samples: what the run's last and first validation measured, if the adapter
    saved and reloads as it trained."""
    scores = run / "reloaded.json"
    command = [sys.executable, "-m", "vlm.cli.eval", str(run), "--base", "--no-answers", "--limit", str(samples),
               "--batch-size", "4", "--json", str(scores)]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    base, tuned = json.loads(scores.read_text())["rows"]
    return {"reloaded_val_loss": tuned["loss"], "reloaded_base_loss": base["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/mllama11b-demo"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/full-size"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strategies", nargs="+", default=["fsdp", "ddp"], choices=["fsdp", "ddp", "gpu"])
    parser.add_argument("--architecture", choices=["11b", "90b"], default="11b")
    parser.add_argument("--devices", type=int, nargs="+", default=[1],
                        help="GPUs per run (trainer.devices); several counts run one after another, and the "
                             "tokens/s of each is given against the fewest's")
    parser.add_argument("overrides", nargs="*", help="further vlm-train overrides, e.g. kernels=all")
    args = parser.parse_args()

    checkpoint = ensure_checkpoint(args.model_dir, args.architecture)
    rows = {}
    for strategy in args.strategies:
        for devices in args.devices:
            name = strategy if args.devices == [1] else f"{strategy}x{devices}"
            m = train(checkpoint, args.out / name, strategy, args.steps, devices, tuple(args.overrides))
            rows[name] = {key: m.get(key) for key in (
                "status", "first_train_loss", "last_train_loss", "initial_val_loss", "final_val_loss",
                "tokens_per_s", "peak_memory_bytes", "peak_memory_per_rank", "mean_step_time_s", "wall_time_s",
                "weight_bytes", "strategy")}
            rows[name]["devices"] = devices
            rows[name].update(reloaded_losses(args.out / name, VALIDATION_SAMPLES))
            fewest = rows[name if devices == args.devices[0] else f"{strategy}x{args.devices[0]}"]
            rows[name]["scaling"] = rows[name]["tokens_per_s"] / fewest["tokens_per_s"]
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    print(f"{'':9}{'train loss':>22}{'val loss':>22}{'reloaded':>10}{'tokens/s':>10}{'scaling':>9}{'peak GiB':>10}")
    fell = True
    for name, r in rows.items():
        fell &= r["last_train_loss"] < r["first_train_loss"] and r["final_val_loss"] < r["initial_val_loss"]
        # The adapter read back keeps what was learned; on one GPU it scores what the run validated (the
        # same samples; bf16: to a part in a hundred). On several, each rank validated shards of its own.
        fell &= r["reloaded_val_loss"] < r["reloaded_base_loss"]
        if r["devices"] == 1:
            fell &= abs(r["reloaded_val_loss"] - r["final_val_loss"]) <= 1e-2 * r["final_val_loss"]
        print(f"{name:9}{r['first_train_loss']:>10.4f} → {r['last_train_loss']:<9.4f}"
              f"{r['initial_val_loss']:>10.4f} → {r['final_val_loss']:<9.4f}{r['reloaded_val_loss']:>10.4f}"
              f"{r['tokens_per_s']:>10.0f}{r['scaling']:>8.2f}×{r['peak_memory_bytes'] / 2**30:>10.2f}")
    print(f"RESULT {json.dumps(rows)}")
    sys.exit(0 if fell else 1)


if __name__ == "__main__":
    main()
