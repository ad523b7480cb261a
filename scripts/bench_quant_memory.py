"""Weight memory of full-size Llama-3.2-11B-Vision under each quantization policy, measured on a GPU.

Builds the full architecture with random weights (memory does not depend on the values), saves it
as a checkpoint with a locally trained tokenizer and the real image processor settings, and loads
it back through ``vlm.models.loading.load_model`` (``from_pretrained`` + bitsandbytes) once per
policy. For each it records the GPU memory the loaded weights take, the bytes counted on the
model, and the prediction made from a weightless skeleton before loading. ``dynamic`` is
calibrated on demo shards at its default budget first (one 16-bit copy, layer by layer).

    python scripts/bench_quant_memory.py --work /tmp/quant-bench --out results/

Writes ``quant_memory.csv``, ``quant_memory.md`` and the ``dynamic`` run's ``quant_report.json``
to ``--out`` (after each policy, so a cut-off run keeps what it measured).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import platform
import time
from pathlib import Path

import torch
import transformers

from vlm.build.planning import plan_checkpoint, take_batches
from vlm.data.datamodule import ShardDataModule
from vlm.data.demo import DEMO_VOCABULARY, write_demo_shards
from vlm.models.families import get_family
from vlm.models.families.base import image_processor
from vlm.models.loading import load_config, load_model, load_processor, model_skeleton
from vlm.quant.calibrate import CalibrationSettings
from vlm.quant.config import QuantConfig
from vlm.quant.memory import GIB, predicted_bytes, stored_bytes
from vlm.quant.policies import linear_layer_names

POLICIES = {
    "none": QuantConfig(method="none"),
    "nf4": QuantConfig(),
    "vision_skip": QuantConfig(policy="vision_skip"),
    "bridge_skip": QuantConfig(policy="bridge_skip"),
    "dynamic": QuantConfig(policy="dynamic"),
}
# The figures reported for Llama 3.2 Vision 11B (16-bit / standard 4-bit / sensitive layers kept).
REPORTED_GIB = {"none": 19.87, "nf4": 6.54, "dynamic": 7.23}


# --smoke: the same script at a size the CPU can run, to check it before spending GPU time.
SMOKE_SIZES = {
    "vision_config": {"image_size": 56, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_global_layers": 1, "attention_heads": 2, "vision_output_dim": 128, "intermediate_layers_indices": [0]},
    "text_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 3, "cross_attention_layers": [1],
                    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024},
}


def build_full_size_checkpoint(out_dir: Path, device: str, smoke: bool = False) -> Path:
    """Llama-3.2-11B-Vision's architecture, random bf16 weights, local tokenizer and processor."""
    if (out_dir / "config.json").exists():
        return out_dir
    from vlm.models.tokenizer import train_bpe_tokenizer

    family = get_family("mllama")
    tokenizer = train_bpe_tokenizer(
        [*DEMO_VOCABULARY, "system", "user", "assistant"],
        family.tiny_special_tokens(),
        vocab_size=512,
        bos_token=family.tiny_bos,
        eos_token=family.tiny_eos,
        pad_token=family.tiny_pad,
        chat_template=family.tiny_chat_template,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in family.tiny_special_tokens()}
    # Defaults are the 11B text model; the 11B vision model sees 560-pixel tiles.
    sizes = SMOKE_SIZES if smoke else {"vision_config": {"image_size": 560}, "text_config": {}}
    config = transformers.MllamaConfig(
        vision_config=sizes["vision_config"],
        text_config={
            **sizes["text_config"],
            "bos_token_id": ids[family.tiny_bos],
            "eos_token_id": ids[family.tiny_eos],
            "pad_token_id": ids[family.tiny_pad],
        },
        image_token_index=ids[family.image_token],
    )
    side = config.vision_config.image_size
    processor = transformers.MllamaProcessor(
        image_processor=image_processor("Mllama", size={"height": side, "width": side}, max_image_tiles=4),
        tokenizer=tokenizer,
        chat_template=family.tiny_chat_template,
    )
    with torch.device(device):
        model = transformers.MllamaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    del model
    _empty_cache()
    return out_dir


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


def calibration_data(checkpoint: str, family, data_dir: Path) -> tuple[list, list]:
    write_demo_shards(data_dir, 256, 64, 64, 0)
    processor = load_processor(checkpoint, family)
    data = ShardDataModule(
        str(data_dir / "train-*.tar"),
        processor,
        family.image_token,
        processor.tokenizer.pad_token_id,
        val_urls=str(data_dir / "val-*.tar"),
        batch_major_keys=family.batch_major_image_keys,
        batch_size=8,
        max_seq_length=512,
        num_workers=0,
    )
    return take_batches(data.stream_dataloader(data.urls), 4), take_batches(data.stream_dataloader(data.val_urls), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (about 22 GB)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--smoke", action="store_true", help="a small model on the CPU, to check the script")
    args = parser.parse_args()
    device = "cpu" if args.smoke else "cuda:0"
    args.out.mkdir(parents=True, exist_ok=True)
    family = get_family("mllama")

    started = time.perf_counter()
    checkpoint = str(build_full_size_checkpoint(args.work / "llama32-11b-vision-random", device, args.smoke))
    print(f"checkpoint ready in {time.perf_counter() - started:.0f} s", flush=True)
    config = load_config(checkpoint, family)
    if torch.cuda.is_available():  # cuBLAS allocates its workspace on the first matmul: not weights
        torch.ones(64, 64, device=device, dtype=torch.bfloat16).matmul(torch.ones(64, 64, device=device, dtype=torch.bfloat16))
    rows = []
    for name in args.policies:
        quant = POLICIES[name]
        _empty_cache()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        base = _allocated()
        t0 = time.perf_counter()
        extra = {}
        if name == "dynamic":
            calibration, heldout = calibration_data(checkpoint, family, args.work / "demo")
            settings = CalibrationSettings(cache=False)
            planning = plan_checkpoint(
                checkpoint, family, quant, settings, calibration_batches=calibration, heldout_batches=heldout, device=device
            )
            quant_plan, report = planning.plan, planning.report
            extra["planning_s"] = round(time.perf_counter() - t0, 1)
            if torch.cuda.is_available():
                extra["planning_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / GIB, 2)
            _empty_cache()
        else:
            quant_plan, report = quant.resolve(linear_layer_names(model_skeleton(family, config)), family.parts), None
        t1 = time.perf_counter()
        model, _ = load_model(checkpoint, family, quant, quant_plan=quant_plan, device=device)
        allocated = _allocated() - base
        counted = stored_bytes(model)
        if report is not None:
            report.loaded_bytes = counted
            (args.out / f"quant_report_{name}.json").write_text(json.dumps(report.to_dict(), indent=1))
        predicted = predicted_bytes(model_skeleton(family, config), quant_plan.quantized, quant.method, quant.double_quant)
        rows.append(
            {
                "policy": name,
                "kept_in_16bit": len(quant_plan.kept),
                "quantized": len(quant_plan.quantized),
                "predicted_bytes": predicted,
                "counted_bytes": counted,
                "predicted_gib": round(predicted / GIB, 3),
                "counted_gib": round(counted / GIB, 3),
                "cuda_allocated_gib": round(allocated / GIB, 3),
                "reported_gib": REPORTED_GIB.get(name, ""),
                "load_s": round(time.perf_counter() - t1, 1),
                **extra,
            }
        )
        print(rows[-1], flush=True)
        del model
        _empty_cache()
        write_results(args.out, rows)
    print(f"total {time.perf_counter() - started:.0f} s")


def write_results(out: Path, rows: list[dict]) -> None:
    columns = sorted({key for row in rows for key in row}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99)
    with open(out / "quant_memory.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    nf4 = next((r["counted_bytes"] for r in rows if r["policy"] == "nf4"), None)
    lines = [
        f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}, {datetime.date.today()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, python {platform.python_version()}",
        "",
        "| policy | kept 16-bit | predicted GiB | counted GiB | CUDA allocated GiB | vs nf4 | reported GiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        versus = f"{r['counted_bytes'] / nf4 - 1:+.2%}" if nf4 else ""
        lines.append(
            f"| {r['policy']} | {r['kept_in_16bit']} | {r['predicted_gib']} | {r['counted_gib']} | "
            f"{r['cuda_allocated_gib']} | {versus} | {r['reported_gib']} |"
        )
    (out / "quant_memory.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
