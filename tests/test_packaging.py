"""Packaging: the YAML configs ship inside the package and resolve by name from any directory."""

from __future__ import annotations

import fnmatch
import os
import sys
from importlib.resources import files
from pathlib import Path

import pytest

from densedet.cli import find_config
from densedet.config import load_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
SHIPPED = Path(str(files("densedet") / "configs"))
NAMES = sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def test_the_package_ships_the_configs():
    assert {"demo_digits", "tiny_digits", "deepforest_trees", "retinanet_r50_fpn_1x_coco"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_config_loads_by_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                       # outside the repository: no configs/ folder here
    path = find_config(name)
    assert path.is_file() and path.resolve() == (SHIPPED / f"{name}.yaml").resolve()
    assert find_config(f"{name}.yaml").resolve() == path.resolve()
    assert find_config(f"configs/{name}.yaml").resolve() == path.resolve()   # the checkout's spelling
    load_config(path)


def test_an_existing_path_wins_over_a_shipped_name(tmp_path, monkeypatch):
    own = tmp_path / "demo_digits.yaml"
    own.write_text("model:\n  num_classes: 3\n")
    monkeypatch.chdir(tmp_path)
    assert find_config("demo_digits.yaml") == Path("demo_digits.yaml")
    assert load_config(find_config("demo_digits.yaml")).model.num_classes == 3
    assert find_config(str(own)) == own


def test_the_error_lists_the_available_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as err:
        find_config("no_such_config")
    message = str(err.value)
    assert "no_such_config" in message
    for name in NAMES:
        assert name in message


def test_the_cli_reports_a_missing_config_with_the_names(tmp_path, monkeypatch, capsys):
    from densedet.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["train", "no_such_config"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config" in err and "tiny_digits" in err


def test_the_configs_are_declared_package_data():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["densedet"]
    package = REPO / "densedet"
    for path in SHIPPED.glob("*.yaml"):
        rel = path.relative_to(SHIPPED.parent).as_posix()
        assert any(fnmatch.fnmatch(rel, g) for g in globs), f"{rel} is not in package-data {globs}"
    assert all(list(package.glob(g)) for g in globs)   # each glob matches something


def test_the_repository_configs_folder_points_into_the_package():
    link = REPO / "configs"
    assert link.is_symlink() and os.readlink(link) == "densedet/configs"
    assert sorted(p.name for p in link.glob("*.yaml")) == sorted(p.name for p in SHIPPED.glob("*.yaml"))
