"""The ``densedet`` command: assembles the verbs of :mod:`densedet.commands` into one parser.

    densedet demo                       generate the digit scenes, train, evaluate (the main job)
    densedet train CONFIG [k=v ...]     train from a YAML config (torchrun for several processes)
    densedet eval  ...                  COCO/VOC metrics of a checkpoint, or of a results file
    densedet predict / export / bench / analyze / ablate   (see each --help)

Each verb module has ``add_parser(subparsers)``, which registers the verb and the function it runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from .config import ConfigError
from .data import DatasetError
from .engine.checkpoint import CheckpointError

__all__ = ["main", "find_config"]

# The modules that register the verbs through ``add_parser(subparsers)``, in the order of --help.
_VERB_MODULES = ["densedet.commands.train", "densedet.commands.eval", "densedet.commands.predict",
                 "densedet.commands.export", "densedet.commands.bench", "densedet.commands.analyze",
                 "densedet.commands.ablate"]


def find_config(name: str) -> Path:
    """A config path as given, else a config shipped in the package (``densedet/configs``) by name,
    with or without ``.yaml`` (``configs/NAME.yaml`` too, so the checkout's paths work anywhere).
    The error lists the shipped names."""
    path = Path(name)
    if path.is_file():
        return path
    from importlib.resources import files
    shipped = files("densedet") / "configs"
    stem = path.name if path.parts[:-1] == ("configs",) else name
    for candidate in (shipped / stem, shipped / f"{stem}.yaml"):
        if candidate.is_file():
            return Path(str(candidate))
    names = sorted(p.name[:-len(".yaml")] for p in shipped.iterdir() if p.name.endswith(".yaml")) \
        if shipped.is_dir() else []
    raise FileNotFoundError(f"config {name!r} not found: neither a file nor a config shipped with densedet "
                            f"(available: {', '.join(names) or 'none'})")


def build_parser() -> argparse.ArgumentParser:
    """The ``densedet`` parser with every verb of :data:`_VERB_MODULES` registered."""
    parser = argparse.ArgumentParser(prog="densedet", description="One-stage dense object detection "
                                     "(RetinaNet, RefineDet): train, evaluate, predict, export, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _VERB_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:   # a verb whose module is not part of this install
                continue
            raise
        module.add_parser(sub)
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
