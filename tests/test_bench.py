"""``densedet bench`` on tiny settings: the suites run and produce well-formed tables.

No assertion here is about time (a shared CI machine makes timings meaningless); the FLOP counter
is checked against hand-computed counts.
"""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from torch import nn

from densedet.commands.bench import (QUICK, BenchSettings, Table, add_parser, count_flops, measure_peak_memory,
                                     run_suites, time_call, write_results)

TINY = BenchSettings(
    infer_models=["retinanet_r18_fpn"], infer_sizes=[128], infer_batches=[1, 2],
    train_models=["retinanet_r18_fpn"], train_sizes=[128], train_batches=[2],
    post_batches=[1, 2], post_candidates=150, post_classes=6,
    match_anchors=3000, match_boxes=12, match_batches=[1, 3], loss_size=128, loss_batches=[2],
    peak_sizes={"fp32": 64, "bf16": 32},
    memory_models=["retinanet_r18_fpn"], memory_size=128, memory_batches={"infer": 1, "train": 1},
    fast_models=["retinanet_r18_fpn"], fast_size=128, fast_variants=["eager", "channels_last", "folded"],
    repeat=1, warmup=0, model_overrides={"fpn_channels": 16, "head_convs": 1}, torchvision=False)


def _check_table(table: dict, min_rows: int = 1) -> None:
    assert table["title"] and table["columns"]
    assert len(table["rows"]) >= min_rows
    for row in table["rows"]:
        assert len(row) == len(table["columns"]), (table["title"], row)
    assert any("took" in n for n in table["notes"])


@pytest.fixture(scope="module")
def tiny_results():
    torch.manual_seed(0)
    return run_suites(["infer", "peak", "train", "post", "match", "loss", "fast"], TINY, log=lambda s: None)


def test_suites_produce_well_formed_tables(tiny_results):
    tables = {t["title"].split(",")[0].split(" at ")[0].split(" (")[0]: t for t in tiny_results["tables"]}
    assert len(tiny_results["tables"]) == 7
    for t in tiny_results["tables"]:
        _check_table(t)
    infer = next(t for t in tiny_results["tables"] if t["title"].startswith("Inference"))
    assert [r[2] for r in infer["rows"]] == [1, 2]                         # one row per batch size
    cols = infer["columns"]
    for row in infer["rows"]:
        rec = dict(zip(cols, row))
        assert math.isfinite(rec["baseline ms"]) and math.isfinite(rec["fast ms"])   # values, not the clock
        assert rec["speedup"] == pytest.approx(rec["baseline ms"] / rec["fast ms"])
        assert rec["fast img/s"] == pytest.approx(1000 * rec["batch"] / rec["fast ms"])
    train = tables["Training step"]
    assert [r[1:4] for r in train["rows"]] == [[128, 2, "baseline"], [128, 2, "fast"]]
    for row in train["rows"]:
        rec = dict(zip(train["columns"], row))
        parts = rec["forward"] + rec["loss"] + rec["backward"] + rec["step"]
        assert rec["total"] == pytest.approx(parts, rel=1e-6)               # repeat=1: median of one
        assert rec["img/s"] == pytest.approx(1000 * rec["batch"] / rec["total"])
    assert [r[0] for r in tables["Matmul peak"]["rows"]] == ["fp32", "bf16"]
    fast = next(t for t in tiny_results["tables"] if t["title"].startswith("fp32 inference fast paths"))
    assert len(fast["rows"]) == 3 and all(r[4] < 1e-3 for r in fast["rows"])   # same outputs as eager


def test_loss_suite_compares_the_fused_and_unfused_focal_loss(tiny_results):
    loss = next(t for t in tiny_results["tables"] if t["title"].startswith("Focal loss"))
    (row,) = loss["rows"]
    assert row[0] == 2 and math.isfinite(row[1]) and math.isfinite(row[2])
    assert row[4] < 1e-6                                   # the two paths give the same gradient


def test_post_and_match_baselines_agree_with_densedet(tiny_results):
    """The bench flags a disagreement between the baseline and densedet; none is expected."""
    post = next(t for t in tiny_results["tables"] if t["title"].startswith("Post-processing"))
    assert not any("disagree" in n for n in post["notes"])
    assert [r[0] for r in post["rows"]] == [1, 2] and all(r[2] > 0 for r in post["rows"])


def test_matcher_baseline_is_the_same_rule():
    from densedet.commands.bench import _match_per_image
    from densedet.matching import Matcher, pad_targets
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(500, 2, generator=g) * 200
    anchors = torch.cat([xy, xy + 10 + torch.rand(500, 2, generator=g) * 60], 1)
    targets = []
    for n in (5, 9):
        gxy = torch.rand(n, 2, generator=g) * 200
        targets.append({"boxes": torch.cat([gxy, gxy + 20 + torch.rand(n, 2, generator=g) * 40], 1),
                        "labels": torch.zeros(n, dtype=torch.long)})
    batched = Matcher()(anchors, pad_targets(targets)).matched_idxs
    for i, loop in enumerate(_match_per_image(anchors, [t["boxes"] for t in targets])):
        assert torch.equal(batched[i], loop)


def test_results_written_as_markdown_and_json(tiny_results, tmp_path):
    write_results(tiny_results, tmp_path / "r.md")
    write_results(tiny_results, tmp_path / "r.json")
    md = (tmp_path / "r.md").read_text()
    assert md.startswith("# densedet bench") and md.count("### ") == 7 and "| model | size | batch |" in md
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["machine"]["torch"] == torch.__version__ and len(data["tables"]) == 7


def test_table_markdown_layout():
    t = Table("T", ["a", "b"], [["x", 1.23456], ["y", 1234.5]], ["note"])
    assert t.markdown() == "### T\n\n| a | b |\n|---|---|\n| x | 1.23 |\n| y | 1234 |\n\n- note\n"


def test_count_flops_matches_hand_count():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ConvTranspose2d(8, 2, 2, stride=2), nn.Flatten(),
                        nn.Linear(2 * 20 * 20, 4))
    x = torch.randn(2, 3, 10, 10)
    conv = 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)            # 2 · outputs · (in_ch · kh · kw)
    deconv = 2 * (2 * 8 * 10 * 10) * (2 * 2 * 2)          # 2 · inputs · (out_ch · kh · kw)
    linear = 2 * (2 * 4) * 800
    assert count_flops(net, lambda: net(x)) == conv + deconv + linear
    # a shared layer applied twice counts twice; hooks are removed afterwards
    conv1 = nn.Conv2d(1, 1, 1)
    assert count_flops(conv1, lambda: (conv1(torch.ones(1, 1, 2, 2)), conv1(torch.ones(1, 1, 2, 2)))) == 16
    assert not conv1._forward_hooks


def test_time_call_counts_calls(monkeypatch):
    import types

    import densedet.commands.bench as bench
    clock = iter([0.0, 0.25, 1.0, 1.5, 2.0, 2.75])        # start/end of each timed call
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    times = time_call(lambda: calls.append(1), repeat=3, warmup=2)
    assert len(calls) == 5 and times == [0.25, 0.5, 0.75]   # the warm-up calls are not timed


def test_peak_memory_in_a_subprocess():
    r = measure_peak_memory("infer", "retinanet_r18_fpn", 128, 1, "baseline", TINY.model_overrides, threads=1)
    assert set(r) == {"setup_mb", "peak_mb", "params_mb", "exact"}
    assert r["peak_mb"] >= r["params_mb"] > 0 and math.isfinite(r["setup_mb"])


def test_cli_parser_and_quick_settings():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "--quick", "--suite", "post", "match", "--out", "x.json"])
    assert args.quick and args.suite == ["post", "match"] and args.out == "x.json" and callable(args.func)
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--suite", "nope"])
    with pytest.raises(ValueError, match="unknown suite"):
        run_suites(["nope"], QUICK, log=lambda s: None)


def test_a_refinedet_preset_at_none_of_the_sizes_is_named_not_left_out_silently():
    settings = BenchSettings(infer_models=["refinedet320_vgg16"], infer_sizes=[128], infer_batches=[1], repeat=1,
                             warmup=0, torchvision=False)
    table = run_suites(["infer"], settings, log=lambda s: None)["tables"][0]
    assert table["rows"] == []
    assert any("refinedet320_vgg16: not measured" in n and "320 px only" in n for n in table["notes"])
