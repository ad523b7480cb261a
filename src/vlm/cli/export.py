"""``vlm-export``: ship what a training run learned.

    vlm-export RUN_DIR --form adapter --out DIR    the LoRA adapter with the run's processor
    vlm-export RUN_DIR --form merged --out DIR     base dequantized + adapter merged: a plain checkpoint
                       [--dtype bfloat16|float16|float32] [--max-shard-size 5GB] [--device cpu|cuda]
    vlm-export RUN_DIR --form vllm --out DIR       the adapter under vLLM's module names

``DIR`` must be new or empty. Prints what was written; exits 2, with one line naming the problem,
when the run has no adapter, the adapter does not fit the run's base, a merge would leave part of
the adapter out, or vLLM would not serve the adapter as trained.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import console

if TYPE_CHECKING:
    from vlm.export import ExportReport

FORMS = ("adapter", "merged", "vllm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-export", description="Export a trained run's adapter or merged model.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a vlm-train output directory")
    parser.add_argument(
        "--form",
        choices=FORMS,
        required=True,
        help="adapter: the LoRA adapter and processor; merged: a plain checkpoint with the adapter merged "
        "into the dequantized base; vllm: the adapter under the module names vLLM serves LoRA by",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory (new or empty)")
    merged = parser.add_argument_group("merged form")
    merged.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of the merged weights (default bfloat16)")
    merged.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    merged.add_argument("--device", default="cpu", help="where to dequantize and merge (default cpu)")
    return parser


def export(args: argparse.Namespace) -> ExportReport:
    """The export ``args`` ask for; raises ``ConfigError`` subclasses naming what is wrong."""
    from vlm.build.trained import read_run
    from vlm.export import MergeSettings, export_adapter, export_merged, export_vllm

    run = read_run(args.run_dir)
    if args.form == "adapter":
        return export_adapter(run, args.out)
    if args.form == "vllm":
        return export_vllm(run, args.out)
    settings = MergeSettings(dtype=args.dtype, max_shard_size=args.max_shard_size, device=args.device)
    return export_merged(run, args.out, settings)


def summary_table(report: ExportReport) -> Table:
    """The files written, with sizes, and the total."""
    from vlm.quant.memory import human_bytes

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("file")
    table.add_column("size", justify="right")
    for written in report.files:
        table.add_row(escape(str(written.path.relative_to(report.out_dir))), human_bytes(written.size_bytes))
    table.add_row("[bold]total[/bold]", f"[bold]{human_bytes(report.total_bytes)}[/bold]")
    return table


def print_summary(report: ExportReport, out: Console) -> None:
    done = "merged" if report.form == "merged" else "written"
    out.print(f"[bold]vlm-export[/bold] {report.form} → {escape(str(report.out_dir))}")
    out.print(f"  {report.lora_layers} LoRA layers ({report.lora_tensors} tensors) {done}")
    for note in report.notes:
        out.print(f"  {escape(note)}")
    out.print(summary_table(report))


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0 written, 2 refused with a one-line reason)."""
    console.quiet_libraries()
    args = build_parser().parse_args(argv)
    from vlm.errors import ConfigError

    out = Console(highlight=False, soft_wrap=True)
    try:
        report = export(args)
    except ConfigError as error:
        Console(stderr=True, highlight=False, soft_wrap=True).print(f"[red]vlm-export: error:[/red] {escape(str(error))}")
        return 2
    print_summary(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
