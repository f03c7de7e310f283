"""Anchor sizes, order, counts and strides of the canonical and the torchvision-compatible presets."""

from __future__ import annotations

import math

import pytest
import torch

from densedet import build_model
from densedet.anchors import AnchorGenerator, feature_size, retinanet_anchor_sizes

SQRT2 = math.sqrt(2.0)


def _small(name: str, **kw):
    """A preset with thin FPN/heads: the anchors are the preset's, the forward pass is cheap."""
    return build_model(name, num_classes=2, fpn_channels=16, head_convs=1, **kw).eval()


def _canonical_generator() -> AnchorGenerator:
    return build_model("retinanet_r18_fpn", num_classes=2, fpn_channels=16, head_convs=1).anchor_generator


def _torchvision_generator() -> AnchorGenerator:
    return build_model("retinanet_r18_fpn", num_classes=2, fpn_channels=16, head_convs=1,
                       anchor_integer_sizes=True, round_cell_anchors=True, stride_mode="inferred",
                       size_divisible=32, p6_from="p5").anchor_generator


# --- sizes and cell anchors ---------------------------------------------------------------------------

def test_retinanet_anchor_sizes_are_three_octave_scales_per_level():
    sizes = retinanet_anchor_sizes()
    assert len(sizes) == 5
    assert sizes[0] == pytest.approx([32.0, 40.3175, 50.7968], abs=1e-4)
    assert sizes[4] == pytest.approx([512.0, 645.0796, 812.7493], abs=1e-4)   # the paper's "32 to 813 px"
    assert retinanet_anchor_sizes(integer=True)[0] == [32.0, 40.0, 50.0]
    assert retinanet_anchor_sizes(integer=True)[1] == [64.0, 80.0, 101.0]


def test_canonical_p3_cell_anchors_are_float_ratio_major_and_centred_on_zero():
    cell = _canonical_generator().cell_anchors[0].float()
    assert cell.shape == (9, 4)
    half = []
    for r in (0.5, 1.0, 2.0):                     # ratio (h/w) major ...
        for s in (32.0, 40.3175, 50.7968):        # ... then size
            w, h = s / math.sqrt(r), s * math.sqrt(r)
            half.append([-w / 2, -h / 2, w / 2, h / 2])
    assert torch.allclose(cell, torch.tensor(half), atol=1e-3)
    # hand values: s = 32, h/w = 0.5 -> w = 32 sqrt 2 = 45.25, h = 22.63
    assert cell[0].tolist() == pytest.approx([-22.6274, -11.3137, 22.6274, 11.3137], abs=1e-4)
    assert cell[4].tolist() == pytest.approx([-20.1587, -20.1587, 20.1587, 20.1587], abs=1e-4)
    assert cell[8].tolist() == pytest.approx([-17.9594, -35.9188, 17.9594, 35.9188], abs=1e-4)
    # every anchor keeps its area s^2
    wh = cell[:, 2:] - cell[:, :2]
    areas = (wh[:, 0] * wh[:, 1]).view(3, 3)
    assert torch.allclose(areas, torch.tensor([32.0, 40.3175, 50.7968]).pow(2).expand(3, 3), rtol=1e-4)


def test_torchvision_preset_p3_cell_anchors_are_rounded_integers():
    cell = _torchvision_generator().cell_anchors[0]
    expected = [[-23, -11, 23, 11], [-28, -14, 28, 14], [-35, -18, 35, 18],
                [-16, -16, 16, 16], [-20, -20, 20, 20], [-25, -25, 25, 25],
                [-11, -23, 11, 23], [-14, -28, 14, 28], [-18, -35, 18, 35]]
    assert cell.tolist() == expected


def test_torchvision_preset_itself_uses_integer_sizes_and_rounded_cells():
    gen = build_model("retinanet_r50_fpn_torchvision").anchor_generator
    assert gen.stride_mode == "inferred"
    assert gen.sizes[0] == [32.0, 40.0, 50.0]
    assert gen.cell_anchors[0][0].tolist() == [-23, -11, 23, 11]


# --- counts ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw,grids", [
    ((320, 320), [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]),
    ((800, 1216), [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]),
    ((333, 517), [(42, 65), (21, 33), (11, 17), (6, 9), (3, 5)]),
])
def test_anchor_count_follows_the_real_feature_map_sizes(hw, grids):
    # Counted by hand: sum over P3..P7 of H_l * W_l * 9, with H_l = ceil(H / 2^l) (3x3/s2 pad-1 convs).
    expected = sum(h * w for h, w in grids) * 9
    assert [(feature_size(hw[0], 2 ** l), feature_size(hw[1], 2 ** l)) for l in range(3, 8)] == grids
    gen = _canonical_generator()
    assert gen.num_anchors(grids) == expected
    model = _small("retinanet_r18_fpn")
    with torch.no_grad():
        outputs, anchors = model.dense_forward(torch.zeros(1, 3, *hw))
    assert [len(a) for a in anchors] == [h * w * 9 for h, w in grids]
    assert model.grid_sizes(hw) == grids               # what the analysis assumes, without running the net
    assert outputs["cls_logits"].shape == (1, expected, 2) and outputs["bbox_deltas"].shape == (1, expected, 4)


def test_hand_counted_totals():
    gen = _canonical_generator()
    assert gen.num_anchors([(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]) == (1600 + 400 + 100 + 25 + 9) * 9 == 19206
    assert gen.num_anchors([(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]) == 182403


def test_canonical_strides_are_fixed_even_when_the_padded_size_is_not_a_multiple_of_128():
    gen = _canonical_generator()
    grids = [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3)]
    assert gen.strides_for((320, 320), grids) == [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128)]
    levels = gen.grid_anchors((320, 320), grids)
    # centres of P7 (3x3 grid) at 0, 128, 256 — not 320 // 3 = 106
    centres = (levels[4][:, :2] + levels[4][:, 2:]) / 2
    assert sorted({round(c, 3) for c in centres[:, 0].tolist()}) == [0.0, 128.0, 256.0]


def test_torchvision_preset_infers_strides_from_the_padded_800x1216_batch():
    gen = _torchvision_generator()
    grids = [(100, 152), (50, 76), (25, 38), (13, 19), (7, 10)]
    assert gen.strides_for((800, 1216), grids) == [(8, 8), (16, 16), (32, 32), (61, 64), (114, 121)]
    anchors = torch.cat(gen((800, 1216), grids))
    assert anchors.shape == (182403, 4)
    levels = gen.grid_anchors((800, 1216), grids)
    # P6 anchor at row 1, column 1, cell anchor 3 (ratio 1, size 256): centre (x, y) = (64, 61)
    a = levels[3][(1 * 19 + 1) * 9 + 3]
    assert a.tolist() == [64 - 128, 61 - 128, 64 + 128, 61 + 128]


def test_torchvision_preset_pads_to_32_and_builds_the_inferred_grid_end_to_end():
    model = _small("retinanet_r18_fpn", anchor_integer_sizes=True, round_cell_anchors=True,
                   stride_mode="inferred", size_divisible=32, p6_from="p5", min_size=800, max_size=1333)
    batch, sizes, _ = model.preprocessor([torch.rand(3, 800, 1200)])
    assert tuple(batch.shape[-2:]) == (800, 1216) and sizes == [(800, 1200)]


# --- order ---------------------------------------------------------------------------------------------

def test_flattened_order_is_level_then_y_then_x_then_cell_anchor():
    sizes = [[16.0, 24.0], [32.0, 48.0], [64.0, 96.0]]
    gen = AnchorGenerator(sizes, [0.5, 1.0, 2.0], strides=[8, 16, 32])
    grids = [(4, 6), (2, 3), (1, 2)]
    anchors = torch.cat(gen((32, 48), grids))
    a_per = 6
    assert anchors.shape == (sum(h * w for h, w in grids) * a_per, 4)
    start = 0
    for level, ((h, w), stride) in enumerate(zip(grids, [8, 16, 32])):
        for y in range(h):
            for x in range(w):
                for a in range(a_per):
                    r = [0.5, 1.0, 2.0][a // 2]
                    s = sizes[level][a % 2]
                    bw, bh = s / math.sqrt(r), s * math.sqrt(r)
                    cx, cy = x * stride, y * stride
                    idx = start + (y * w + x) * a_per + a
                    assert anchors[idx].tolist() == pytest.approx(
                        [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], abs=1e-4), (level, y, x, a)
        start += h * w * a_per


def test_centre_offset_half_shifts_by_half_a_stride():
    gen0 = AnchorGenerator([[32.0]], [1.0], strides=[8])
    gen5 = AnchorGenerator([[32.0]], [1.0], strides=[8], offset=0.5)
    a0, a5 = gen0((16, 16), [(2, 2)])[0], gen5((16, 16), [(2, 2)])[0]
    assert torch.equal(a5 - a0, torch.full_like(a0, 4.0))
    assert a0[0].tolist() == [-16, -16, 16, 16]


def test_generator_rejects_mismatched_levels():
    with pytest.raises(ValueError, match="one entry per pyramid level"):
        AnchorGenerator([[32.0], [64.0]], [1.0], strides=[8])
    gen = AnchorGenerator([[32.0], [64.0]], [1.0], strides=[8, 16])
    with pytest.raises(ValueError, match="3 feature levels"):
        gen((64, 64), [(8, 8), (4, 4), (2, 2)])
