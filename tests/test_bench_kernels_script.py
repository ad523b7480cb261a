"""``scripts/bench_kernels.py --smoke`` runs every implementation it times on tiny CPU shapes (Triton's interpreter)
and writes one CSV row per kernel with both timings, so the GPU benchmark cannot rot unnoticed."""

import csv
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_kernels.py"


def test_smoke_run_writes_both_timings_for_ours_and_the_baseline(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path), "--only", "rms_norm", "swiglu", "qlora_linear"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    failures = [line for line in done.stdout.splitlines() if not line.startswith("{")]  # "<kernel> <impl>: <error>"
    assert not failures, failures
    rows = list(csv.DictReader(open(tmp_path / "kernels.csv")))
    assert [row["kernel"] for row in rows] == ["rms_norm (frozen weight)", "rms_norm", "swiglu", "qlora_linear"]
    for row in rows:
        baseline = "bnb+peft" if row["kernel"] == "qlora_linear" else "eager"
        for implementation in ("ours", baseline):
            assert float(row[f"{implementation}_gpu_ms"]) > 0 and float(row[f"{implementation}_wall_ms"]) > 0
    assert float(rows[2]["ours_fresh_grads_wall_ms"]) > 0
    assert (tmp_path / "kernels.md").read_text().startswith("cpu (interpreter)")
