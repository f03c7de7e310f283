"""Thin wrapper: `python benchmarks/fast_paths.py [--quick] [--out FILE]` = `densedet bench --suite fast`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

from densedet.commands.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["--suite", *"fast".split(), *sys.argv[1:]]))
