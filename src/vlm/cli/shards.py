"""``vlm-shards``: make tar shards for training.

    vlm-shards demo --out DIR [--train N --val M --image-size S --seed K --samples-per-shard P]
    vlm-shards convert --input data.json|data.jsonl|DATASET_DIR|data.parquet|'data-*.arrow' [--images DIR] --out DIR
                       [--format auto|sharegpt|openai|trl|cauldron] [--split train]
                       [--messages-column NAME --images-column NAME]
                       [--prefix train --samples-per-shard 1000 --image-format keep|png|jpg|webp]
                       [--val-fraction F | --val-count N] [--split-seed S]

Both print the brace pattern(s) of the shards written, ready to pass as data urls.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vlm.data.convert import (
    VAL_PREFIX,
    ConversionReport,
    InputFileError,
    ValidationSplit,
    convert,
)
from vlm.data.demo import DEFAULT_SHARDS_PER_SPLIT, MIN_IMAGE_SIZE, write_demo_shards
from vlm.data.formats import FORMAT_CHOICES, RecordLayout
from vlm.data.hf_datasets import DEFAULT_SPLIT

from .arguments import open_fraction, positive_int


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
    demo.add_argument("--train", type=positive_int, default=2000, help="train samples (default 2000)")
    demo.add_argument("--val", type=positive_int, default=200, help="validation samples (default 200)")
    demo.add_argument("--image-size", type=_image_size, default=64, help="image side in pixels (default 64)")
    demo.add_argument("--seed", type=int, default=0, help="generation seed (default 0)")
    demo.add_argument(
        "--samples-per-shard",
        type=positive_int,
        default=None,
        help=f"shard size (default: split each split into {DEFAULT_SHARDS_PER_SPLIT} shards)",
    )

    conv = commands.add_parser(
        "convert",
        help="convert LLaVA/ShareGPT, OpenAI, TRL or Cauldron records (JSON, JSONL or a dataset) into shards",
        description="Convert records and their images into OUT/PREFIX-000000.tar, ... and, with --val-fraction or "
        "--val-count, validation shards OUT/val-000000.tar, ... The records are JSON or JSONL, or a Hugging Face "
        "dataset on disk; each is LLaVA/ShareGPT, OpenAI messages, TRL content lists or Cauldron texts.",
    )
    conv.add_argument(
        "--input",
        type=Path,
        required=True,
        help="records as a JSON array or JSONL, or a dataset: a save_to_disk folder, or .parquet / .arrow files "
        "(a path or a quoted glob)",
    )
    conv.add_argument(
        "--images",
        type=Path,
        default=None,
        help="folder the records' relative image paths are relative to (not needed when the images are embedded, "
        "as in most datasets, or given as absolute paths or file:// URLs)",
    )
    conv.add_argument("--out", type=Path, required=True, help="output directory")
    conv.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default="auto",
        help="the records' format: sharegpt (LLaVA from/value turns), openai (role/content strings), trl "
        "(content lists of text and image items), cauldron (texts of user/assistant exchanges); auto tells "
        "them apart record by record (default auto)",
    )
    conv.add_argument("--split", default=None, help=f"the split of a dataset to convert (default {DEFAULT_SPLIT})")
    conv.add_argument(
        "--messages-column",
        metavar="NAME",
        help="the field or column holding the conversation (default: conversations, messages or texts)",
    )
    conv.add_argument(
        "--images-column", metavar="NAME", help="the field or column holding the images (default: image or images)"
    )
    conv.add_argument("--prefix", default="train", help="training shard name prefix (default train)")
    conv.add_argument("--samples-per-shard", type=positive_int, default=1000, help="shard size (default 1000)")
    conv.add_argument(
        "--image-format",
        choices=("keep", "png", "jpg", "webp"),
        default="keep",
        help="keep: store PNG, JPEG and WebP files byte for byte (format read from the content) and other "
        "formats as PNG; png|jpg|webp: re-encode every image (default keep)",
    )
    split = conv.add_mutually_exclusive_group()
    split.add_argument(
        "--val-fraction",
        type=open_fraction,
        metavar="F",
        help=f"send this fraction of the records (0 < F < 1; F x records rounded half up, at least 1) to "
        f"{VAL_PREFIX}-*.tar shards",
    )
    split.add_argument(
        "--val-count", type=positive_int, metavar="N", help=f"send N of the records to {VAL_PREFIX}-*.tar shards"
    )
    conv.add_argument(
        "--split-seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the choice of validation records (default 0): the same input, flags and seed give the "
        "same split on every run and machine, whichever records are bad",
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
    print(f"  {_train_command(patterns['train'], patterns['val'])}")
    return 0


def _train_command(urls: str, val_urls: str | None, data_group: str | None = None) -> str:
    """A ``vlm-train`` command line for these shards, to paste into a POSIX shell."""
    # Hydra reads an unquoted "{" as the start of a dict: the pattern needs Hydra's own quotes
    # inside the shell's.
    words = ["vlm-train", *([f"data={data_group}"] if data_group else []), f"\"data.urls='{urls}'\""]
    if val_urls:
        words.append(f"\"data.val_urls='{val_urls}'\"")
    return " ".join(words)


def _print_summary(report: ConversionReport, console: Console, split: bool) -> None:
    table = Table(title="conversion summary", show_header=False)
    table.add_row("written", str(report.written))
    if split:
        table.add_row("  to train shards", str(report.train_written))
        table.add_row("  to val shards", str(report.val_written))
        table.add_row("train shards", str(len(report.shards)))
        table.add_row("val shards", str(len(report.val_shards)))
    else:
        table.add_row("shards", str(len(report.shards)))
    table.add_row("skipped", str(report.skipped.total))
    for reason, count in report.skipped.as_dict().items():
        table.add_row(f"  {reason}", str(count))
    console.print(table)


def _validation_split(args: argparse.Namespace) -> ValidationSplit | None:
    if args.val_fraction is None and args.val_count is None:
        return None
    return ValidationSplit(fraction=args.val_fraction, count=args.val_count, seed=args.split_seed)


def run_convert(args: argparse.Namespace) -> int:
    console, errors = Console(), Console(stderr=True)
    split = _validation_split(args)
    try:
        report = convert(
            args.input,
            args.images,
            args.out,
            prefix=args.prefix,
            samples_per_shard=args.samples_per_shard,
            image_format=None if args.image_format == "keep" else args.image_format,
            val_split=split,
            layout=RecordLayout(args.format, args.messages_column, args.images_column),
            split=args.split,
            progress=not args.no_progress,
        )
    except (InputFileError, ValueError) as exc:
        errors.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    _print_summary(report, console, split is not None)
    if report.written == 0:
        errors.print("[red]error:[/red] no record could be converted; nothing was written", soft_wrap=True)
        return 1
    if split is None:
        print(f"Shard pattern (for data.urls or data.val_urls): {report.pattern}")
        return 0
    _print_split_patterns(report, errors)
    return 0


def _print_split_patterns(report: ConversionReport, errors: Console) -> None:
    for name, pattern, key in (("train", report.pattern, "data.urls"), ("val", report.val_pattern, "data.val_urls")):
        if pattern is None:
            errors.print(f"[yellow]warning:[/yellow] no {name} record could be converted: no {name} shards")
        else:
            print(f"{name.capitalize()} shard pattern (for {key}): {pattern}")
    if report.pattern is not None:
        print("Train on them with:")
        print(f"  {_train_command(report.pattern, report.val_pattern, data_group='webdataset')}")


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status (0 ok, 1 nothing written, 2 unreadable input or
    a split that leaves no training record)."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return run_demo(args)
    return run_convert(args)


if __name__ == "__main__":
    sys.exit(main())
