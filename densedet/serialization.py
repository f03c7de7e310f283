"""Reading files written by ``torch.save`` without running code from them, with errors that say
what the file is rather than torch's generic advice (which, for a file that is not a checkpoint at
all, would be to re-run with ``weights_only=False``: the wrong advice, and an unsafe one)."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from .errors import DensedetError

__all__ = ["UnreadableFile", "WeightsMismatch", "load_tensors"]


class UnreadableFile(DensedetError, ValueError):
    """A file is missing, is not a ``torch.save`` file, is damaged, or holds code-bearing objects."""


class WeightsMismatch(DensedetError, ValueError):
    """A weights file that reads, but whose tensors do not fit the model (other names or shapes)."""


def load_tensors(path: str | Path, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; the error names the file and says
    whether it is missing, empty, not a ``torch.save`` file at all, truncated, or a pickle of Python
    objects (a whole module, a class) that densedet will not unpickle."""
    path = Path(path)
    if not path.is_file():
        raise UnreadableFile(f"{path}: {what} not found")
    size = path.stat().st_size
    if size == 0:
        raise UnreadableFile(f"{path}: empty file (0 bytes), not a {what}")
    with open(path, "rb") as f:
        head = f.read(4)
    is_zip = head[:2] == b"PK"
    if not is_zip and head[:1] != b"\x80":        # neither torch.save's zip nor its legacy pickle
        raise UnreadableFile(f"{path}: not a {what}: not a file written by torch.save "
                             f"({size} bytes, starting with {head!r})")
    if is_zip and not zipfile.is_zipfile(path):
        raise UnreadableFile(f"{path}: truncated or damaged {what} (its zip directory is missing; "
                             f"was the file cut short?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err) or "WeightsUnpickler" in str(err):
            raise UnreadableFile(f"{path}: holds Python objects besides tensors and plain data (e.g. a "
                                 f"pickled model); densedet reads {what}s without running code from them: "
                                 f"save a state dict instead") from None
        raise UnreadableFile(f"{path}: damaged {what} ({err})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise UnreadableFile(f"{path}: truncated or damaged {what} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0][:200]})") from None
