"""Box operations: areas, IoU / GIoU, clipping, the box coder, NMS and its variants.

Every box in densedet is ``(x1, y1, x2, y2)`` in continuous pixel coordinates: a box covering
pixels 0..9 is ``(0, 0, 10, 10)`` and has width 10. There is no "+1" anywhere (the convention of
pycocotools and mmdetection, see SPEC "Evaluation").

Overlaps, decoding and NMS are computed in at least float32: bf16 keeps 8 mantissa bits, so an
800 px coordinate would already be off by ±2 px, and fp16 cannot represent areas above 65504.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

try:  # optional: torchvision's CUDA NMS kernel is used for CUDA tensors when it is installed
    import torchvision as _torchvision
except Exception:  # pragma: no cover - torchvision is never required
    _torchvision = None

__all__ = [
    "box_area",
    "box_iou",
    "elementwise_box_iou",
    "generalized_box_iou",
    "elementwise_giou",
    "clip_boxes",
    "BoxCoder",
    "nms",
    "batched_nms",
    "soft_nms",
    "box_voting",
]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype overlaps and decoding run in: float32, or float64 if any input already is."""
    dtype = torch.float32
    for t in tensors:
        if t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def _check_last_dim(boxes: Tensor, name: str, size: int = 4) -> None:
    if boxes.shape[-1:] != (size,):
        raise ValueError(f"{name} must have shape [..., {size}], got {tuple(boxes.shape)}")


# ----------------------------------------------------------------------------------------------
# Areas and overlaps
# ----------------------------------------------------------------------------------------------


def box_area(boxes: Tensor) -> Tensor:
    """Area of ``(x1, y1, x2, y2)`` boxes.

    Args:
        boxes: ``[..., 4]``.

    Returns:
        ``[...]`` in the dtype of ``boxes``; ``(x2 - x1) * (y2 - y1)``, negative for inverted boxes
        (callers validate boxes where they are read).
    """
    _check_last_dim(boxes, "boxes")
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _pairwise_inter_union(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union areas of every pair, ``[..., N, M]`` each, in fp32 or fp64."""
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    dtype = _compute_dtype(boxes1, boxes2)
    a = boxes1.to(dtype).unsqueeze(-2)  # [..., N, 1, 4]
    b = boxes2.to(dtype).unsqueeze(-3)  # [..., 1, M, 4]
    return _inter_union(a, b)


def _inter_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Intersection and union of broadcastable box tensors ``a`` and ``b`` (already >= fp32).

    Works coordinate by coordinate so that every intermediate is a contiguous ``[..., N, M]``
    tensor: this is the inner loop of matching and NMS.
    """
    inter_w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    inter_h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = inter_w * inter_h
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with 0 where both are 0: a zero-area union gives IoU 0, not NaN.

    The union of valid boxes is never smaller than their intersection, so ``den == 0`` implies
    ``num == 0`` and ``0 / 0 = NaN`` is the only case to map.
    """
    return torch.nan_to_num(num / den, nan=0.0)


def box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection-over-union.

    Args:
        boxes1: ``[N, 4]`` or batched ``[B, N, 4]`` (any leading dims that broadcast with boxes2's).
        boxes2: ``[M, 4]`` or batched ``[B, M, 4]``.

    Returns:
        ``[N, M]`` (resp. ``[B, N, M]``), float32 (float64 if an input is float64): bf16/fp16
        inputs are cast up before the areas are formed. Pairs whose union has zero area
        (two degenerate boxes) get IoU 0.
    """
    inter, union = _pairwise_inter_union(boxes1, boxes2)
    return _safe_div(inter, union)


def elementwise_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of corresponding boxes (not all pairs).

    Args:
        boxes1: ``[..., 4]``.
        boxes2: ``[..., 4]``, broadcastable with ``boxes1``.

    Returns:
        ``[...]`` float32 (float64 if an input is float64); 0 where the union is empty.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    dtype = _compute_dtype(boxes1, boxes2)
    inter, union = _inter_union(boxes1.to(dtype), boxes2.to(dtype))
    return _safe_div(inter, union)


def _giou_from(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of broadcastable boxes ``a``, ``b`` (already >= fp32): IoU - (hull - union) / hull."""
    inter, union = _inter_union(a, b)
    iou = _safe_div(inter, union)
    hull_wh = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    # A zero-area hull means both boxes are the same degenerate point/line: no hull penalty.
    return iou - _safe_div(hull - union, hull)


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise generalized IoU (Rezatofighi et al., CVPR 2019), in ``[-1, 1]``.

    Args:
        boxes1: ``[N, 4]`` (or ``[B, N, 4]``).
        boxes2: ``[M, 4]`` (or ``[B, M, 4]``).

    Returns:
        ``[N, M]`` (resp. ``[B, N, M]``), float32 (float64 if an input is float64).
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    dtype = _compute_dtype(boxes1, boxes2)
    return _giou_from(boxes1.to(dtype).unsqueeze(-2), boxes2.to(dtype).unsqueeze(-3))


def elementwise_giou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Generalized IoU of corresponding boxes, as used by the GIoU loss (``1 - giou``).

    Args:
        boxes1: ``[..., 4]``.
        boxes2: ``[..., 4]``, broadcastable with ``boxes1``.

    Returns:
        ``[...]`` in ``[-1, 1]``, float32 (float64 if an input is float64). Differentiable.
    """
    _check_last_dim(boxes1, "boxes1")
    _check_last_dim(boxes2, "boxes2")
    dtype = _compute_dtype(boxes1, boxes2)
    return _giou_from(boxes1.to(dtype), boxes2.to(dtype))


def clip_boxes(boxes: Tensor, size: tuple[int, int] | Tensor) -> Tensor:
    """Clip boxes to an image of height ``h`` and width ``w``: x into ``[0, w]``, y into ``[0, h]``.

    Args:
        boxes: ``[..., 4]``.
        size: ``(h, w)``, or a tensor ``[..., 2]`` of ``(h, w)`` whose leading dims line up with the
            *leading* dims of ``boxes`` (e.g. per-image sizes ``[B, 2]`` for boxes ``[B, N, 4]``);
            missing trailing dims are added, then ordinary broadcasting applies.

    Returns:
        ``[..., 4]``, same dtype as ``boxes``.
    """
    _check_last_dim(boxes, "boxes")
    if isinstance(size, Tensor):
        _check_last_dim(size, "size", 2)
        size = size.to(device=boxes.device, dtype=boxes.dtype)
        while size.dim() < boxes.dim():
            size = size.unsqueeze(-2)  # [B, 2] -> [B, 1, 2]: one size per leading index of boxes
        h, w = size[..., 0:1], size[..., 1:2]
        x = boxes[..., 0::2].clamp(min=0).minimum(w)
        y = boxes[..., 1::2].clamp(min=0).minimum(h)
    else:
        h, w = size
        x = boxes[..., 0::2].clamp(min=0, max=w)
        y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


# ----------------------------------------------------------------------------------------------
# Box coder
# ----------------------------------------------------------------------------------------------


class BoxCoder:
    """Encode boxes as (dx, dy, dw, dh) offsets relative to anchors, and back.

    With anchor centre ``(ax, ay)``, size ``(aw, ah)`` and ground-truth centre/size
    ``(gx, gy, gw, gh)`` (no "+1")::

        dx = wx * (gx - ax) / aw        dw = ww * log(gw / aw)
        dy = wy * (gy - ay) / ah        dh = wh * log(gh / ah)

    RetinaNet uses weights (1, 1, 1, 1). The SSD/RefineDet coder with "variances"
    ``(v_xy, v_xy, v_wh, v_wh) = (0.1, 0.1, 0.2, 0.2)`` divides by the variances instead, which is
    exactly this coder with weights ``1 / v = (10, 10, 5, 5)`` (see :meth:`from_variances`).

    When decoding, ``dw`` and ``dh`` are clamped from above at ``clamp`` (default
    ``log(1000 / 16)``, so no box grows beyond 62.5x its anchor): an untrained head can emit large
    values and ``exp`` would overflow to inf. Like torchvision and detectron2 we clamp only the
    maximum; a very negative value just shrinks the box towards zero size, which is harmless.

    Encoding a degenerate ground truth (zero width or height) gives ``-inf`` in dw/dh; nothing is
    raised here because boxes are validated where they enter (the dataset reader).
    """

    def __init__(
        self,
        weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0),
        clamp: float = math.log(1000.0 / 16),
    ) -> None:
        if len(weights) != 4 or any(not w > 0 for w in weights):
            raise ValueError(f"BoxCoder weights must be 4 positive numbers, got {weights!r}")
        self.weights = tuple(float(w) for w in weights)
        self.clamp = float(clamp)

    @classmethod
    def from_variances(
        cls, variances: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2), clamp: float = math.log(1000.0 / 16)
    ) -> "BoxCoder":
        """The SSD/RefineDet coder: ``deltas = offsets / variances``, i.e. weights ``1 / variances``."""
        if len(variances) != 4 or any(not v > 0 for v in variances):
            raise ValueError(f"BoxCoder variances must be 4 positive numbers, got {variances!r}")
        return cls(weights=tuple(1.0 / v for v in variances), clamp=clamp)

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, clamp={self.clamp:.4f})"

    @staticmethod
    def _centre_size(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w = boxes[..., 2] - boxes[..., 0]
        h = boxes[..., 3] - boxes[..., 1]
        return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h

    def encode(self, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
        """Regression targets of ``gt_boxes`` relative to ``anchors``.

        Args:
            gt_boxes: ``[..., 4]`` valid boxes (positive width and height).
            anchors: ``[..., 4]``, broadcastable with ``gt_boxes``.

        Returns:
            deltas ``[..., 4]`` (dx, dy, dw, dh), float32 (float64 if an input is float64).
        """
        _check_last_dim(gt_boxes, "gt_boxes")
        _check_last_dim(anchors, "anchors")
        dtype = _compute_dtype(gt_boxes, anchors)
        gx, gy, gw, gh = self._centre_size(gt_boxes.to(dtype))
        ax, ay, aw, ah = self._centre_size(anchors.to(dtype))
        wx, wy, ww, wh = self.weights
        return torch.stack(
            (wx * (gx - ax) / aw, wy * (gy - ay) / ah, ww * torch.log(gw / aw), wh * torch.log(gh / ah)),
            dim=-1,
        )

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """Boxes from ``deltas`` applied to ``anchors``.

        Args:
            deltas: ``[..., 4]`` (dx, dy, dw, dh), any float dtype.
            anchors: ``[..., 4]``, broadcastable with ``deltas``.

        Returns:
            boxes ``[..., 4]``, float32 (float64 if an input is float64).
        """
        _check_last_dim(deltas, "deltas")
        _check_last_dim(anchors, "anchors")
        # Always decode in fp32: bf16 has 8 mantissa bits, so an 800 px coordinate computed in bf16
        # would be off by up to 2 px (and fp16 overflows past 65504); heads may run in bf16 autocast.
        dtype = _compute_dtype(deltas, anchors)
        deltas = deltas.to(dtype)
        ax, ay, aw, ah = self._centre_size(anchors.to(dtype))
        wx, wy, ww, wh = self.weights
        dx = deltas[..., 0] / wx
        dy = deltas[..., 1] / wy
        dw = (deltas[..., 2] / ww).clamp(max=self.clamp)
        dh = (deltas[..., 3] / wh).clamp(max=self.clamp)
        cx = ax + dx * aw
        cy = ay + dy * ah
        half_w = 0.5 * aw * torch.exp(dw)
        half_h = 0.5 * ah * torch.exp(dh)
        return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


# ----------------------------------------------------------------------------------------------
# Non-maximum suppression
# ----------------------------------------------------------------------------------------------

# Boxes are resolved in blocks of this many (in score order). Within a block the greedy answer is a
# short fixed-point iteration on a [B, B] matrix; the block's kept boxes then suppress all later
# boxes in one [K, rest] IoU. So the Python loop runs over ceil(N / B) blocks, never over boxes.
_NMS_BLOCK = 256


def _check_nms_inputs(boxes: Tensor, scores: Tensor, idxs: Tensor | None = None) -> None:
    if boxes.dim() != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"boxes must have shape [N, 4], got {tuple(boxes.shape)}")
    if scores.shape != boxes.shape[:1]:
        raise ValueError(f"scores must have shape [N] = [{boxes.shape[0]}], got {tuple(scores.shape)}")
    if idxs is not None and idxs.shape != boxes.shape[:1]:
        raise ValueError(f"idxs must have shape [N] = [{boxes.shape[0]}], got {tuple(idxs.shape)}")


def _score_order(scores: Tensor) -> Tensor:
    """Indices by decreasing score; ties keep the lower index first (stable sort)."""
    return torch.sort(scores, descending=True, stable=True).indices


def _resolve_block(suppress: Tensor, alive: Tensor) -> Tensor:
    """Greedy NMS inside one block, given which boxes earlier blocks already removed.

    ``suppress[i, j]`` (only ``i < j`` may be True) says box i removes box j if i is kept. The greedy
    answer is the unique ``keep`` with ``keep[j] = alive[j] and not any_i(keep[i] and suppress[i, j])``
    (unique because ``keep[j]`` depends only on earlier entries). Iterating that equation from
    ``keep = alive`` fixes entry t for good by pass t+1 (induction on t), so it converges in at most
    ``B`` passes; in practice chains of suppression are short and it stops after a few, as soon as a
    pass changes nothing (a fixed point, hence the unique greedy answer).
    """
    keep = alive
    suppress_f = suppress.to(torch.float32)
    for _ in range(suppress.shape[0]):
        removed = (keep.to(torch.float32) @ suppress_f) > 0
        new_keep = alive & ~removed
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def _greedy_nms_sorted(boxes: Tensor, iou_threshold: float, labels: Tensor | None) -> Tensor:
    """Exact greedy NMS of boxes already sorted by decreasing score.

    Args:
        boxes: ``[N, 4]`` fp32/fp64, sorted by score.
        labels: ``[N]`` or None. If given, boxes with different labels never suppress each other,
            and boxes must be grouped by label (contiguous), which bounds the later boxes a block
            has to look at to the end of its last label.

    Returns:
        keep mask ``[N]`` bool.
    """
    n = boxes.shape[0]
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    keep = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    if labels is not None:
        # end of each label's run, so a block only compares against boxes of its own labels
        _, counts = torch.unique_consecutive(labels, return_counts=True)
        run_end = torch.repeat_interleave(torch.cumsum(counts, 0), counts)
    for start in range(0, n, _NMS_BLOCK):
        end = min(start + _NMS_BLOCK, n)
        block = boxes[start:end]
        over = box_iou(block, block) > iou_threshold
        over = torch.triu(over, diagonal=1)
        if labels is not None:
            over &= labels[start:end, None] == labels[None, start:end]
        block_keep = _resolve_block(over, ~suppressed[start:end])
        keep[start:end] = block_keep
        stop = n if labels is None else int(run_end[end - 1])
        if stop > end and bool(block_keep.any()):
            # only later boxes still in the running: already-suppressed ones need no second reason
            later = torch.nonzero(~suppressed[end:stop]).squeeze(1) + end
            later_over = box_iou(block[block_keep], boxes[later]) > iou_threshold
            if labels is not None:
                later_over &= labels[start:end][block_keep][:, None] == labels[None, later]
            suppressed[later] = later_over.any(0)
    return keep


def _use_torchvision(boxes: Tensor) -> bool:
    return _torchvision is not None and boxes.is_cuda


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Exact greedy non-maximum suppression.

    Visits boxes by decreasing score and removes every later box whose IoU with a kept box is
    ``> iou_threshold`` (so threshold 1 keeps everything; IoU is computed in fp32). Same result as
    the classic sequential loop, computed with a few tensor passes per block of 256 boxes. Ties in
    score are visited lower index first (stable sort). On CUDA, if torchvision is installed, its
    kernel is used instead.

    Args:
        boxes: ``[N, 4]``.
        scores: ``[N]``.
        iou_threshold: boxes overlapping a kept box by more than this are removed.

    Returns:
        ``LongTensor[K]`` indices into ``boxes`` of the kept boxes, by decreasing score.
    """
    _check_nms_inputs(boxes, scores)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if _use_torchvision(boxes):
        return _torchvision.ops.nms(boxes.float(), scores.float(), float(iou_threshold))
    order = _score_order(scores)
    keep = _greedy_nms_sorted(boxes[order].to(_compute_dtype(boxes)), iou_threshold, None)
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """Class-wise NMS: boxes with different ``idxs`` never suppress each other.

    On CPU (our implementation) boxes are sorted by (class, decreasing score) and the
    suppression test is masked to same-class pairs, which is exact and only compares boxes within
    a class. We do not use the usual trick of offsetting each class by ``idx * (max_coord + 1)``
    there: with 80 classes of 1333 px images the offsets reach 1e5, where fp32 keeps only ~0.01 px
    of resolution, so IoUs near the threshold could flip. On CUDA with torchvision installed,
    ``torchvision.ops.batched_nms`` (which uses that offset trick) is called.

    Args:
        boxes: ``[N, 4]``.
        scores: ``[N]``.
        idxs: ``[N]`` integer class (or image, or image*classes + class) of each box.
        iou_threshold: as in :func:`nms`.

    Returns:
        ``LongTensor[K]`` indices of kept boxes, by decreasing score (ties: lower index first).
    """
    _check_nms_inputs(boxes, scores, idxs)
    if boxes.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=boxes.device)
    if _use_torchvision(boxes):
        return _torchvision.ops.batched_nms(boxes.float(), scores.float(), idxs, float(iou_threshold))
    by_score = _score_order(scores)
    by_class = torch.sort(idxs[by_score], stable=True).indices
    order = by_score[by_class]  # grouped by class, decreasing score inside each class
    keep_mask = _greedy_nms_sorted(boxes[order].to(_compute_dtype(boxes)), iou_threshold, idxs[order])
    kept = torch.sort(order[keep_mask]).values  # back to index order so score ties stay stable
    return kept[_score_order(scores[kept])]


# ----------------------------------------------------------------------------------------------
# Soft-NMS and box voting: inherently sequential within a class, so every class advances at once
# ----------------------------------------------------------------------------------------------


def _pick_top_per_class(key: Tensor, classes: Tensor, num_classes: int, active: Tensor) -> Tensor:
    """For every class, the index of its highest ``key`` among ``active`` boxes (ties: lowest index).

    Returns ``[num_classes]`` long indices, ``-1`` for classes with no active box.
    """
    n = key.shape[0]
    masked = torch.where(active, key, torch.full_like(key, -math.inf))
    best = torch.full((num_classes,), -math.inf, dtype=key.dtype, device=key.device)
    best = best.scatter_reduce(0, classes, masked, reduce="amax")
    is_best = active & (masked == best[classes])
    index = torch.arange(n, device=key.device)
    first = torch.full((num_classes,), n, dtype=torch.int64, device=key.device)
    first = first.scatter_reduce(0, classes, torch.where(is_best, index, n), reduce="amin")
    return torch.where(first < n, first, -1)


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    method: Literal["linear", "gaussian"] = "linear",
    score_threshold: float = 0.001,
) -> tuple[Tensor, Tensor]:
    """Class-wise Soft-NMS (Bodla et al., ICCV 2017).

    Repeatedly pick the highest-scoring remaining box of each class and decay the scores of the
    other remaining boxes of that class by its IoU with them: ``linear`` multiplies by ``1 - IoU``
    when ``IoU > iou_threshold``; ``gaussian`` multiplies every box by ``exp(-IoU**2 / sigma)``
    (the paper's defaults: linear N_t = 0.3, gaussian sigma = 0.5). Boxes whose score falls below
    ``score_threshold`` are dropped (a dropped box could only ever decay boxes scoring even lower).
    Classes advance in lockstep: the Python loop runs once per pick within the largest class.

    Args:
        boxes: ``[N, 4]``.
        scores: ``[N]``.
        idxs: ``[N]`` integer class of each box.

    Returns:
        ``(keep, new_scores)``: ``LongTensor[K]`` indices into ``boxes`` and their decayed scores
        ``[K]`` (fp32), by decreasing new score (ties: lower index first).
    """
    _check_nms_inputs(boxes, scores, idxs)
    if method not in ("linear", "gaussian"):
        raise ValueError(f"soft_nms method must be 'linear' or 'gaussian', got {method!r}")
    if method == "gaussian" and not sigma > 0:
        raise ValueError(f"soft_nms sigma must be > 0, got {sigma}")
    dtype = _compute_dtype(boxes, scores)
    boxes = boxes.to(dtype)
    current = scores.to(dtype).clone()
    classes, slot = torch.unique(idxs, return_inverse=True)
    num_classes = classes.numel()
    remaining = current >= score_threshold
    picked = torch.zeros_like(remaining)
    while bool(remaining.any()):
        top = _pick_top_per_class(current, slot, num_classes, remaining)
        has_top = top >= 0
        picked[top[has_top]] = True
        remaining[top[has_top]] = False
        top_of_box = top[slot]  # [N] the pick of each box's class (-1: none)
        affected = remaining & (top_of_box >= 0)
        iou = elementwise_box_iou(boxes, boxes[top_of_box.clamp(min=0)])
        if method == "linear":
            weight = torch.where(iou > iou_threshold, 1.0 - iou, torch.ones_like(iou))
        else:
            weight = torch.exp(-(iou * iou) / sigma)
        current = torch.where(affected, current * weight, current)
        remaining &= current >= score_threshold
    keep = torch.nonzero(picked).squeeze(1)
    keep = keep[_score_order(current[keep])]
    return keep, current[keep]


def box_voting(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float = 0.45,
    soft: bool = False,
    soft_score_threshold: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Class-wise box voting, RefineDet's merge for multi-scale testing (SPEC "Test-time augmentation").

    Repeatedly, within each class, take the highest-scoring remaining box, group it with every
    remaining box of the same class whose IoU with it is ``>= iou_threshold``, remove the group, and
    output the score-weighted mean of the group's boxes with the group's max score (the top box's).
    With ``soft=True`` every grouped box other than the top one is also re-emitted, unchanged, with
    score ``score * (1 - IoU with the top box)`` if that is ``>= soft_score_threshold`` (RefineDet's
    ``soft_bbox_vote`` uses its confidence threshold, 0.01). As in RefineDet's script, a group of one
    box is output as it is. Classes advance in lockstep: the Python loop runs once per group within
    the class with the most groups.

    Args:
        boxes: ``[N, 4]``.
        scores: ``[N]`` non-negative (they are the averaging weights).
        idxs: ``[N]`` integer class of each box.

    Returns:
        ``(boxes [K, 4], scores [K], labels [K])`` fp32 boxes/scores (fp64 if inputs were), labels
        from ``idxs``, by decreasing score.
    """
    _check_nms_inputs(boxes, scores, idxs)
    dtype = _compute_dtype(boxes, scores)
    boxes = boxes.to(dtype)
    scores = scores.to(dtype)
    classes, slot = torch.unique(idxs, return_inverse=True)
    num_classes = classes.numel()
    remaining = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    out_boxes, out_scores, out_labels = [], [], []
    while bool(remaining.any()):
        top = _pick_top_per_class(scores, slot, num_classes, remaining)
        has_top = top >= 0
        top_of_box = top[slot]
        iou = elementwise_box_iou(boxes, boxes[top_of_box.clamp(min=0)])
        is_top = torch.zeros_like(remaining)
        is_top[top[has_top]] = True
        # the top box always joins its own group, even if it is degenerate (IoU 0 with itself)
        group = remaining & (top_of_box >= 0) & ((iou >= iou_threshold) | is_top)
        weight = torch.where(group, scores, torch.zeros_like(scores))
        weight_sum = torch.zeros(num_classes, dtype=dtype, device=boxes.device).index_add_(0, slot, weight)
        weighted = torch.zeros(num_classes, 4, dtype=dtype, device=boxes.device)
        weighted.index_add_(0, slot, boxes * weight[:, None])
        top_boxes = boxes[top[has_top]]
        sums = weight_sum[has_top]
        # all-zero scores in a group: the weighted mean is undefined, fall back to the top box
        mean = torch.where(sums[:, None] > 0, weighted[has_top] / sums.clamp(min=1e-30)[:, None], top_boxes)
        out_boxes.append(mean)
        out_scores.append(scores[top[has_top]])
        out_labels.append(idxs[top[has_top]])
        if soft:
            decayed = scores * (1.0 - iou)
            extra = group & ~is_top & (decayed >= soft_score_threshold)
            out_boxes.append(boxes[extra])
            out_scores.append(decayed[extra])
            out_labels.append(idxs[extra])
        remaining &= ~group
    if not out_boxes:
        return boxes.new_zeros((0, 4)), scores.new_zeros((0,)), idxs.new_zeros((0,))
    all_boxes = torch.cat(out_boxes)
    all_scores = torch.cat(out_scores)
    all_labels = torch.cat(out_labels)
    order = _score_order(all_scores)
    return all_boxes[order], all_scores[order], all_labels[order]
