"""One recipe of a benchmark in a process of its own: ``python -m vlm.bench.worker SPEC_JSON``.

Prints one line ``RESULT {json}`` (a :class:`~vlm.bench.measure.Measurement`); a recipe that cannot
run here, or runs out of memory, says so there instead of failing the benchmark. Unsloth is imported
before anything else, as it must be to patch transformers.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

RESULT_PREFIX = "RESULT "


def main(argv: list[str] | None = None) -> None:
    spec: dict[str, Any] = json.loads((argv or sys.argv[1:])[0])
    if spec["recipe"] == "unsloth" and not spec["work"].get("smoke"):
        try:
            import unsloth  # noqa: F401  (patches transformers and peft: first)
        except Exception as error:  # noqa: BLE001  (any failure to import is the peer's, reported)
            report(spec, status="unavailable", reason=f"unsloth does not import: {error}")
            return
    measure(spec)


def measure(spec: dict[str, Any]) -> None:
    import torch

    from vlm.models.compiling import graph_breaks

    from .measure import Measurement, memory_fields, summarize
    from .recipes import Unavailable, run_recipe
    from .work import BenchWork, ensure_checkpoint, make_batch

    work = BenchWork(**spec["work"])
    try:
        checkpoint = ensure_checkpoint(work)
        batch = make_batch(work, checkpoint)
        if work.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        profile_to = spec.get("profile_to")
        run = run_recipe(spec["recipe"], work, checkpoint, batch, spec["steps"], spec.get("overrides", ()),
                         None if profile_to is None else Path(profile_to), spec.get("memory_timeline", False))
    except Unavailable as error:
        report(spec, status="unavailable", reason=str(error))
        return
    except torch.cuda.OutOfMemoryError as error:
        report(spec, status="out of memory", reason=str(error).splitlines()[0])
        return
    except Exception as error:  # noqa: BLE001  (a failed recipe is a row of the table, with its reason)
        traceback.print_exc()
        report(spec, status="failed", reason=f"{type(error).__name__}: {error}"[:500])
        return
    fields = summarize(run.steps, spec["warmup"], work.tokens * work.batch_size)
    measurement = Measurement(
        recipe=spec["recipe"], family=work.family, tokens=work.tokens, batch_size=work.batch_size, status="ok",
        build_s=round(run.build_s, 2), trainable_params=run.trainable_params, memory_timeline=run.memory_timeline,
        build=run.build, first_grad_norms=run.first_grad_norms, shared_lora_init=run.shared_lora_init,
        graph_breaks=graph_breaks(),
        **fields,
        **memory_fields(work.device, run.weights_bytes, run.memory),
    )
    print(RESULT_PREFIX + json.dumps(measurement.as_dict()), flush=True)


def report(spec: dict[str, Any], *, status: str, reason: str) -> None:
    from .measure import Measurement

    work = spec["work"]
    measurement = Measurement(recipe=spec["recipe"], family=work["family"], tokens=work["tokens"],
                              batch_size=work.get("batch_size", 1), status=status, reason=reason)
    print(RESULT_PREFIX + json.dumps(measurement.as_dict()), flush=True)


if __name__ == "__main__":
    main()
