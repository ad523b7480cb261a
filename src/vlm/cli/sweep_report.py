"""``vlm-sweep-report SWEEP_DIR``: one row per job of a sweep, written as ``summary.csv``,
``summary.md`` and ``summary.png`` in ``SWEEP_DIR`` and shown as a table.

Every ``vlm-train -m`` sweep writes this report when it ends; run it yourself on a sweep that is
still running, was cut off, or ran on a cluster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vlm.sweeps.report import collect, print_table, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vlm-sweep-report", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. outputs/train/multiruns/<date>_<time>")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.sweep_dir)
    except FileNotFoundError as error:
        print(f"vlm-sweep-report: {error}", file=sys.stderr)
        return 2
    paths = write(args.sweep_dir, rows)
    print_table(rows)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
