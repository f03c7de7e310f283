"""``densedet analyze``: dataset statistics, anchor imbalance and coverage for a config, printed,
written as ``analysis.json`` and plotted (``box_sizes.png``, ``coverage_by_size.png``,
``imbalance_per_image.png``). The numbers come from :func:`densedet.analysis.analyze`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import analyze
from ..config import find_config, load_config
from ..errors import UsageError
from . import require_folder

__all__ = ["format_summary", "write_plots", "add_parser", "run"]


# -- the printed summary --------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "  n/a" if x is None else f"{100 * x:5.1f}%"


def format_summary(result: dict[str, Any]) -> str:
    """The printed report of :func:`analyze`."""
    d, a = result["dataset"], result["anchors"]
    lines = [f"dataset {d['source']} ({result['split']}): {d['images']} images "
             f"({d['images_without_boxes']} without boxes), {d['boxes']} boxes ({d['crowd_boxes']} crowd)",
             f"  boxes per image: mean {d['boxes_per_image']['mean']:.2f}, max {d['boxes_per_image'].get('p100', 0):g}"]
    if d["box_size"]:
        bs, ar = d["box_size"], d["aspect_ratio"]
        lines.append(f"  box size sqrt(area), original px: p10 {bs['p10']:.1f}, median {bs['p50']:.1f}, "
                     f"p90 {bs['p90']:.1f}")
        lines.append(f"  aspect ratio h/w: p10 {ar['p10']:.2f}, median {ar['p50']:.2f}, p90 {ar['p90']:.2f}")
    lines.append("  classes: " + ", ".join(f"{k} {v}" for k, v in d["class_counts"].items()))
    ratio = a["background_per_foreground"]
    lines += [f"anchors ({a['images']} images, resized as the model does): sizes per level {a['sizes']}, "
              f"ratios {[round(r, 2) for r in a['aspect_ratios']]}",
              f"  per image: {a['anchors_per_image_mean']:.0f} anchors, "
              f"{a['foreground_per_image_mean']:.1f} foreground, "
              f"{a['ignored_per_image_mean']:.1f} ignored, {a['background_per_image_mean']:.0f} background",
              f"  imbalance: 1 foreground : {ratio:.0f} background" if ratio is not None
              else "  imbalance: no foreground anchors at all",
              f"  boxes with best anchor IoU < {a['fg_iou_thresh']:g}: {_pct(a['coverage']['below_fg'])}, "
              f"< {a['bg_iou_thresh']:g}: {_pct(a['coverage']['below_bg'])}; "
              f"assigned no anchor: {_pct(a['boxes_not_assigned'])}",
              f"  {'size bin':>10} {'boxes':>7} {'<fg':>7} {'<bg':>7} {'unassigned':>10}"]
    for row in a["coverage"]["by_size"]:
        if row["boxes"]:
            lines.append(f"  {row['bin']:>10} {row['boxes']:>7d} {_pct(row['below_fg']):>7} {_pct(row['below_bg']):>7} "
                         f"{_pct(row['not_assigned']):>10}")
    if result.get("candidates"):
        lines.append(f"candidate anchors (share of boxes with best IoU < {a['fg_iou_thresh']:g}):")
        for name, c in result["candidates"].items():
            if "error" in c:
                lines.append(f"  {name:<18} error: {c['error']}")
            else:
                lines.append(f"  {name:<18} A={c['anchors_per_location']:<3d} {_pct(c['coverage']['below_fg'])}   "
                             f"{c['overrides'] or ''}")
    return "\n".join(lines)


# -- plots ----------------------------------------------------------------------------------------

def _new_figure(width: float = 6.0, height: float = 4.0):
    """A figure on the Agg canvas (no pyplot: no global backend switch, nothing to close)."""
    # matplotlib is imported here, not at the top: it is heavy and only the plots need it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def _plot_box_sizes(anchors: dict[str, Any], box_sizes: np.ndarray, path: Path) -> None:
    """Histogram of resized box sizes, the anchor sizes marked."""
    fig, ax = _new_figure()
    if box_sizes.size:
        lo, hi = max(float(box_sizes.min()), 1.0), max(float(box_sizes.max()), 2.0)
        ax.hist(box_sizes, bins=np.geomspace(lo, hi * 1.01, 40), color="tab:blue", alpha=0.8)
    for level in anchors["sizes"]:
        for s in level:
            ax.axvline(s, color="tab:red", alpha=0.4, lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("box size sqrt(area), resized px (red: anchor sizes)")
    ax.set_ylabel("boxes")
    ax.set_title("box sizes vs anchor sizes")
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _plot_coverage(result: dict[str, Any], path: Path) -> None:
    """Share of boxes below the fg threshold per size bin, per candidate anchor setting."""
    a = result["anchors"]
    fig, ax = _new_figure(7.0, 4.0)
    series = result.get("candidates") or {"current": {"coverage": a["coverage"]}}
    names = [row["bin"] for row in a["coverage"]["by_size"]]
    x = np.arange(len(names))
    for name, c in series.items():
        if "coverage" not in c:
            continue
        ys = [np.nan if row["below_fg"] is None else row["below_fg"] for row in c["coverage"]["by_size"]]
        ax.plot(x, ys, marker="o", lw=2.5 if name == "current" else 1.2, label=name)
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=30)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("box size bin (sqrt area, resized px)")
    ax.set_ylabel(f"share with best anchor IoU < {a['fg_iou_thresh']:g}")
    ax.set_title("boxes no anchor covers, by size")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def _plot_imbalance(anchors: dict[str, Any], path: Path) -> None:
    """Foreground, ignored and background anchors per image."""
    fig, ax = _new_figure(7.0, 4.0)
    per = anchors["per_image"]
    order = np.argsort(per["foreground"], kind="stable")
    xi = np.arange(len(order))
    ax.plot(xi, np.maximum(np.asarray(per["background"])[order], 0.5), ".", ms=3, label="background")
    ax.plot(xi, np.maximum(np.asarray(per["ignored"])[order], 0.5), ".", ms=3, label="ignored")
    ax.plot(xi, np.maximum(np.asarray(per["foreground"])[order], 0.5), ".", ms=3, label="foreground")
    ax.set_yscale("log")
    ax.set_xlabel("image (sorted by foreground anchors)")
    ax.set_ylabel("anchors (0 drawn at 0.5)")
    ratio = anchors["background_per_foreground"]
    ax.set_title("anchors per image" + (f": 1 fg : {ratio:.0f} bg" if ratio else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def write_plots(result: dict[str, Any], box_sizes: np.ndarray, out_dir: str | os.PathLike) -> list[Path]:
    """``box_sizes.png`` (histogram of resized box sizes, anchor sizes marked), ``coverage_by_size.png``
    (share of boxes below the fg threshold per size bin, per candidate) and ``imbalance_per_image.png``
    (foreground and background anchors per image)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "box_sizes.png", out / "coverage_by_size.png", out / "imbalance_per_image.png"]
    _plot_box_sizes(result["anchors"], box_sizes, paths[0])
    _plot_coverage(result, paths[1])
    _plot_imbalance(result["anchors"], paths[2])
    return paths


# -- command line -------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    """Register ``densedet analyze CONFIG [key=value ...] [--out DIR] [--split S] [--max-images N]``."""
    p = subparsers.add_parser(
        "analyze", help="dataset statistics, anchor imbalance and coverage for a config",
        description="Measure what the focal-loss paper argues about: boxes per image and their sizes, "
                    "foreground/ignored/background anchors per image under the configured matcher, the "
                    "share of boxes no anchor reaches at the foreground IoU, by size, and what other "
                    "anchor sizes/ratios would reach. Writes analysis.json and PNG plots.")
    p.add_argument("config", help="YAML config file, or the name of a config shipped with densedet")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.min_size=512")
    p.add_argument("--out", default=None, help="output folder (default: <train.output_dir>/analysis)")
    p.add_argument("--split", default="train", choices=["train", "val"])
    p.add_argument("--max-images", type=int, default=1000,
                   help="anchor statistics on at most this many evenly spaced images (0: all; default 1000)")
    p.add_argument("--no-candidates", action="store_true", help="skip the alternative anchor settings")
    p.set_defaults(func=run)


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj


def run(args: argparse.Namespace) -> int:
    """``densedet analyze``; returns the exit code (a bad config or dataset raises; ``densedet.cli.main``
    turns that into one line and exit code 2)."""
    if args.max_images < 0:
        raise UsageError(f"--max-images: must be >= 0 (0: all images), got {args.max_images}")
    require_folder(args.out, "--out", "analysis.json and the plots")
    cfg = load_config(find_config(args.config), list(args.overrides))
    result = analyze(cfg, split=args.split, max_images=args.max_images, candidates=not args.no_candidates)
    out = Path(args.out or os.path.join(cfg.train.output_dir, "analysis"))
    out.mkdir(parents=True, exist_ok=True)
    print(format_summary(result))
    sizes = result["anchors"].pop("_box_sizes")
    (out / "analysis.json").write_text(json.dumps(_json_ready(result), indent=1))
    paths = write_plots(result, sizes, out)
    print(f"wrote {out / 'analysis.json'} and {', '.join(p.name for p in paths)}")
    return 0
