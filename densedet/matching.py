"""IoU-threshold anchor matching (RetinaNet), batched over the images of a batch.

Targets of a batch are padded to the largest box count (:func:`pad_targets`), so a single
``[B, G, A]`` IoU tensor serves every image and no Python loop runs over images or anchors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from .boxes import box_iou

__all__ = ["Matcher", "MatchResult", "pad_targets", "BACKGROUND", "IGNORE"]

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
