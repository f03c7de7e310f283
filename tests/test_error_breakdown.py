"""benchmarks/error_breakdown.py: its sorting of objects and detections, on hand-placed boxes."""

import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "error_breakdown", Path(__file__).resolve().parent.parent / "benchmarks" / "error_breakdown.py")
eb = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eb)


def test_each_detection_kind_and_the_rank_of_the_right_class():
    gt_boxes = torch.tensor([[0., 0., 20., 20.], [50., 50., 90., 90.]])
    gt_labels = torch.tensor([1, 2])
    det_boxes = torch.tensor([
        [0., 0., 20., 20.],     # 0.9 class 1 on object 0: true positive
        [1., 0., 20., 20.],     # 0.8 class 1 on object 0 again: duplicate
        [0., 0., 20., 21.],     # 0.7 class 3 on object 0: wrong class
        [50., 50., 90., 90.],   # 0.6 class 0 on object 1: wrong class, ranked above the right one
        [50., 50., 90., 89.],   # 0.5 class 2 on object 1: true positive
        [50., 50., 70., 70.],   # 0.4 class 2, IoU 0.25 with object 1: poorly placed
        [200., 200., 220., 220.],  # 0.3 class 2 far from everything: background
        [120., 0., 140., 20.],  # 0.1 below the score floor: not counted
    ])
    det_scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.1])
    det_labels = torch.tensor([1, 1, 3, 0, 2, 2, 2, 2])
    objects, kinds = eb.image_breakdown(gt_boxes, gt_labels, det_boxes, det_scores, det_labels, 0.2)
    assert kinds == [0, 1, 2, 2, 0, 3, 4]
    (size0, best0, rank0), (size1, best1, rank1) = objects
    assert size0 == 20.0 and abs(best0 - 0.9) < 1e-6 and rank0 == 0
    assert size1 == 40.0 and abs(best1 - 0.5) < 1e-6 and rank1 == 1   # class 0 (0.6) outranks class 2 (0.5)


def test_an_image_without_detections_has_objects_not_found():
    objects, kinds = eb.image_breakdown(torch.tensor([[0., 0., 10., 10.]]), torch.tensor([0]),
                                        torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.2)
    assert objects == [(10.0, 0.0, None)] and kinds == []
