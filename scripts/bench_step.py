"""One whole training step of a full-size model, built as ``vlm-train`` builds it.

Random-init weights of the full-size architecture and a locally built processor, saved once to
``--model-dir`` and loaded through ``from_pretrained``; then ``vlm.build.model.build_model`` (NF4,
LoRA r16 on the language model, the kernels asked for, gradient checkpointing), 8-bit AdamW, bf16
autocast, batch 1 with one image. Prints one ``RESULT`` JSON line: the median step after two warm-up
steps, tokens/s and peak allocated memory.

    python scripts/bench_step.py --kernels none --frozen-parts on --tokens 2048           # Llama-3.2-11B-Vision
    python scripts/bench_step.py --family qwen3_vl --kernels all --tokens 2048            # Qwen3-VL-8B
    python scripts/bench_step.py --model gemma3_4b --kernels all --tokens 2048            # a conf/model name

``--family mllama`` (the default) is Llama-3.2-11B-Vision with images of 4 tiles at 560 px; the other
families are the architectures their ``full_size_config`` describes (Qwen3-VL-8B, gemma-3-4b,
SmolVLM2-2.2B, SmolVLM-Instruct for ``idefics3``), each with one 1024x768 image as its own image
processor prepares it. ``--smoke`` runs the same path on the family's tiny variant on the CPU, in
seconds, so that the GPU benchmark cannot rot unnoticed.

Run each setting in its own process: peak memory is per process. Results go in BENCHMARKS.md.
``vlm-bench`` measures the whole LightningModule step beside the peers' recipes on the same work
(:mod:`vlm.bench.work`); this script times the built model alone, without Lightning.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch

from vlm.bench.measure import PhaseClock, median_phases, timed_steps
from vlm.bench.work import (
    BENCH_IMAGE_SIZE,
    ensure_family_dir,
    ensure_mllama_dir,
    family_batch,
    mllama_batch,
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--family", default=None, help="a model family (model_type); default mllama")
    which.add_argument("--model", default=None, help="a conf/model name (e.g. qwen3_vl_8b): its family")
    parser.add_argument("--kernels", choices=("none", "all"), default="none")
    parser.add_argument("--frozen-parts", choices=("on", "off"), default="on", help="BuildSteps.frozen_parts_forward_only")
    parser.add_argument("--checkpointing", choices=("none", "standard", "offload"), default="standard")
    parser.add_argument("--profile", type=Path, default=None,
                        help="profile one step after the timed ones; write its tables (GPU and host time per op) here")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--model-dir", type=Path, default=None, help="where the random-init checkpoint is kept")
    parser.add_argument("--smoke", action="store_true", help="the family's tiny variant on the CPU, 3 steps")
    args = parser.parse_args(argv)

    from vlm.build.model import BuildSteps, ModelRecipe, build_model
    from vlm.build.planning import plan_checkpoint
    from vlm.models.families import get_family
    from vlm.models.loading import load_config, load_processor
    from vlm.models.lora import LoraSettings
    from vlm.patching import KERNELS, KernelSettings
    from vlm.quant.calibrate import CalibrationSettings
    from vlm.quant.config import QuantConfig
    from vlm.training.optim import adamw

    model_type = args.family or (model_family(args.model) if args.model else "mllama")
    family = get_family(model_type)
    device = "cpu" if args.smoke else "cuda"
    default_dir = "mllama11b" if model_type == "mllama" else f"bench-{model_type}"
    if args.smoke:
        from vlm.data.demo import DEMO_VOCABULARY
        from vlm.models.tiny import build_tiny_checkpoint

        path = str(build_tiny_checkpoint(family, args.model_dir or Path(tempfile.mkdtemp()) / model_type, DEMO_VOCABULARY))
    elif model_type == "mllama":
        path = str(ensure_mllama_dir(args.model_dir or Path(tempfile.gettempdir()) / default_dir))
    else:
        path = str(ensure_family_dir(family, args.model_dir or Path(tempfile.gettempdir()) / default_dir))

    # The batch first: a --tokens too small for the image fails before the model loads.
    config = load_config(path, family)
    if model_type == "mllama" and not args.smoke:
        batch = mllama_batch(config, args.tokens)
    else:
        image_size = (64, 48) if args.smoke else BENCH_IMAGE_SIZE
        batch = family_batch(load_processor(path, family), args.tokens, image_size)
    batch = {key: value.to(device) for key, value in batch.items()}
    image_tokens = int((batch["input_ids"] == config.image_token_id).sum())

    quant = QuantConfig()
    planning = plan_checkpoint(path, family, quant, CalibrationSettings(measure=False), device=device)
    kernels = KernelSettings(**{name: args.kernels == "all" for name in KERNELS})
    recipe = ModelRecipe(path, family, quant, LoraSettings(r=16, alpha=16), kernels, device=device,
                         checkpointing=args.checkpointing)
    if not args.smoke:
        torch.cuda.reset_peak_memory_stats()
    built = build_model(recipe, planning, BuildSteps(frozen_parts_forward_only=args.frozen_parts == "on"))
    print(built.summary(), flush=True)
    model = built.model.train()
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=2e-4)

    def one_step(clock: PhaseClock) -> torch.Tensor:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=not args.smoke):
            loss = model(**batch).loss
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    log, memory = timed_steps(one_step, 3 if args.smoke else args.steps, device, profile_to=args.profile)
    times = log.times
    step = statistics.median(times[2:])
    result = {
        "family": model_type, "kernels": args.kernels, "frozen_parts": args.frozen_parts,
        "checkpointing": args.checkpointing, "tokens": args.tokens,
        "image_tokens": image_tokens,
        "step_s": round(step, 3), "tokens_per_s": round(args.tokens / step),
        # The step timer resets the allocator's peak at each phase; its own record holds the run's peak.
        "peak_allocated_GB": None if args.smoke else round(memory.run_peaks()[0] / 2**30, 2),
        "loss": round(log.losses[-1], 4), "times": [round(t, 3) for t in times],
        "host_phases_ms": median_phases(log.phases[2:]),
    }
    print("RESULT", json.dumps(result), flush=True)
    return result


def model_family(name: str) -> str:
    """The family of the conf/model config ``name``."""
    from omegaconf import OmegaConf

    from vlm.configs import config_dir

    path = config_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise SystemExit(f"--model {name}: no conf/model/{name}.yaml; known: {', '.join(known)}")
    return str(OmegaConf.load(path).family)


if __name__ == "__main__":
    main()
