"""Training-step speed of a config's model in NCHW against channels_last, interleaved.

    python benchmarks/train_layout.py configs/demo_digits.yaml [--steps 12]

Both models start from the same seed and train on the config's own batches (AdamW, its batch size);
steps alternate between the two so load drifts hit both alike. The first two steps are warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout without installing

import torch  # noqa: E402

from densedet.commands.bench import timed_train_step  # noqa: E402
from densedet.config import load_config  # noqa: E402
from densedet.device import flush_denormals  # noqa: E402
from densedet.engine.data import BatchStream, build_train_dataset, load_split  # noqa: E402
from densedet.models import build_from_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    flush_denormals()
    cfg = load_config(args.config)
    stream = BatchStream(build_train_dataset(cfg, load_split(cfg.data, "train")), cfg.train.batch_size, 0)
    models = {}
    for name in ("NCHW", "channels_last"):
        torch.manual_seed(0)
        model = build_from_config(cfg.model).train()
        if name == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4))
    times: dict[str, list[float]] = {name: [] for name in models}
    for it in range(args.steps):
        images, targets = stream.batch(it)
        for name, (model, opt) in models.items():
            times[name].append(timed_train_step(model, opt, images, targets))
    print("| layout | median step ms | img/s |\n|---|---|---|")
    for name, t in times.items():
        ms = 1000 * statistics.median(t[2:])
        print(f"| {name} | {ms:.0f} | {1000 * cfg.train.batch_size / ms:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
