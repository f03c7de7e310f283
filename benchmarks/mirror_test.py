"""Can the data tell whether a horizontal flip keeps a class? A measurement, not a rule.

    python benchmarks/mirror_test.py --data data_cache/digits/train.json --held data_cache/digits/tune.json
    python benchmarks/mirror_test.py --data 'pkg://deepforest/data/2019_YELL*.xml' --held pkg://deepforest/data/OSBS_029.xml

``densedet train --data`` flips by default and leaves ``--no-flip`` to the user. The one test the
data offers: train the recipe's box-crop warm-up (``densedet.engine.pretrain``; its crops are never
mirrored) for ``--minutes``, then classify crops of ``--data`` and of ``--held`` (another set: other
images, or another site) as they are and mirrored. If the mirror images were classified as well as
the crops, the objects would look alike both ways; digits, whose mirror image is another digit or
none, fall towards chance. The warm-up recipe is the one the command derives (ResNet-18 trunk,
AdamW at 3x the detection rate, 64 crops a step, with one class half of them background). Prints
one markdown row per set: crops, chance (the most frequent label's share), accuracy as is and
mirrored. The crops are drawn by a fixed generator, the same for both.
"""

from __future__ import annotations

import argparse
import functools

import torch

from densedet.commands.train import read_annotations
from densedet.data import DetectionDataset
from densedet.device import fast_autocast
from densedet.engine.pretrain import CropClassifier, background_share, box_items, crop_batch, pretrain_backbone
from densedet.models import build_model

LR, WEIGHT_DECAY, BATCH, SIZE = 0.006, 1e-4, 64, 48


def accuracy(classifier: CropClassifier, data, background: float, mean, std, batches: int, precision) -> dict:
    """Accuracy of C5's classifier on ``batches`` x ``BATCH`` crops of ``data``, as they are and mirrored."""
    images, items = DetectionDataset(data, cache_images=True), box_items(data)
    hits, crops_seen, chance = {"as is": 0, "mirrored": 0}, 0, torch.zeros(data.num_classes + 1)
    classifier.eval()
    for b in range(batches):
        g = torch.Generator().manual_seed(1_000 + b)
        crops, labels = crop_batch(g, items, images.load_uint8, BATCH, (SIZE,), data, background)
        chance += torch.bincount(labels, minlength=len(chance))
        for name, x in (("as is", crops), ("mirrored", crops.flip(-1))):
            with torch.no_grad(), precision():
                logits = classifier(((x - mean) / std).contiguous(memory_format=torch.channels_last))[-1]
            hits[name] += int((logits.argmax(1) == labels).sum())
        crops_seen += len(labels)
    return {"crops": crops_seen, "chance": float(chance.max()) / crops_seen,
            **{name: h / crops_seen for name, h in hits.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="training annotations (as densedet train --data)")
    parser.add_argument("--held", required=True, help="other annotations with the same classes")
    parser.add_argument("--minutes", type=float, default=1.5, help="warm-up time (the recipe's 15%% of 10 minutes)")
    parser.add_argument("--batches", type=int, default=32, help="batches of 64 crops scored per set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    train = read_annotations(args.data, None)[0]
    held = read_annotations(args.held, None, class_names=list(train.class_names))[0]
    torch.manual_seed(args.seed)
    model = build_model("retinanet_r18_fpn", num_classes=train.num_classes, norm="bn")
    share = background_share(-1, train.num_classes)
    classifier = CropClassifier(model.trunk, list(model.trunk.out_channels), train.num_classes + (share > 0))
    precision = functools.partial(fast_autocast, "cpu")       # bf16 where the CPU multiplies it natively
    stats = pretrain_backbone(model.trunk, DetectionDataset(train, cache_images=True).load_uint8, train,
                              model.preprocessor.mean, model.preprocessor.std, LR, WEIGHT_DECAY, BATCH,
                              minutes=args.minutes, seed=args.seed, autocast=precision, classifier=classifier)
    mean, std = model.preprocessor.mean.reshape(3, 1, 1), model.preprocessor.std.reshape(3, 1, 1)
    print(f"warm-up: {stats['iterations']} steps in {stats['seconds'] / 60:.1f} min, {stats['boxes']} boxes, "
          f"background share {share}")
    print("| set | crops | chance | accuracy | mirrored |\n|---|---|---|---|---|")
    for name, data in (("--data (trained on)", train), ("--held", held)):
        r = accuracy(classifier, data, share, mean, std, args.batches, precision)
        print(f"| {name} | {r['crops']} | {r['chance']:.3f} | {r['as is']:.3f} | {r['mirrored']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
