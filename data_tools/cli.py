"""``python -m data_tools <verb>``: tools that turn crawled image-text pairs into growing shards.

Only verbs that work are registered in ``VERBS``. Each verb module is imported lazily inside its
``func`` so that ``--help`` stays fast. Exit codes: 0 ok, 1 failed (e.g. validation found problems,
an ingest kept no pair, an I/O error), 2 bad input. Every failure ends in one line on stderr,
``error: <what> (<where>); <fix>``, never a traceback (``GROWCLIP_TRACEBACK=1`` prints that of an unexpected one).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from data_tools.cli_errors import EXIT_FAILED, EXIT_USAGE, OneLineParser, fail, unexpected

__all__ = ["main", "build_parser", "VERBS", "IngestArgsError", "parse_ingest_args", "run_ingest"]

logger = logging.getLogger(__name__)


def _image_args(p: argparse.ArgumentParser) -> None:
    from data_tools.imaging import ImageOptions

    d = ImageOptions()
    g = p.add_argument_group("images and filters")
    g.add_argument("--image-size", type=int, default=d.image_size, help="output side in pixels (default %(default)s)")
    g.add_argument(
        "--resize-mode",
        choices=["border", "center_crop", "keep_ratio"],
        default=d.resize_mode,
        help="(default %(default)s)",
    )
    g.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality, help="re-encoding quality (default %(default)s)")
    g.add_argument(
        "--no-reencode",
        dest="reencode",
        action="store_false",
        help="store images that already fit (JPEG, RGB or grey, no EXIF rotation, --image-size square; short side "
        "for keep_ratio) as their own bytes: decoded once to validate and hash, never resized or re-encoded; the "
        "others are re-encoded (counted in the stage's image.as_is / image.reencoded)",
    )
    g.add_argument("--min-size", type=int, default=d.min_size, help="drop images whose short side is smaller")
    g.add_argument("--max-aspect-ratio", type=float, default=d.max_aspect_ratio, help="drop images more elongated")
    g.add_argument(
        "--max-pixels", type=int, default=d.max_pixels, help="decompression-bomb guard (default %(default)s)"
    )
    g.add_argument("--max-caption-chars", type=int, default=d.max_caption_chars, help="drop longer captions")
    g.add_argument(
        "--max-file-bytes",
        type=int,
        default=d.max_file_bytes,
        help="drop longer image/caption files and table rows without reading them (default %(default)s)",
    )
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="decode/resize processes; never changes the output")


def _image_opts(args: argparse.Namespace):  # -> ImageOptions
    from data_tools.imaging import ImageOptions

    return ImageOptions(
        image_size=args.image_size,
        resize_mode=args.resize_mode,
        jpeg_quality=args.jpeg_quality,
        min_size=args.min_size,
        max_aspect_ratio=args.max_aspect_ratio,
        max_pixels=args.max_pixels,
        max_caption_chars=args.max_caption_chars,
        max_file_bytes=args.max_file_bytes,
        reencode=args.reencode,
    )


# ------------------------------------------------------------------------------------------ ingest
class IngestArgsError(ValueError):
    """``ingest`` options that do not parse (``parse_ingest_args``): argparse's message, one line."""


def parse_ingest_args(argv: Sequence[str]) -> argparse.Namespace:
    """``python -m data_tools ingest ARGV`` parsed, for a caller in this process (``jobs autopilot``).

    Raises:
        IngestArgsError: an unknown or abbreviated option, ``-h``, a bad value (argparse's message).
    """

    class Parser(OneLineParser):
        def error(self, message: str) -> NoReturn:
            raise IngestArgsError(f"python -m data_tools ingest: {message}")

    # whole option names only (the autopilot reserves and drops options by name), and no -h that would exit
    p = Parser(prog="python -m data_tools ingest", allow_abbrev=False, add_help=False)
    _configure_ingest(p)
    return p.parse_args(list(argv))


def run_ingest(args: argparse.Namespace):  # -> IngestResult
    """The ingest that parsed ``args`` asks for (``--format auto`` resolved first); raises what ``ingest`` raises."""
    from data_tools.ingest import ingest
    from data_tools.inputs import resolve_format

    fmt = resolve_format(args.input, args.format)
    if fmt != args.format:
        logger.info("--format %s: reading %s as %s", args.format, args.input, fmt)
    return ingest(
        args.input,
        fmt,
        args.data_root,
        stage=args.stage,
        opts=_image_opts(args),
        shard_size=args.shard_size,
        workers=args.workers,
        caption_col=args.caption_col,
        image_col=args.image_col,
        separator=args.separator,
        path_base=args.path_base,
    )


def _run_ingest(args: argparse.Namespace) -> int:
    from data_tools.ingest import IngestFailed

    try:
        res = run_ingest(args)
    except IngestFailed as exc:  # the job ran and kept nothing: exit 1, not "bad input"
        return fail(exc, EXIT_FAILED)
    if res.already_ingested:
        print(f"already ingested as stage {res.stage} (input sha256 {res.input_sha256}); nothing to do")
        return 0
    print(
        f"stage {res.stage}: kept {res.count} of {res.records} pairs in {len(res.shards)} shards; dropped {res.drops}"
    )
    return 0


def _arg_type(name: str) -> Callable[[str], str]:
    """An argparse ``type`` from ``data_tools.inputs.<name>`` (imported on use: ``--help`` stays fast), whose
    ValueError argparse prints as its one-line error."""

    def convert(text: str) -> str:
        from data_tools import inputs

        try:
            return getattr(inputs, name)(text)
        except ValueError as exc:  # "--separator 'ab' is not ..." -> "argument --separator: 'ab' is not ..."
            message = str(exc)
            raise argparse.ArgumentTypeError(
                message.split(" ", 1)[1] if message.startswith("--") else message
            ) from None

    return convert


def _configure_ingest(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input",
        required=True,
        help="img2dataset output (a folder of its webdataset tars, parquet or files output; a .tar or .parquet), "
        "webdataset tars (a folder, searched recursively), or a CSV/TSV/JSONL/Parquet table (or a folder of them)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "img2dataset", "webdataset", "table"],
        help="auto (default): a .tar, an img2dataset parquet or a folder with *_stats.json is img2dataset, a "
        "table file or a folder of tables is table, a folder holding both tars and tables is refused; "
        "webdataset: the img2dataset tar reader, tars only",
    )
    p.add_argument("--data-root", required=True, help="the growing corpus (created if missing)")
    p.add_argument("--stage", type=int, default=None, help="stage number (default: resume a pending one, else next)")
    p.add_argument(
        "--caption-col",
        default="caption",
        help="caption column (default %(default)s; a table without it but with open_clip's 'title' uses that); "
        "tars: the caption member's extension (default txt)",
    )
    p.add_argument(
        "--image-col",
        default="image",
        help="image column: paths, or the image bytes in a binary parquet column (default %(default)s; without "
        "it, open_clip's 'filepath' or img2dataset's binary jpg/png/webp column); tars: the image member's "
        "extensions, e.g. 'png;jpg' (default the first of jpg, jpeg, png, webp, bmp, gif)",
    )
    p.add_argument(
        "--separator",
        type=_arg_type("parse_separator"),
        default="auto",
        help="CSV/TSV field separator: auto (default: the one that splits the header into the caption and image "
        "columns, logged; open_clip's .csv is tab-separated), tab (or \\t), comma, semicolon, pipe or a character",
    )
    p.add_argument(
        "--path-base",
        type=_arg_type("parse_path_base"),
        default="table",
        metavar="{table,cwd,DIR}",
        help="relative image paths of a table resolve against: table (its folder, default), cwd (the working "
        "directory, as open_clip's --train-data CSV) or DIR",
    )
    _image_args(p)
    p.set_defaults(func=_run_ingest)


# ---------------------------------------------------------------------------------------- validate
def _run_validate(args: argparse.Namespace) -> int:
    from data_tools.validate import validate

    report = validate(args.data_root, repair=args.repair)
    print(report.render())
    if report.ok:
        return 0
    problems = len(report.bad) + len(report.empty_stages)
    return fail(
        f"{problems} problem{'s' if problems != 1 else ''} found ({args.data_root}, listed above); "
        f"run `python -m data_tools validate {args.data_root} --repair`",
        EXIT_FAILED,
    )


def _configure_validate(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_root")
    p.add_argument("--repair", action="store_true", help="quarantine bad shards and re-pack their good samples")
    p.set_defaults(func=_run_validate)


# ------------------------------------------------------------------------------------------- stats
def _run_stats(args: argparse.Namespace) -> int:
    from data_tools.stats import compute_stats, render_stats

    stats = compute_stats(args.data_root)
    print(json.dumps(stats, indent=2, sort_keys=True) if args.format == "json" else render_stats(stats))
    return 0


def _configure_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_root")
    p.add_argument("--format", choices=["text", "json"], default="text")
    p.set_defaults(func=_run_stats)


# ----------------------------------------------------------------------------------- build-offline
def _run_build_offline(args: argparse.Namespace) -> int:
    from data_tools.offline import build_offline

    summary = build_offline(
        args.data_root,
        growth=args.growth,
        stages=args.stages,
        pairs_per_stage=args.pairs_per_stage,
        stage_sizes=args.stage_sizes,
        growth_factor=args.growth_factor,
        eval_per_task=args.eval_per_task,
        image_size=args.image_size,
        workers=args.workers,
        seed=args.seed,
        vocab_size=args.vocab_size,
    )
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def _stage_sizes(text: str) -> list[int]:
    """``3000,6000,12000`` -> ``[3000, 6000, 12000]``."""
    try:
        return [int(n) for n in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated pair counts, e.g. 3000,6000,12000") from None


def _configure_build_offline(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_root")
    p.add_argument(
        "--growth",
        choices=["domains", "iid"],
        default="domains",
        help="domains: each stage brings new sources (continual learning); iid: every stage is a fresh "
        "disjoint sample of one pool mixing all sources (default %(default)s)",
    )
    p.add_argument("--stages", type=int, default=None, help="number of stages (default 3, or len(--stage-sizes))")
    p.add_argument(
        "--pairs-per-stage",
        type=int,
        default=3000,
        help="pairs per stage; with --growth-factor, the first stage's (default %(default)s)",
    )
    p.add_argument(
        "--stage-sizes",
        type=_stage_sizes,
        default=None,
        metavar="N1,N2,...",
        help="pairs per stage, e.g. 3000,6000,12000 (sets the number of stages)",
    )
    p.add_argument(
        "--growth-factor",
        type=float,
        default=1.0,
        help="stage t gets pairs-per-stage * factor^(t-1) pairs (default %(default)s: equal stages)",
    )
    p.add_argument("--eval-per-task", type=int, default=500, help="held-out images per eval task (default %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="ingest worker processes (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=4096, help="tokenizer vocab; 0 skips tokenizer training")
    p.set_defaults(func=_run_build_offline)


# --------------------------------------------------------------------------------- train-tokenizer
def _run_train_tokenizer(args: argparse.Namespace) -> int:
    from data_tools.tokenizer import train_tokenizer

    path = train_tokenizer(args.data_root, vocab_size=args.vocab_size, stage=args.stage)
    print(f"wrote {path}")
    return 0


def _configure_train_tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("data_root")
    p.add_argument("--vocab-size", type=int, default=4096, help="(default %(default)s)")
    p.add_argument("--stage", type=int, default=None, help="stage whose captions train it (default: the first)")
    p.set_defaults(func=_run_train_tokenizer)


# verb name -> (one-line help, function that adds its arguments and sets ``func``)
VERBS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "ingest": ("append a new stage of shards from img2dataset/webdataset output or a table", _configure_ingest),
    "validate": ("check every shard against the manifest; --repair fixes bad shards", _configure_validate),
    "stats": ("per-stage counts, drop reasons and caption lengths", _configure_stats),
    "build-offline": (
        "build the embedded offline corpus (domains or iid growth) and eval suite",
        _configure_build_offline,
    ),
    "train-tokenizer": ("train the byte-level BPE tokenizer on the first stage", _configure_train_tokenizer),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m data_tools",
        description="GrowCLIP data tools: crawled image-text pairs -> growing webdataset shards.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for name, (help_text, configure) in VERBS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the verb; returns the exit code (0 ok, 1 failed, 2 bad input).

    Every failure prints one line ``error: ...`` on stderr (``data_tools/cli_errors.py``): bad input
    (ValueError, FileNotFoundError, RuntimeError, UnicodeError, argument errors) exits 2; an ingest that
    kept nothing, an I/O error or an unexpected exception (a bug: its type and message; the traceback
    with ``GROWCLIP_TRACEBACK=1``, or logged with ``-v``) exits 1.
    """
    from data_tools.atomic import free_space

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return fail("interrupted; re-run the same command (an interrupted ingest resumes)", 130)
    except (ValueError, FileNotFoundError, RuntimeError, UnicodeError) as exc:
        return fail(exc, EXIT_USAGE)
    except OSError as exc:  # an I/O error while the verb ran (a full disk, permissions): the job failed
        root = getattr(args, "data_root", None) or "."
        return fail(
            f"{exc.strerror or exc} ({exc.filename or root}); check the path, its permissions and free space "
            f"({free_space(root)}), then re-run (an ingest resumes)",
            EXIT_FAILED,
        )
    except Exception as exc:  # a bug, or an input no check anticipated: still one line
        if args.verbose:
            logger.exception("unexpected error in %s", args.verb)
        return unexpected(exc, f"python -m data_tools {args.verb}")
