"""The base class of densedet's own exceptions (a leaf module: it imports nothing of densedet).

Every error densedet raises for bad input (a config, a dataset, a checkpoint, a results file, a
command-line setting) is a :class:`DensedetError`; the ``densedet`` command turns one into a single
line ``densedet VERB: error: FILE: what is wrong`` and exit code 2 (see :func:`densedet.cli.main`).
The concrete classes keep their older bases too (``ConfigError`` is still a ``ValueError``,
``TrainingError`` a ``RuntimeError``), so code catching those keeps working.
"""

from __future__ import annotations

__all__ = ["DensedetError", "UsageError"]


class DensedetError(Exception):
    """Bad input densedet refuses; the message names the file (or option) and what is wrong."""


class UsageError(DensedetError, ValueError):
    """A command-line setting that cannot work (e.g. ``--tile-overlap`` not below ``--tile``)."""
