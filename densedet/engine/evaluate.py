"""Run a model over a dataset and score it with pycocotools (gathered across processes).

A model trained on tiles of large photos (``data.tile_size``) is evaluated as it predicts: an image
larger than a tile is cut into the same tiles and their detections merged (:mod:`densedet.tiling`),
never shrunk whole into the model's input."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..config import DataConfig
from ..data import DetectionData, DetectionDataset, record_size, to_coco_dict
from ..device import autocast, flush_denormals
from ..evaluation import detections_to_coco, evaluate_coco
from ..tiling import batches_of_one_size, detect_tiled
from ..tta import TTAConfig, tta_inference

__all__ = ["predict_dataset", "evaluate_model", "eval_tiles"]


def eval_tiles(data: DataConfig) -> tuple[int, int] | None:
    """``(tile size, overlap)`` that evaluation cuts images larger than a training tile into, or None."""
    return (data.tile_size, data.tile_overlap) if data.tile_size > 0 else None


@torch.inference_mode()
def predict_dataset(model: nn.Module, data: DetectionData, batch_size: int = 8,
                    device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                    rank: int = 0, world_size: int = 1, progress=None, tta: TTAConfig | None = None,
                    tiles: tuple[int, int] | None = None) -> list[dict]:
    """COCO-format results for this process's share of ``data`` (images rank, rank + W, …), with
    test-time augmentation when ``tta`` is given, images larger than ``tiles = (size, overlap)`` cut
    into tiles (:func:`eval_tiles`)."""
    device = torch.device(device)
    dataset = DetectionDataset(data, cache_images=False)
    flush_denormals()
    indices = list(range(rank, len(dataset), world_size))
    results = []
    was_training = model.training
    model.eval()

    def detect(images: list) -> list[dict]:
        return model(images) if tta is None else tta_inference(model, images, tta)

    # images of one size go together: a batch is padded to its largest image (see detect_tiled)
    sizes = [record_size(data.records[i], data.source) for i in indices]
    done = 0
    for chunk in batches_of_one_size(indices, sizes, batch_size):
        images = [dataset[i][0].to(device) for i in chunk]
        with autocast(device, dtype):
            detections = detect_tiled(detect, images, *(tiles or (0, 0)), batch_size,
                                      float(getattr(model, "nms_thresh", 0.5)))
        detections = [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in d.items()} for d in detections]
        image_ids = [int(data.records[i].image_id) for i in chunk]
        results += detections_to_coco(detections, image_ids, data.category_ids)
        done += len(chunk)
        if progress is not None:
            progress(done, len(indices))
    model.train(was_training)
    return results


def evaluate_model(model: nn.Module, data: DetectionData, batch_size: int = 8, device="cpu",
                   dtype: torch.dtype | None = None, max_dets=(1, 10, 100), progress=None,
                   tta: TTAConfig | None = None, tiles: tuple[int, int] | None = None) -> dict:
    """COCO metrics of ``model`` on ``data`` (every process predicts a shard; rank 0 scores)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    results = predict_dataset(model, data, batch_size, device, dtype, rank, world, progress, tta, tiles)
    if distributed:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    # class names come from the ground truth's categories, each with its id (a file's ids need not follow the labels)
    metrics = evaluate_coco(results, to_coco_dict(data), max_dets=tuple(max_dets))
    metrics.pop("curves", None)
    return metrics
