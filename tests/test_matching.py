"""IoU-threshold matching: thresholds, low-quality matches and their ties, crowd boxes, batching."""

from __future__ import annotations

import torch

from densedet.matching import BACKGROUND, IGNORE, Matcher, pad_targets

GT = [0.0, 0.0, 10.0, 10.0]


def _match(anchors, boxes_per_image, crowd_per_image=None, **kw):
    targets = []
    for i, boxes in enumerate(boxes_per_image):
        t = {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
             "labels": torch.zeros(len(boxes), dtype=torch.long)}
        if crowd_per_image is not None:
            t["iscrowd"] = torch.tensor(crowd_per_image[i], dtype=torch.bool)
        targets.append(t)
    return Matcher(**kw)(torch.tensor(anchors, dtype=torch.float32), pad_targets(targets)).matched_idxs


def _tall(h: float) -> list[float]:
    """[0, 0, 10, h] with h >= 10 has IoU 10 / h with GT."""
    return [0.0, 0.0, 10.0, h]


def test_iou_thresholds_foreground_ignore_band_and_background():
    # IoU 1, 0.5, 0.45, 0.4, 0.39, 0: [0.5, 1] foreground, [0.4, 0.5) ignored, < 0.4 background.
    anchors = [GT, _tall(20.0), _tall(10 / 0.45), _tall(25.0), _tall(10 / 0.39), [50.0, 50.0, 60.0, 60.0]]
    m = _match(anchors, [[GT]])
    assert m.tolist() == [[0, 0, IGNORE, IGNORE, BACKGROUND, BACKGROUND]]


def test_low_quality_match_is_assigned_when_the_best_iou_is_below_half():
    anchors = [_tall(30.0), _tall(40.0), [50.0, 50.0, 60.0, 60.0]]        # IoU 1/3, 1/4, 0
    assert _match(anchors, [[GT]]).tolist() == [[0, BACKGROUND, BACKGROUND]]
    assert _match(anchors, [[GT]], allow_low_quality_matches=False).tolist() == [[BACKGROUND] * 3]


def test_low_quality_ties_keep_every_anchor_with_the_best_iou():
    # Two anchors with IoU exactly 1/3 (one extends down, one up); both are kept.
    anchors = [_tall(30.0), [0.0, -20.0, 10.0, 10.0], _tall(40.0), [-20.0, 0.0, 10.0, 10.0]]
    assert _match(anchors, [[GT]]).tolist() == [[0, 0, BACKGROUND, 0]]


def test_low_quality_anchor_takes_its_own_best_box():
    # Anchor 0 is GT 0's best (IoU 1/3) but overlaps GT 1 more (IoU 0.45): it is matched to GT 1,
    # as torchvision and detectron2 do; GT 1's own best anchor is anchor 1 (IoU 1).
    gt1 = [0.0, 10.0, 10.0, 30.0]
    a0 = [0.0, 0.0, 10.0, 30.0]          # IoU with GT 0: 100/300; with GT 1: 200/300
    anchors = [a0, gt1, [40.0, 40.0, 50.0, 50.0]]
    m = _match(anchors, [[GT, gt1]])
    assert m.tolist() == [[1, 1, BACKGROUND]]


def test_empty_targets_make_every_anchor_background():
    anchors = [GT, _tall(20.0), [50.0, 50.0, 60.0, 60.0]]
    assert _match(anchors, [[]]).tolist() == [[BACKGROUND] * 3]
    assert _match(anchors, [[], [GT]]).tolist() == [[BACKGROUND] * 3, [0, 0, BACKGROUND]]


def test_a_box_overlapping_no_anchor_does_not_turn_iou_zero_anchors_into_foreground():
    anchors = [GT, _tall(30.0), [50.0, 50.0, 60.0, 60.0], [70.0, 0.0, 80.0, 10.0]]
    far = [200.0, 200.0, 210.0, 210.0]
    assert _match(anchors, [[far]]).tolist() == [[BACKGROUND] * 4]
    # Beside a normal box, only that box's anchors become foreground.
    assert _match(anchors, [[far, GT]]).tolist() == [[1, BACKGROUND, BACKGROUND, BACKGROUND]]


def test_crowd_boxes_are_never_matched_and_anchors_inside_them_are_ignored():
    crowd = [40.0, 40.0, 100.0, 100.0]
    anchors = [
        [50.0, 50.0, 60.0, 60.0],        # wholly inside the crowd region -> ignored
        [35.0, 35.0, 45.0, 45.0],        # 25% inside -> background
        list(crowd),                     # equal to the crowd box (IoU 1) -> still not foreground
        GT,                              # a real box's anchor stays foreground
        [200.0, 0.0, 210.0, 10.0],       # far away -> background
    ]
    m = _match(anchors, [[crowd, GT]], [[True, False]])
    assert m.tolist() == [[IGNORE, BACKGROUND, IGNORE, 1, BACKGROUND]]
    # A crowd box alone gives no low-quality matches either.
    m = _match(anchors, [[crowd]], [[True]])
    assert m.tolist() == [[IGNORE, BACKGROUND, IGNORE, BACKGROUND, BACKGROUND]]


def test_foreground_inside_a_crowd_region_stays_foreground():
    crowd = [0.0, 0.0, 100.0, 100.0]
    m = _match([GT, [50.0, 50.0, 60.0, 60.0]], [[crowd, GT]], [[True, False]])
    assert m.tolist() == [[1, IGNORE]]


# --- batched == per image == a brute-force reference ----------------------------------------------------

def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _reference(anchors, boxes, fg=0.5, bg=0.4):
    """Loops over anchors and boxes, in float64: threshold, then low-quality matches (ties, IoU > 0)."""
    out = []
    ious = [[_iou(b, a) for a in anchors] for b in boxes]
    for j in range(len(anchors)):
        col = [ious[g][j] for g in range(len(boxes))]
        if not col:
            out.append(BACKGROUND)
            continue
        best = max(col)
        arg = col.index(best)
        out.append(arg if best >= fg else (BACKGROUND if best < bg else IGNORE))
    for g in range(len(boxes)):
        best = max(ious[g])
        if best <= 0:
            continue
        for j in range(len(anchors)):
            if ious[g][j] == best:
                col = [ious[k][j] for k in range(len(boxes))]
                out[j] = col.index(max(col))
    return out


def _random_boxes(gen: torch.Generator, n: int, size: int = 64) -> list[list[float]]:
    # integer corners make exact IoU ties (and ties with the thresholds) common
    xy = torch.randint(0, size - 4, (n, 2), generator=gen)
    wh = torch.randint(2, 24, (n, 2), generator=gen)
    return torch.cat([xy, xy + wh], 1).float().tolist()


def test_batched_matching_equals_per_image_matching_and_a_brute_force_reference():
    gen = torch.Generator().manual_seed(0)
    anchors = _random_boxes(gen, 300)
    images = [_random_boxes(gen, n) for n in (5, 0, 1, 12)]
    batched = _match(anchors, images)
    assert batched.shape == (4, 300)
    for i, boxes in enumerate(images):
        alone = _match(anchors, [boxes])[0]
        assert torch.equal(batched[i], alone), i
        assert batched[i].tolist() == _reference(anchors, boxes), i
    assert (batched >= 0).any() and (batched == IGNORE).any()      # the case is not trivial


def test_pad_targets_marks_padding_and_crowd():
    t = [{"boxes": torch.tensor([GT, GT]), "labels": torch.tensor([3, 4]), "iscrowd": torch.tensor([0, 1])},
         {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    p = pad_targets(t)
    assert p.boxes.shape == (2, 2, 4)
    assert p.valid.tolist() == [[True, False], [False, False]]
    assert p.crowd.tolist() == [[False, True], [False, False]]
    assert p.labels.tolist() == [[3, 4], [0, 0]]


def test_matching_in_chunks_of_images_equals_matching_all_at_once():
    g = torch.Generator().manual_seed(7)
    xy = torch.rand(600, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + 8 + torch.rand(600, 2, generator=g) * 60], 1)
    targets = []
    for n in (5, 0, 9, 3, 7):                                  # an empty image among them
        p = torch.rand(n, 2, generator=g) * 180
        targets.append({"boxes": torch.cat([p, p + 10 + torch.rand(n, 2, generator=g) * 50], 1),
                        "labels": torch.randint(0, 4, (n,), generator=g),
                        "iscrowd": (torch.rand(n, generator=g) > 0.8).long()})
    padded = pad_targets(targets)
    whole = Matcher()
    whole.chunk_elements = 1 << 40
    reference = whole(anchors, padded).matched_idxs
    assert (reference >= 0).any() and (reference == -2).any()
    for per_chunk in (1, 2, 3):
        chunked = Matcher()
        chunked.chunk_elements = per_chunk * 9 * 600           # G = 9 boxes after padding
        assert torch.equal(chunked(anchors, padded).matched_idxs, reference)
