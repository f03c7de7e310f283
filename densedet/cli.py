"""The ``densedet`` command: assembles the verbs of :mod:`densedet.commands` into one parser.

    densedet demo                       generate the digit scenes, train, evaluate (the main job)
    densedet train CONFIG [k=v ...]     train from a YAML config (torchrun for several processes)
    densedet eval  ...                  COCO/VOC metrics of a checkpoint, or of a results file
    densedet predict / export / bench / analyze / ablate   (see each --help)

Each verb module has ``add_parser(subparsers)``, which registers the verb and the function it runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from .commands import ablate, analyze, bench, eval, export, predict, train
from .config import find_config
from .errors import DensedetError

__all__ = ["main", "find_config", "build_parser", "parse_args"]

# The modules that register the verbs through ``add_parser(subparsers)``, in the order of --help.
VERBS = [train, eval, predict, export, bench, analyze, ablate]

DEBUG_HELP = "show the full Python traceback of an error (also: environment variable DENSEDET_DEBUG=1)"


def build_parser() -> argparse.ArgumentParser:
    """The ``densedet`` parser with every verb of :data:`VERBS` registered."""
    parser = argparse.ArgumentParser(prog="densedet", description="One-stage dense object detection "
                                     "(RetinaNet, RefineDet): train, evaluate, predict, export, benchmark.")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
    for verb_parser in sub.choices.values():  # `densedet eval ... --debug` works too
        verb_parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line; ``key.sub=value`` overrides may also follow options
    (``densedet train cfg.yaml --weights w.pt solver.lr=0.01``), which plain argparse refuses."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def _debug_wanted(args: argparse.Namespace | None) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("DENSEDET_DEBUG", "").strip() not in ("", "0")


def _one_line(text: str) -> str:
    """A message on one line (a multi-line message keeps its lines, joined by " | ")."""
    return " | ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe_error(err: BaseException) -> tuple[str, int]:
    """``(one-line message, exit code)`` for an exception that reached the command's boundary:
    densedet's own errors (bad input, :class:`~densedet.errors.DensedetError`) and operating-system
    errors on a named file exit 2; anything else is a bug in densedet and exits 1."""
    if isinstance(err, DensedetError):
        return _one_line(err), 2
    if isinstance(err, OSError) and (err.filename is not None or isinstance(err, FileNotFoundError)):
        what = err.strerror or str(err)
        return (_one_line(f"{err.filename}: {what}") if err.filename is not None else _one_line(err)), 2
    return (f"internal error (a bug in densedet, not in your input): {type(err).__name__}: "
            f"{_one_line(err)[:500]}; run again with --debug (or DENSEDET_DEBUG=1) to see the traceback, "
            f"and please report it"), 1


def main(argv: list[str] | None = None) -> int:
    """``densedet``: run the verb; the one error boundary of the command.

    Bad input (any :class:`~densedet.errors.DensedetError`, or a file the operating system refuses)
    prints one line ``densedet VERB: error: FILE: what is wrong`` on stderr and returns 2; an
    unexpected exception prints one line saying it is a bug and returns 1. ``--debug`` or
    ``DENSEDET_DEBUG=1`` prints the full traceback as well. Usage errors exit 2 through argparse.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if _debug_wanted(args):
            traceback.print_exc()
        print(f"densedet {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the boundary: nothing escapes as a bare traceback
        message, code = describe_error(err)
        if _debug_wanted(args):
            traceback.print_exc()
        print(f"densedet {args.command}: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
