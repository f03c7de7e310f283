"""``report.html``: one page a person looks at after a run, beside a ``report/`` folder of its pictures.

Written at the end of ``densedet train`` (:func:`write_run_report`) and by ``densedet eval --weights
CKPT --report DIR`` (:func:`write_report`). The page opens from disk: no server, nothing fetched;
its few lines of JavaScript move the gallery's score threshold and check, on load, that every
picture decoded (``<body data-check="images N broken 0 errors 0">``, read by
:func:`check_in_browser` in headless Chromium). Sections, top to bottom:

1. the twelve COCO numbers (single scale and TTA side by side when the run had both) and AP by class;
2. the training curves (loss terms, learning rate, validation AP when the run evaluated periodically);
3. precision-recall curves by class (IoU 0.5 and 0.75);
4. the confusion matrix at IoU 0.5, background its last row and column
   (:func:`densedet.evaluation.errors.confusion_matrix`);
5. the errors by kind and object size, and the AP50 each kind costs
   (:func:`densedet.evaluation.errors.error_breakdown`);
6. a gallery of validation images, worst first, ground truth beside detections;
7. the training set's box sizes, anchor coverage and foreground : background ratio
   (:func:`densedet.analysis.analyze` on a few hundred images; a failure there is a note on the page);
8. the config and the command that made the run.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image, ImageOps
from torch import nn

from .config import Config, to_dict
from .data import DetectionData, to_coco_dict
from .data.images import rgb_array
from .engine.evaluate import eval_tiles, predict_dataset
from .engine.metrics_log import scalars
from .evaluation import evaluate_coco
from .evaluation.errors import (KINDS, SIZES, ImageResult, confusion_matrix, error_breakdown, image_results,
                                images_worst_first)
from .evaluation.plots import plot_pr_grid
from .visualize import PALETTE

__all__ = ["write_report", "write_run_report", "plot_curves", "ReportOptions", "metrics_table", "gallery_entries",
           "check_in_browser", "find_chromium", "REPORT_FOLDER", "COCO_KEYS"]

REPORT_FOLDER = "report"          # the pictures, beside report.html
COCO_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
_GALLERY_SIDE = 480               # gallery pictures are shrunk to this longer side (the boxes are in %)
_GALLERY_MIN_SCORE = 0.05         # detections below this are not put on the page (the slider's floor)


@dataclass
class ReportOptions:
    """How much the report looks at: ``gallery_size`` images, ``analysis_images`` training images
    for the anchor analysis (0: no analysis), ``score_thresh`` for the confusion matrix, the error
    counts and the gallery's starting threshold."""

    gallery_size: int = 24
    analysis_images: int = 50      # matching one 320 px image's ~19k anchors takes ~0.1 s on 2 cores
    analysis_pixels: float = 6e6   # and no more images than this many model pixels: 50 such images hold 5.1M,
                                   # one 2400x1600 photo 3.8M (~2-4 s to match its ~100 objects)
    score_thresh: float = 0.3


def write_run_report(cfg: Config, model: nn.Module, val_data: DetectionData, device: torch.device,
                     dtype: torch.dtype | None, out: Path, say: Callable[[str], None],
                     options: ReportOptions | None = None) -> Path:
    """``out/report.html`` at the end of a training run: the numbers from ``out/metrics.json`` and
    ``out/metrics.jsonl``, the detections of the final ``model`` on ``val_data`` at single scale
    (one more pass over the split: the final evaluation keeps only its numbers)."""
    start = time.perf_counter()
    results = predict_dataset(model, val_data, cfg.test.batch_size, device, dtype, tiles=eval_tiles(cfg.data))
    metrics_json = out / "metrics.json"
    summary = json.loads(metrics_json.read_text()) if metrics_json.is_file() else None
    path = write_report(out, cfg, val_data, results, summary, command=sys.argv, run_dir=out,
                        detections="the final weights on the validation split, single scale", options=options)
    say(f"report: {path} ({time.perf_counter() - start:.1f} s)")
    return path


def write_report(out_dir: str | Path, cfg: Config, data: DetectionData, results: Sequence[dict],
                 summary: dict | None = None, command: Sequence[str] = (), run_dir: str | Path | None = None,
                 detections: str = "", options: ReportOptions | None = None) -> Path:
    """Write ``out_dir/report.html`` and its pictures under ``out_dir/report/``; return the page's path.

    Args:
        cfg: the run's config (shown, and read by the anchor analysis).
        data: the split ``results`` were made on.
        results: COCO results ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]`` on ``data``.
        summary: the numbers of the table (a run's ``metrics.json``: with ``single_scale`` when it had
            TTA); default: the COCO evaluation of ``results``.
        command: the command line that made the run (``sys.argv``).
        run_dir: a run folder whose ``metrics.jsonl`` gives the training curves (none without one).
        detections: one line saying what ``results`` are, printed above the sections that use them.
    """
    options = options or ReportOptions()
    out_dir = Path(out_dir)
    pictures = out_dir / REPORT_FOLDER
    pictures.mkdir(parents=True, exist_ok=True)
    metrics = evaluate_coco(list(results), to_coco_dict(data), max_dets=tuple(cfg.test.max_dets))
    images = image_results(data, results)
    errors = _errors(images, data.num_classes, options.score_thresh)
    page = {
        "title": f"densedet report: {out_dir.resolve().name}",
        "written": time.strftime("%Y-%m-%d %H:%M"),
        "detections": detections,
        "source": data.source,
        "num_images": len(data.records),
        "metrics": metrics_table(summary if summary is not None else {**scalars(metrics),
                                                                        "per_class": metrics["per_class"]}),
        "curves": _curves(run_dir, pictures),
        "pr_curves": _relative(plot_pr_grid(metrics, pictures / "pr_curves.png"), out_dir),
        "confusion": _confusion_table(confusion_matrix(images, data.num_classes, options.score_thresh),
                                      data.class_names),
        "errors": errors,
        "gallery": _gallery(images, errors["per_image"], data.class_names, options, pictures / "gallery", out_dir),
        "analysis": _analysis(cfg, options.analysis_images, options.analysis_pixels, pictures / "analysis", out_dir),
        "config": yaml.safe_dump(to_dict(cfg), sort_keys=False),
        "command": " ".join(shlex.quote(a) for a in [Path(command[0]).name, *command[1:]]) if command else "",
        "score_thresh": options.score_thresh,
        "kinds": KINDS, "sizes": SIZES,
    }
    env = Environment(loader=PackageLoader("densedet", "templates"), autoescape=select_autoescape(["html", "j2"]),
                      trim_blocks=True, lstrip_blocks=True)
    path = out_dir / "report.html"
    path.write_text(env.get_template("report.html.j2").render(**page), encoding="utf-8")
    return path


# -- the sections ---------------------------------------------------------------------------------

def plot_curves(jsonl: str | Path, out_png: str | Path) -> None:
    """Loss terms and learning rate against iteration, from ``metrics.jsonl``."""
    from matplotlib.figure import Figure
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval" in r]
    if not train_rows:
        return
    # a validation panel only when the run evaluated during training: no empty frames
    fig = Figure(figsize=(11 if evals else 7.5, 3.6))
    axes = fig.subplots(1, 3 if evals else 2)
    its = [r["iteration"] for r in train_rows]
    for key in sorted({k for r in train_rows for k in r if k.startswith("loss")}):
        axes[0].plot(its, [r.get(key, float("nan")) for r in train_rows], label=key)
    axes[0].set_xlabel("iteration"), axes[0].set_title("training loss"), axes[0].legend(fontsize=7)
    axes[1].plot(its, [r["lr"] for r in train_rows])
    axes[1].set_xlabel("iteration"), axes[1].set_title("learning rate")
    if evals:
        for key in ("AP", "AP50"):
            axes[2].plot([r["iteration"] for r in evals], [r["eval"][key] for r in evals], "o-", label=key)
        axes[2].legend(fontsize=7)
        axes[2].set_xlabel("iteration"), axes[2].set_title("validation")
    fig.tight_layout()
    fig.savefig(out_png, dpi=90)


def _relative(path: Path | None, root: Path) -> str | None:
    """``path`` as the page links it (relative to the page's folder, forward slashes)."""
    return None if path is None else path.relative_to(root).as_posix()


def _number(value: Any) -> str:
    return "-" if value is None or not isinstance(value, (int, float)) or value < 0 else f"{value:.3f}"


def metrics_table(summary: dict) -> dict:
    """The twelve COCO numbers (one column, or single scale and TTA when ``summary`` has both) and
    the per-class AP."""
    columns = [("single scale", summary["single_scale"]),
               (_tta_name(summary.get("tta")), summary)] if "single_scale" in summary else [("", summary)]
    keys = [k for k in COCO_KEYS if any(k in numbers for _, numbers in columns)]
    keys += [k for k in summary if k.startswith("AR") and k[2:].isdigit() and k not in keys]
    rows = [(key, [_number(numbers.get(key)) for _, numbers in columns]) for key in keys]
    per_class = [(name, _number(ap)) for name, ap in (summary.get("per_class") or {}).items()]
    extras = [(k, summary[k]) for k in ("iterations", "train_minutes", "images_per_s", "precision")
              if k in summary]
    return {"columns": [name for name, _ in columns], "rows": rows, "per_class": per_class,
            "extras": [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in extras]}


def _tta_name(tta: dict | None) -> str:
    if not tta:
        return "test-time augmentation"
    views = (" flip" if tta.get("flip") else "") + (" turns" if tta.get("rotate") else "")
    return f"TTA {'/'.join(str(s) for s in tta.get('scales', []))}{views} " \
           f"{tta.get('merge', '')}".strip()


def _curves(run_dir: str | Path | None, pictures: Path) -> str | None:
    """The loss / LR (/ validation) curves of ``run_dir/metrics.jsonl``, or None without a log."""
    if run_dir is None or not (Path(run_dir) / "metrics.jsonl").is_file():
        return None
    png = pictures / "curves.png"
    png.unlink(missing_ok=True)
    plot_curves(Path(run_dir) / "metrics.jsonl", png)        # writes nothing for a log without training records
    return _relative(png, pictures.parent) if png.is_file() else None


def _confusion_table(matrix: np.ndarray, class_names: Sequence[str]) -> dict:
    """Rows and columns named (background last), each cell with its count and a shade from 0 to 1
    (the cell's share of its row) for the page to colour it."""
    names = [*class_names, "background"]
    rows = []
    for i, name in enumerate(names):
        total = max(int(matrix[i].sum()), 1)
        rows.append((name, [(int(n), round(n / total, 3), i == j and i < len(class_names))
                            for j, n in enumerate(matrix[i])]))
    return {"names": names, "rows": rows}


def _errors(images: Sequence[ImageResult], num_classes: int, score_thresh: float) -> dict:
    """Counts by kind and size at ``score_thresh``; the AP50 costs over every detection (the AP's own view)."""
    counted = error_breakdown(images, num_classes, score_thresh)
    costed = error_breakdown(images, num_classes, 0.0)
    rows = [(kind, counted["counts"][kind], [counted["by_size"][kind][s] for s in SIZES],
             f"{costed['ap50_gain'][kind]:+.3f}") for kind in KINDS]
    return {"rows": rows, "true_positives": counted["true_positives"], "objects": counted["objects"],
            "ap50": f"{costed['ap50']:.3f}", "per_image": counted["per_image"]}


def gallery_entries(images: Sequence[ImageResult], per_image: Sequence[dict], count: int,
                    min_score: float = _GALLERY_MIN_SCORE) -> list[dict]:
    """The ``count`` worst images (:func:`images_worst_first`), each ``{"image", "stats", "truth",
    "detections"}``: boxes as percentages of the image (``left, top, width, height``) with their label,
    detections scoring ``>= min_score`` with their score, highest first."""
    entries = []
    for i in images_worst_first(per_image)[:count]:
        image = images[i]
        entries.append({"image": image, "stats": per_image[i],
                        "truth": [(box, int(label), None) for box, label in zip(image.gt_boxes, image.gt_labels)],
                        "detections": [(image.boxes[d], int(image.labels[d]), float(image.scores[d]))
                                       for d in np.argsort(-image.scores, kind="stable")
                                       if image.scores[d] >= min_score]})
    return entries


def _gallery(images: Sequence[ImageResult], per_image: Sequence[dict], class_names: Sequence[str],
             options: ReportOptions, folder: Path, root: Path) -> list[dict]:
    """The gallery's pictures (shrunk JPEGs) and their boxes, worst image first (``per_image``: the
    error counts of :func:`error_breakdown` at the report's threshold)."""
    shutil.rmtree(folder, ignore_errors=True)        # an earlier report's pictures: other images, other names
    folder.mkdir(parents=True)
    out = []
    for rank, entry in enumerate(gallery_entries(images, per_image, options.gallery_size)):
        image = entry["image"]
        with Image.open(image.file_name) as pil:
            pil = Image.fromarray(rgb_array(ImageOps.exif_transpose(pil)))     # 16-bit too, not clipped to white
            if image.region is not None:
                pil = pil.crop(image.region)
            width, height = pil.size
            pil.thumbnail((_GALLERY_SIDE, _GALLERY_SIDE))
            picture = folder / f"{rank:03d}_{Path(image.file_name).stem}.jpg"
            pil.save(picture, quality=88)

        def placed(boxes: list) -> list[dict]:
            return [{"left": 100 * b[0] / width, "top": 100 * b[1] / height,
                     "width": 100 * (b[2] - b[0]) / width, "height": 100 * (b[3] - b[1]) / height,
                     "colour": "rgb({},{},{})".format(*PALETTE[label % len(PALETTE)]),
                     "text": (class_names[label] if 0 <= label < len(class_names) else str(label))
                     + ("" if score is None else f" {score:.2f}"),
                     "score": score} for b, label, score in boxes]

        out.append({"src": _relative(picture, root), "name": Path(image.file_name).name,
                    "image_id": image.image_id, "stats": entry["stats"],
                    "truth": placed(entry["truth"]), "detections": placed(entry["detections"])})
    return out


def _analysis(cfg: Config, max_images: int, max_pixels: float, folder: Path, root: Path) -> dict:
    """The training set's anchor analysis: its printed summary and plots, or the reason it failed."""
    if max_images <= 0:
        return {"note": "not run (analysis_images is 0)"}
    try:
        from .analysis import analyze
        from .commands.analyze import format_summary, write_plots
        result = analyze(cfg, "train", max_images=max_images, candidates=False, log=lambda message: None,
                         max_pixels=max_pixels)
        sizes = result["anchors"].pop("_box_sizes")
        plots = write_plots(result, sizes, folder)
        return {"summary": format_summary(result), "plots": [_relative(p, root) for p in plots],
                "images": result["anchors"]["images"], "of": result["dataset"]["images"]}
    except Exception as err:  # noqa: BLE001 - the analysis is one section; the page is written without it
        return {"note": f"the data and anchor analysis failed: {type(err).__name__}: {err}"}


# -- looking at it in a browser ---------------------------------------------------------------------

# Headless, offline and quiet on a machine without a display, a GPU or a D-Bus session; the virtual
# time budget lets the page's load handler run before the DOM is dumped.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--hide-scrollbars", "--virtual-time-budget=5000")


def find_chromium() -> str | None:
    """The path of a Chromium (or Chrome) executable on ``PATH``, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def check_in_browser(html: str | Path, screenshot: str | Path | None = None, browser: str | None = None,
                     window: tuple[int, int] = (1400, 3000), timeout: float = 120.0) -> dict:
    """Open ``html`` in headless Chromium and report what a reader would see.

    Returns ``{"check": the body's data-check after load ("images N broken B errors E"), "images": N,
    "broken": B, "errors": E, "error_messages": [...], "console": [console lines Chromium logged],
    "screenshot": the PNG written or None}``. ``screenshot`` (a path) is taken at ``window`` pixels.
    Raises FileNotFoundError without a browser and RuntimeError when Chromium fails.
    """
    browser = browser or find_chromium()
    if browser is None:
        raise FileNotFoundError("no Chromium on PATH (Debian: apt-get install chromium)")
    url = Path(html).resolve().as_uri()
    dump = subprocess.run([browser, *CHROMIUM_FLAGS, "--enable-logging=stderr", "--v=0", "--dump-dom", url],
                          capture_output=True, text=True, timeout=timeout)
    found = re.search(r'<body[^>]*data-check="images (\d+) broken (\d+) errors (\d+)"', dump.stdout)
    if dump.returncode != 0 or found is None:
        raise RuntimeError(f"chromium could not open {html} (exit {dump.returncode}): {dump.stderr[-2000:]}")
    messages = re.search(r'data-errors="([^"]*)"', dump.stdout)
    result = {"check": found.group(0).split('data-check="')[1].rstrip('"'),
              "images": int(found.group(1)), "broken": int(found.group(2)), "errors": int(found.group(3)),
              "error_messages": messages.group(1).split(" | ") if messages else [],
              "console": [line for line in dump.stderr.splitlines() if ":CONSOLE" in line],
              "screenshot": None}
    if screenshot is not None:
        shot = Path(screenshot).resolve()
        shot.parent.mkdir(parents=True, exist_ok=True)
        taken = subprocess.run([browser, *CHROMIUM_FLAGS, f"--screenshot={shot}",
                                f"--window-size={window[0]},{window[1]}", url],
                               capture_output=True, text=True, timeout=timeout)
        if taken.returncode != 0 or not shot.is_file():
            raise RuntimeError(f"chromium could not take a screenshot of {html}: {taken.stderr[-2000:]}")
        result["screenshot"] = shot
    return result
