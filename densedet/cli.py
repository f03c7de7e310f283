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
import sys

from .commands import ablate, analyze, bench, eval, export, predict, train
from .config import ConfigError, find_config
from .data import DatasetError
from .engine.checkpoint import CheckpointError

__all__ = ["main", "find_config", "build_parser", "parse_args"]

# The modules that register the verbs through ``add_parser(subparsers)``, in the order of --help.
VERBS = [train, eval, predict, export, bench, analyze, ablate]


def build_parser() -> argparse.ArgumentParser:
    """The ``densedet`` parser with every verb of :data:`VERBS` registered."""
    parser = argparse.ArgumentParser(prog="densedet", description="One-stage dense object detection "
                                     "(RetinaNet, RefineDet): train, evaluate, predict, export, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb.add_parser(sub)
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


def main(argv: list[str] | None = None) -> int:
    """``densedet``: run the verb; a bad config, dataset, checkpoint or missing file exits 2 with one line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, DatasetError, CheckpointError, FileNotFoundError) as err:
        print(f"densedet {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
