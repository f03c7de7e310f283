"""Reading torch.save files without running code: every kind of bad file gets a message that says what it is."""

from __future__ import annotations

import pytest
import torch

from densedet.engine.checkpoint import CheckpointError, load_checkpoint
from densedet.models import build_model, load_weights
from densedet.serialization import UnreadableFile, load_tensors


def _bad_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"format": "densedet-checkpoint-v1", "w": torch.zeros(3)}, good)
    files = {
        "empty": (b"", "empty file"),
        "text": (b"model weights here\n", "not a file written by torch.save"),
        "truncated": (good.read_bytes()[:200], "truncated or damaged"),
    }
    out = {}
    for name, (data, message) in files.items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        out[name] = (path, message)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": torch.nn.Linear(2, 2)}, pickled)            # a whole module: code on load
    out["pickled"] = (pickled, "holds Python objects besides tensors")
    out["missing"] = (tmp_path / "missing.pt", "not found")
    return out


def test_each_bad_file_is_named_and_told_apart(tmp_path):
    for name, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(UnreadableFile, match=message) as err:
            load_tensors(path)
        assert str(err.value).startswith(str(path)), name
        assert "weights_only=False" not in str(err.value) and "weights_only" not in str(err.value), name


def test_checkpoint_and_weights_readers_share_the_messages(tmp_path):
    model = build_model("retinanet_r18_fpn", num_classes=2)
    for name, (path, message) in _bad_files(tmp_path).items():
        with pytest.raises(CheckpointError, match=f"{path.name}: .*{message}"):
            load_checkpoint(path)
        with pytest.raises(ValueError, match=f"{path.name}: .*{message}"):
            load_weights(model, str(path))


def test_a_good_file_loads(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"w": torch.arange(3)}, path)
    assert torch.equal(load_tensors(path)["w"], torch.arange(3))
