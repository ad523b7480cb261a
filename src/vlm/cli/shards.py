"""``vlm-shards``: make tar shards for training.

    vlm-shards demo --out DIR [--train N --val M --image-size S --seed K --samples-per-shard P]
    vlm-shards convert --input data.json|data.jsonl --images DIR --out DIR
                       [--prefix train --samples-per-shard 1000 --image-format png|jpg|webp]

Both print the brace pattern(s) of the shards written, ready to pass as data urls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlm.data.convert import ConversionReport, InputFileError, convert
from vlm.data.demo import DEFAULT_SHARDS_PER_SPLIT, MIN_IMAGE_SIZE, write_demo_shards


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _image_size(text: str) -> int:
    value = int(text)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_IMAGE_SIZE}, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one sub-parser per command."""
    parser = argparse.ArgumentParser(prog="vlm-shards", description="Write WebDataset tar shards for vlm training.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="render the synthetic shapes-and-colours visual-question set")
    demo.add_argument("--out", type=Path, required=True, help="output directory")
    demo.add_argument("--train", type=_positive_int, default=2000, help="train samples (default 2000)")
    demo.add_argument("--val", type=_positive_int, default=200, help="validation samples (default 200)")
    demo.add_argument("--image-size", type=_image_size, default=64, help="image side in pixels (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    demo.add_argument(
        "--samples-per-shard",
        type=_positive_int,
        default=None,
        help=f"shard size (default: split each split into {DEFAULT_SHARDS_PER_SPLIT} shards)",
    )

    conv = commands.add_parser("convert", help="convert LLaVA/ShareGPT JSON or JSONL plus images into shards")
    conv.add_argument("--input", type=Path, required=True, help="records as a JSON array or JSONL")
    conv.add_argument("--images", type=Path, required=True, help="folder the records' image paths are relative to")
    conv.add_argument("--out", type=Path, required=True, help="output directory")
    conv.add_argument("--prefix", default="train", help="shard name prefix (default train)")
    conv.add_argument("--samples-per-shard", type=_positive_int, default=1000, help="shard size (default 1000)")
    conv.add_argument(
        "--image-format", choices=("png", "jpg", "webp"), default="png", help="image encoding in shards (default png)"
    )
    conv.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_demo(args: argparse.Namespace) -> int:
    patterns = write_demo_shards(
        args.out, args.train, args.val, args.image_size, args.seed, samples_per_shard=args.samples_per_shard
    )
    # Plain print: the patterns must not be wrapped, so they can be copied as they are.
    print(
        f"Rendered {args.train} train and {args.val} val demo samples ({args.image_size}px) into {args.out.absolute()}"
    )
    print("Shard patterns:")
    print(f"  train: {patterns['train']}")
    print(f"  val:   {patterns['val']}")
    print("Train on them with:")
    print(f"  vlm-train data.urls='{patterns['train']}' data.val_urls='{patterns['val']}'")
    return 0


def _print_summary(report: ConversionReport, console: Console) -> None:
    table = Table(title="conversion summary", show_header=False)
    table.add_row("written", str(report.written))
    table.add_row("shards", str(len(report.shards)))
    table.add_row("skipped", str(report.skipped.total))
    for reason, count in report.skipped.as_dict().items():
        table.add_row(f"  {reason}", str(count))
    console.print(table)


def run_convert(args: argparse.Namespace) -> int:
    console, errors = Console(), Console(stderr=True)
    try:
        report = convert(
            args.input,
            args.images,
            args.out,
            prefix=args.prefix,
            samples_per_shard=args.samples_per_shard,
            image_format=args.image_format,
            progress=not args.no_progress,
        )
    except InputFileError as exc:
        errors.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    _print_summary(report, console)
    if report.written == 0:
        errors.print("[red]error:[/red] no record could be converted; nothing was written", soft_wrap=True)
        return 1
    print(f"Shard pattern (for data.urls or data.val_urls): {report.pattern}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 1 nothing written, 2 unreadable input)."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    return run_convert(args)


if __name__ == "__main__":
    sys.exit(main())
