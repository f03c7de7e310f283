"""Anchor matching, batched over the images of a batch: RetinaNet's IoU-threshold
:class:`Matcher` and RefineDet's Caffe ``MatchBBox`` (:func:`match_anchors`).

Targets of a batch are padded to the largest box count (:func:`pad_targets`), so a single
``[B, G, A]`` IoU tensor serves every image and no Python loop runs over images or anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .boxes import box_iou

__all__ = ["Matcher", "MatchResult", "match_anchors", "pad_targets", "PaddedTargets", "BACKGROUND", "IGNORE"]

BACKGROUND = -1
IGNORE = -2


@dataclass
class PaddedTargets:
    """Targets of a batch padded to ``G = max boxes per image``.

    boxes ``[B, G, 4]``, labels ``[B, G]`` (long), valid ``[B, G]`` (a real box that is not crowd),
    crowd ``[B, G]`` (a real crowd box: never matched, its region is ignored).
    """

    boxes: Tensor
    labels: Tensor
    valid: Tensor
    crowd: Tensor


def pad_targets(targets: list[dict], device: torch.device | str = "cpu") -> PaddedTargets:
    """Stack a list of ``{"boxes": [N_i, 4], "labels": [N_i], "iscrowd"?: [N_i]}`` into padded tensors."""
    counts = torch.tensor([int(t["boxes"].shape[0]) for t in targets], device=device)
    g = max(int(counts.max()) if len(targets) else 0, 1)

    def stack(key: str, dtype: torch.dtype, tail: tuple[int, ...] = ()) -> Tensor:
        rows = [t[key].to(device=device, dtype=dtype).reshape(-1, *tail) if t.get(key) is not None
                else torch.zeros((int(t["boxes"].shape[0]), *tail), dtype=dtype, device=device) for t in targets]
        padded = pad_sequence(rows + [torch.zeros((g, *tail), dtype=dtype, device=device)], batch_first=True)
        return padded[:-1]

    present = torch.arange(g, device=device).unsqueeze(0) < counts.unsqueeze(1)
    crowd = stack("iscrowd", torch.bool) & present
    return PaddedTargets(stack("boxes", torch.float32, (4,)), stack("labels", torch.long), present & ~crowd, crowd)


def class_unknown(targets: list[dict], device: torch.device | str = "cpu") -> Tensor:
    """``[B]`` bool: the images whose target says their objects' classes are unknown
    (``target["class_unknown"]``: a mirror that may change them, ``data.hflip_keeps_class``)."""
    return torch.tensor([bool(t.get("class_unknown", False)) for t in targets], dtype=torch.bool, device=device)


@dataclass
class MatchResult:
    """matched_idxs ``[B, A]``: index of the matched box, or BACKGROUND (-1) / IGNORE (-2).

    ``foreground [B, A]`` is ``matched_idxs >= 0``.
    """

    matched_idxs: Tensor

    @property
    def foreground(self) -> Tensor:
        return self.matched_idxs >= 0

    @property
    def ignored(self) -> Tensor:
        return self.matched_idxs == IGNORE


class Matcher:
    """Assign each anchor a ground-truth box by IoU (Lin et al. 2017, section 4 "Inference and training").

    IoU >= ``fg_iou_thresh`` is foreground, < ``bg_iou_thresh`` background, in between ignored.
    With ``allow_low_quality_matches`` every box also keeps the anchors that reach its highest IoU
    (ties included); such an anchor takes its *own* best box, as torchvision and detectron2 do.
    Unlike both, a box whose best IoU is 0 (it overlaps no anchor at all) does not make every
    anchor with IoU 0 "its best" — that bug would turn background anchors into foreground.

    Crowd boxes take no part in matching; an anchor that lies at least ``fg_iou_thresh`` inside a
    crowd region (intersection over anchor area) and is not foreground is ignored, since it may
    well show an object of the crowd (mmdetection's ``ignore_iof_thr`` idea).
    """

    def __init__(self, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.4,
                 allow_low_quality_matches: bool = True) -> None:
        if not 0.0 <= bg_iou_thresh <= fg_iou_thresh <= 1.0:
            raise ValueError(f"need 0 <= bg_iou_thresh ({bg_iou_thresh}) <= fg_iou_thresh ({fg_iou_thresh}) <= 1")
        self.fg_iou_thresh = fg_iou_thresh
        self.bg_iou_thresh = bg_iou_thresh
        self.allow_low_quality_matches = allow_low_quality_matches

    # Images are matched together while their [chunk, G, A] IoU matrix stays below this many
    # elements (16 MB in fp32), one at a time beyond. This bounds the matcher's memory: the
    # all-at-once [8, 100, 120k] matrix is 384 MB, with several temporaries of that size. Speed is
    # about the same either way (``densedet bench --suite match``: loop, all at once and chunked
    # within 7% of each other at batch 8, interleaved repeats).
    chunk_elements: int = 1 << 22

    def __call__(self, anchors: Tensor, targets: PaddedTargets) -> MatchResult:
        """anchors ``[A, 4]``; targets padded to ``[B, G]`` → :class:`MatchResult` with ``[B, A]``."""
        bsz, g = targets.valid.shape
        n = max(1, self.chunk_elements // max(1, g * anchors.shape[0]))      # images per chunk
        fields = (targets.boxes, targets.labels, targets.valid, targets.crowd)
        parts = [self._match(anchors, PaddedTargets(*(f[i:i + n] for f in fields))) for i in range(0, bsz, n)]
        return MatchResult(parts[0] if len(parts) == 1 else torch.cat(parts))

    def _match(self, anchors: Tensor, targets: PaddedTargets) -> Tensor:
        bsz, g = targets.valid.shape
        iou = box_iou(targets.boxes, anchors.unsqueeze(0).expand(bsz, -1, -1))   # [B, G, A]
        iou = iou.masked_fill(~targets.valid.unsqueeze(-1), -1.0)
        best_iou, matched = iou.max(dim=1)                                        # [B, A]
        matched_idxs = torch.where(best_iou >= self.fg_iou_thresh, matched,
                                   torch.full_like(matched, IGNORE))
        matched_idxs = torch.where(best_iou < self.bg_iou_thresh, torch.full_like(matched, BACKGROUND),
                                   matched_idxs)
        if self.allow_low_quality_matches:
            best_per_gt = iou.max(dim=2, keepdim=True).values                     # [B, G, 1]
            is_best = (iou == best_per_gt) & (best_per_gt > 0) & targets.valid.unsqueeze(-1)
            low_quality = is_best.any(dim=1)                                      # [B, A]
            matched_idxs = torch.where(low_quality, matched, matched_idxs)
        if targets.crowd.any():
            inter_over_anchor = _intersection_over_second(targets.boxes, anchors)  # [B, G, A]
            inside_crowd = (inter_over_anchor.masked_fill(~targets.crowd.unsqueeze(-1), 0.0)
                            .max(dim=1).values >= self.fg_iou_thresh)
            matched_idxs = torch.where(inside_crowd & (matched_idxs < 0),
                                       torch.full_like(matched_idxs, IGNORE), matched_idxs)
        return matched_idxs


def _intersection_over_second(boxes: Tensor, anchors: Tensor) -> Tensor:
    """``[B, G, 4]`` × ``[A, 4]`` → intersection area / anchor area, ``[B, G, A]``."""
    lt = torch.maximum(boxes[..., None, :2], anchors[None, None, :, :2])
    rb = torch.minimum(boxes[..., None, 2:], anchors[None, None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area = (anchors[:, 2:] - anchors[:, :2]).clamp(min=0).prod(-1)
    return inter / area.clamp(min=1e-6)


# -- RefineDet (Caffe MatchBBox, PER_PREDICTION) ----------------------------------------------

def _sortable_key(iou: Tensor) -> Tensor:
    """int64 keys ordering ``iou [..., A]`` by value, ties by *lower* anchor index first.

    Non-negative float32 bit patterns read as int32 sort like the values (masked rows hold -1,
    whose keys are negative and never usable); the low
    32 bits hold ``A - 1 - index``. So ``topk``/``argmax`` on the keys reproduce Caffe's scan order
    (first anchor wins a tie) exactly, which a float tie-break epsilon could not guarantee.
    """
    num_anchors = iou.shape[-1]
    bits = iou.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    index = torch.arange(num_anchors, device=iou.device, dtype=torch.int64)
    return (bits << 32) | (num_anchors - 1 - index)


def _top_candidates(iou: Tensor, k: int) -> Tensor:
    """The ``k`` best anchors of every GT as :func:`_sortable_key` keys, ``[B, G, k]``, descending.

    A float ``topk`` breaks ties arbitrarily; that matters only for a GT whose usable IoU
    (> 1e-6) ties across the k-th place (e.g. a large box containing many equal anchors). Those
    rows alone are redone with keys over all anchors.
    """
    num_anchors = iou.shape[-1]
    values, index = iou.topk(min(k + 1, num_anchors), dim=-1)
    bits = values[..., :k].to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    keys = (bits << 32) | (num_anchors - 1 - index[..., :k])
    if k < num_anchors:
        tied = (values[..., k] == values[..., k - 1]) & (values[..., k] > 1e-6)  # [B, G]
        if bool(tied.any()):
            keys[tied] = _sortable_key(iou[tied]).topk(k, dim=-1).values
    # within the k, equal IoUs must still be ordered by anchor index
    return keys.sort(dim=-1, descending=True).values


def match_anchors(anchors: Tensor, gt_boxes: Tensor, gt_valid: Tensor, iou_threshold: float = 0.5) -> Tensor:
    """Caffe ``MatchBBox`` (``match_type: PER_PREDICTION``), batched over images.

    1. Bipartite step: repeatedly take the globally largest IoU among (free anchor, unmatched GT)
       pairs with IoU > 1e-6 and match them, until every GT has an anchor. So two GTs wanting the
       same anchor are resolved in favour of the larger IoU and the other takes its best *free*
       anchor; ties go to the lower anchor index, then the lower GT index (Caffe's scan order).
    2. Per-prediction step: every other anchor takes the GT of largest IoU if that IoU is
       ``>= iou_threshold`` (ties: lower GT index).

    Vectorised over the batch: a GT can only be pushed off its first ``G - 1`` choices, so its best
    free anchor is always among its top ``G`` anchors; the greedy loop then runs ``<= G`` steps on
    a ``[B, G, G]`` candidate tensor, each step matching one pair in every image.

    Args:
        anchors: ``[A, 4]`` shared, or ``[B, A, 4]`` per image (the ODM's refined anchors).
        gt_boxes: ``[B, G, 4]`` padded ground truth.
        gt_valid: ``[B, G]`` bool, False for padding (and crowd boxes).

    Returns:
        ``[B, A]`` long: the matched GT index, or -1 for a negative anchor.
    """
    bsz, num_gt = gt_valid.shape
    if anchors.dim() == 2:
        anchors = anchors.unsqueeze(0).expand(bsz, -1, -1)
    num_anchors = anchors.shape[1]
    device = anchors.device
    matched = torch.full((bsz, num_anchors), -1, dtype=torch.int64, device=device)
    if num_gt == 0 or num_anchors == 0:
        return matched
    iou = box_iou(gt_boxes, anchors)  # [B, G, A] fp32
    iou[~gt_valid] = -1.0  # padding and crowd rows: never usable (the keys of negatives sort last)

    k = min(num_gt, num_anchors)
    cand_key = _top_candidates(iou, k)                           # [B, G, k], distinct keys
    cand_anchor = num_anchors - 1 - (cand_key & 0xFFFFFFFF)      # [B, G, k]
    cand_iou = (cand_key >> 32).to(torch.int32).view(torch.float32)
    taken = torch.zeros((bsz, num_anchors), dtype=torch.bool, device=device)
    gt_free = gt_valid.clone()
    batch_index = torch.arange(bsz, device=device)
    for _ in range(num_gt):
        anchor_free = ~taken.gather(1, cand_anchor.flatten(1)).view_as(cand_anchor)
        usable = gt_free.unsqueeze(-1) & anchor_free & (cand_iou > 1e-6)
        key = torch.where(usable, cand_key, torch.full_like(cand_key, -1)).flatten(1)  # [B, G*k]
        best = key.argmax(dim=1)  # equal keys only for the same anchor: first = lower GT index
        found = key.gather(1, best[:, None])[:, 0] >= 0
        if not bool(found.any()):
            break
        b = batch_index[found]
        gt = best[found] // k
        anchor = cand_anchor.flatten(1)[b, best[found]]
        matched[b, anchor] = gt
        taken[b, anchor] = True
        gt_free[b, gt] = False

    best_gt = iou.argmax(dim=1)  # [B, A], first maximum = lower GT index
    best_iou = iou.gather(1, best_gt[:, None, :])[:, 0]
    per_prediction = ~taken & (best_iou >= iou_threshold)
    return torch.where(per_prediction, best_gt, matched)
