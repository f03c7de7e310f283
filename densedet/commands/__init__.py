"""The ``densedet`` command's verbs, one module each: ``add_parser(subparsers)`` registers the verb
(its flags and help) and the function it runs. ``densedet/cli.py`` assembles them into the command.

These modules print, parse arguments and plot; a program that uses densedet imports the library
(``densedet.predict``, ``densedet.analysis``, ``densedet.export``, ``densedet.evaluation``, ...)
instead. ``bench`` and ``ablate`` are measuring tools and live here whole.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError

__all__ = ["require_folder"]


def require_folder(path: str | None, option: str, holds: str) -> None:
    """Refuse an output ``option`` that names an existing file: the verb writes a folder of ``holds``."""
    if path and Path(path).exists() and not Path(path).is_dir():
        raise UsageError(f"{option} {path}: is a file; a folder is written there ({holds})")
