"""densedet.evaluation.errors: the kind of each error, the AP50 each kind costs and the confusion matrix,
on hand-placed boxes whose answers are worked out in the comments."""

import numpy as np
import pytest

from types import SimpleNamespace

from densedet.evaluation.errors import (ImageResult, average_precision, classify, confusion_matrix,
                                        error_breakdown, image_results)

# Three objects of class 0, three of class 1 (class 2 has none); one error of each kind.
GT = [([0, 0, 20, 20], 0),          # a: small, found at 0.9 (and duplicated at 0.8)
      ([300, 300, 320, 320], 0),    # c: small, nothing near it: missed
      ([200, 200, 240, 240], 0),    # f: medium, found at 0.4
      ([50, 50, 90, 90], 1),        # b: medium, only a class-2 detection on it: wrong class
      ([100, 0, 200, 100], 1),      # e: large, only a class-1 detection at IoU 0.25: poor localisation
      ([0, 300, 20, 320], 1)]       # g: small, found at 0.3
DETS = [([0, 0, 20, 20], 0.9, 0),        # true positive on a
        ([1, 0, 20, 20], 0.8, 0),        # IoU 0.95 with a, taken: duplicate
        ([50, 50, 90, 90], 0.7, 2),      # on b with class 2: wrong class
        ([100, 0, 150, 50], 0.6, 1),     # IoU 2500/10000 with e: poor localisation
        ([400, 400, 500, 500], 0.5, 0),  # far from everything: background (large by its own size)
        ([200, 200, 240, 240], 0.4, 0),  # true positive on f
        ([0, 300, 20, 320], 0.3, 1)]     # true positive on g


def _image() -> ImageResult:
    return ImageResult.make(1, [b for b, _ in GT], [c for _, c in GT], [d[0] for d in DETS],
                            [d[1] for d in DETS], [d[2] for d in DETS])


def test_each_detection_kind_and_the_missed_object():
    m = classify(_image())
    assert m.kind == ["true positive", "duplicate", "wrong class", "poor localisation", "background",
                      "true positive", "true positive"]
    assert m.target.tolist() == [0, 0, 3, 4, -1, 2, 5]
    assert m.matched.tolist() == [True, False, True, False, False, True]
    # b and e are pointed at by a wrong-class and a poorly placed detection: only c is missed
    assert m.missed.tolist() == [False, True, False, False, False, False]


def test_the_ap50_each_kind_of_error_costs():
    """Class 0 (3 objects): TP .9, FP .8, FP .5, TP .4: precision 1 up to recall 1/3 (34 of the 101
    points) and 1/2 up to 2/3 (33 points): AP 50.5/101. Class 1 (3 objects): FP .6, TP .3: precision
    1/2 up to recall 1/3: 17/101. AP50 = 33.75/101. Fixing
    - duplicates or background: class 0 is TP, FP, TP: 34 + 33 * 2/3 = 56 -> (56 + 17) / 2 = 36.5;
    - the wrong class: b's detection is a TP of class 1 at .7: TP, FP, TP = 56 -> (50.5 + 56) / 2 = 53.25;
    - the poor localisation: class 1 is TP .6, TP .3 -> 67 -> (50.5 + 67) / 2 = 58.75;
    - the missed object: class 0 has 2 objects: 51 points at 1, 50 at 1/2 = 76 -> (76 + 17) / 2 = 46.5."""
    result = error_breakdown([_image()], num_classes=3)
    assert result["ap50"] == pytest.approx(33.75 / 101)
    gains = {kind: gain * 101 for kind, gain in result["ap50_gain"].items()}
    assert gains == pytest.approx({"duplicate": 2.75, "background": 2.75, "wrong class": 19.5,
                                   "poor localisation": 25.0, "missed": 12.75})
    assert result["counts"] == {kind: 1 for kind in gains}
    assert result["true_positives"] == 3 and result["objects"] == 6
    assert {k: [s for s, n in v.items() if n] for k, v in result["by_size"].items()} == {
        "missed": ["small"], "wrong class": ["medium"], "background": ["large"], "poor localisation": ["large"],
        "duplicate": ["small"]}
    assert result["per_image"] == [{"image_id": 1, "errors": 5, "missed": 3, "false_positives": 4, "objects": 6,
                                    "recall": 0.5}]


def test_a_fixed_detection_whose_object_is_taken_is_removed_not_counted_twice():
    # two wrong-class detections on the same object: the fix makes the first a TP and drops the second
    image = ImageResult.make(1, [[0, 0, 10, 10]], [0], [[0, 0, 10, 10], [0, 0, 10, 10]], [0.9, 0.8], [1, 1])
    result = error_breakdown([image], num_classes=2)
    assert result["ap50"] == 0.0 and result["ap50_gain"]["wrong class"] == pytest.approx(1.0)


def test_the_score_threshold_leaves_low_detections_out():
    result = error_breakdown([_image()], num_classes=3, score_thresh=0.55)
    assert result["counts"] == {"missed": 3, "wrong class": 1, "background": 0, "poor localisation": 1,
                                "duplicate": 1}       # c, f and g are missed now; the background .5 is gone


def test_the_confusion_matrix_matches_across_classes_with_background_as_last_row_and_column():
    # by score: .9 -> a [0,0]; .8 a taken -> background [3,0]; .7 on b [1,2]; .6 IoU .25 -> [3,1];
    # .5 -> [3,0]; .4 -> f [0,0]; .3 -> g [1,1]; unmatched c [0,3] and e [1,3]
    assert confusion_matrix([_image()], 3, score_thresh=0.0).tolist() == [[2, 0, 0, 1],
                                                                           [0, 1, 1, 1],
                                                                           [0, 0, 0, 0],
                                                                           [2, 1, 0, 0]]
    # above .65 only .9, .8 and .7 count: c, f, e and g are missed
    assert confusion_matrix([_image()], 3, score_thresh=0.65).tolist() == [[1, 0, 0, 2],
                                                                            [0, 0, 1, 2],
                                                                            [0, 0, 0, 0],
                                                                            [1, 0, 0, 0]]


def test_an_image_without_detections_has_every_object_missed():
    image = ImageResult.make(7, [[0, 0, 10, 10]], [0], np.zeros((0, 4)), [], [])
    result = error_breakdown([image], num_classes=1)
    assert result["counts"]["missed"] == 1 and result["ap50"] == 0.0
    assert result["ap50_gain"]["missed"] == 0.0        # no objects left: no class has an AP
    assert confusion_matrix([image], 1).tolist() == [[0, 1], [0, 0]]


def test_average_precision_is_cocos_101_point_envelope():
    # one class, 2 objects: TP, FP, TP -> precision 1 to recall .5 (51 points), 2/3 to 1 (50 points)
    ap = average_precision(np.array([0.9, 0.8, 0.7]), np.array([0, 0, 0]), np.array([True, False, True]),
                           np.array([2]))
    assert ap == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_image_results_map_categories_to_labels_and_leave_crowd_regions_out():
    record = SimpleNamespace(image_id=5, file_name="a.png", labels=np.array([1, 0]), iscrowd=np.array([False, True]),
                             boxes=np.array([[0, 0, 10, 10], [50, 50, 100, 100]], np.float32), region=None)
    data = SimpleNamespace(records=[record], category_ids=[7, 9], num_classes=2)
    results = [{"image_id": 5, "category_id": 9, "bbox": [0, 0, 10, 10], "score": 0.9},
               {"image_id": 5, "category_id": 7, "bbox": [60, 60, 20, 20], "score": 0.8},   # inside the crowd
               {"image_id": 5, "category_id": 7, "bbox": [90, 90, 20, 20], "score": 0.7}]   # a quarter inside
    (image,) = image_results(data, results)
    assert image.gt_boxes.tolist() == [[0, 0, 10, 10]] and image.gt_labels.tolist() == [1]
    assert image.labels.tolist() == [1, 0] and image.scores.tolist() == [0.9, 0.7]
    assert image.boxes.tolist() == [[0, 0, 10, 10], [90, 90, 110, 110]]
