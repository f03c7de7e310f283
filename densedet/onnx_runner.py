"""Run an exported densedet ONNX model with onnxruntime, numpy and PIL only (no torch).

    python densedet/onnx_runner.py model.onnx image.png [more.png ...] [--score-thresh 0.3] [--json out.json]
    python -m densedet.onnx_runner model.onnx image.png      (imports the densedet package)

Reads ``model.onnx`` and its sidecar ``model.onnx.json`` (written by ``densedet export``), and
for each image: decode to RGB, scale to [0, 1], normalise with the sidecar's mean/std, resize the
way the PyTorch preprocessor does (bilinear, half-pixel centres, no antialiasing — the same
arithmetic as ``F.interpolate(..., mode="bilinear", align_corners=False)``), zero-pad to the export
size (or, for a dynamic-size export, to the batch's largest image rounded up to the sidecar's
``size_divisible``), run the graph and map the boxes back to the original image's pixels.

This file imports nothing from densedet, so it can be copied next to the model and run alone. It
runs fp32 and int8 (``densedet export --int8``) ONNX files alike. Inside densedet the same files run
through :mod:`densedet.deploy` (``Predictor(..., backend="onnxruntime")``, ``densedet predict/eval
--backend``), which preprocesses with PyTorch's own resize and sets onnxruntime's threads to torch's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = ["OnnxDetectorRunner", "load_rgb", "resize_bilinear", "main"]


def load_rgb(path: str | Path) -> np.ndarray:
    """Decode an image file to ``[H, W, 3]`` uint8 RGB, EXIF orientation applied, as densedet's
    loader does (``densedet.data.images.rgb_array``): 16-bit grayscale scaled by 255 / 65535 (PIL's
    own conversion would clip it to white), alpha ignored."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith("I;16") or image.mode == "I":
                gray = np.clip(np.rint(np.asarray(image).astype(np.float64) * (255.0 / 65535.0)), 0, 255)
                return np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
            if image.mode == "P" and "transparency" in image.info:
                image = image.convert("RGBA")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image file not found") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot decode image: {err}") from None


def _source_index(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices and weights along one axis, PyTorch's ``align_corners=False`` rule:
    ``src = (dst + 0.5) · in/out − 0.5``, clamped at 0; the right neighbour is clamped to the edge."""
    scale = np.float32(in_size / out_size)
    src = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    src = np.maximum(src, np.float32(0.0))
    i0 = np.minimum(src.astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    w1 = (src - i0).astype(np.float32)
    return i0, i1, w1


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize ``[C, H, W]`` float32 to ``[C, out_h, out_w]`` (bilinear, half-pixel, no antialias)."""
    _, h, w = image.shape
    if (h, w) == (out_h, out_w):
        return image
    y0, y1, wy = _source_index(out_h, h)
    x0, x1, wx = _source_index(out_w, w)
    rows = image[:, y0, :] * (1 - wy)[None, :, None] + image[:, y1, :] * wy[None, :, None]
    return (rows[:, :, x0] * (1 - wx) + rows[:, :, x1] * wx).astype(np.float32)


class OnnxDetectorRunner:
    """An exported detector and its sidecar.

    ``runner(images)`` with a list of ``[H, W, 3]`` uint8 RGB arrays returns, per image,
    ``{"boxes": [N, 4] float32 (x1, y1, x2, y2, original pixels), "scores": [N], "labels": [N],
    "names": [N class names]}`` with scores above ``score_thresh`` (default: the sidecar's).
    """

    def __init__(self, onnx_path: str | Path, sidecar: str | Path | None = None,
                 providers: Sequence[str] | None = None, threads: int | None = None) -> None:
        import onnxruntime as ort
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise FileNotFoundError(f"{onnx_path}: ONNX model not found")
        sidecar = Path(sidecar) if sidecar else Path(str(onnx_path) + ".json")
        try:
            self.meta = json.loads(sidecar.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{sidecar}: sidecar not found (densedet export writes it next to the .onnx)") \
                from None
        for key in ("input_size", "resize", "mean", "std", "class_names", "score_thresh"):
            if key not in self.meta:
                raise ValueError(f"{sidecar}: sidecar lacks the field {key!r}")
        self.height, self.width = (int(s) for s in self.meta["input_size"])
        self.mean = np.asarray(self.meta["mean"], np.float32).reshape(3, 1, 1)
        self.std = np.asarray(self.meta["std"], np.float32).reshape(3, 1, 1)
        self.class_names = list(self.meta["class_names"])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(onnx_path), options,
                                            providers=list(providers or ["CPUExecutionProvider"]))

    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """``[H, W, 3]`` uint8 → (normalised and resized ``[3, h, w]``, (h, w)); ``__call__`` pads a
        batch of them to :meth:`batch_shape`."""
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an [H, W, 3] RGB image, got shape {image.shape}")
        x = (image.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0) - self.mean) / self.std
        h, w = image.shape[:2]
        if self.meta["resize"] == "warp":
            nh, nw = self.height, self.width
        else:
            # fit: one scale for both sides in Python floats, floored, as ImagePreprocessor and
            # F.interpolate(recompute_scale_factor=True) do, so sizes agree to the pixel: the
            # model's own (min_size / max_size, for a scale_as-sized image when the sidecar names one)
            # where its result fits the export size
            scale = min(self.height / h, self.width / w)
            if "min_size" in self.meta:
                sh, sw = self.meta.get("scale_as") or (h, w)
                own = min(self.meta["min_size"] / min(sh, sw), self.meta["max_size"] / max(sh, sw))
                if np.floor(h * own) <= self.height and np.floor(w * own) <= self.width:
                    scale = own
            nh, nw = min(self.height, int(np.floor(h * scale))), min(self.width, int(np.floor(w * scale)))
        return resize_bilinear(x, nh, nw), (nh, nw)

    def batch_shape(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """The export size, or for a dynamic-size export the batch's largest image rounded up to
        the sidecar's ``size_divisible`` (never beyond the export size)."""
        if not self.meta.get("dynamic_size"):
            return self.height, self.width
        d = int(self.meta["size_divisible"])
        return (min(self.height, -(-max(h for h, _ in sizes) // d) * d),
                min(self.width, -(-max(w for _, w in sizes) // d) * d))

    def __call__(self, images: Sequence[np.ndarray], score_thresh: float | None = None) -> list[dict]:
        resized, sizes = zip(*(self.preprocess(im) for im in images))
        batch = np.zeros((len(images), 3, *self.batch_shape(sizes)), np.float32)
        for b, x in enumerate(resized):
            batch[b, :, :x.shape[1], :x.shape[2]] = x
        boxes, scores, labels, counts = self.session.run(
            None, {"images": batch, "image_sizes": np.asarray(sizes, np.float32)})
        thresh = self.meta["score_thresh"] if score_thresh is None else score_thresh
        results = []
        for i, image in enumerate(images):
            n = int(counts[i])
            keep = scores[i, :n] > thresh
            (h, w), (oh, ow) = sizes[i], image.shape[:2]
            scale = np.asarray([ow / w, oh / h, ow / w, oh / h], np.float32)
            lab = labels[i, :n][keep]
            results.append({"boxes": boxes[i, :n][keep] * scale, "scores": scores[i, :n][keep], "labels": lab,
                            "names": [self.class_names[int(c)] for c in lab]})
        return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="densedet.onnx_runner",
                                     description="Detect objects with an exported densedet ONNX model (no torch).")
    parser.add_argument("model", help="model.onnx (its sidecar model.onnx.json must sit beside it)")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--score-thresh", type=float, default=None, help="default: the sidecar's score_thresh")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--json", default=None, help="also write the detections to this JSON file")
    args = parser.parse_args(argv)
    runner = OnnxDetectorRunner(args.model, threads=args.threads)
    exported = runner.meta["score_thresh"]
    if args.score_thresh is not None and not 0 <= args.score_thresh <= 1:
        parser.error(f"--score-thresh: must be a score in [0, 1], got {args.score_thresh:g}")
    if args.score_thresh is not None and args.score_thresh < exported:
        parser.error(f"--score-thresh {args.score_thresh:g}: {args.model} was exported with score_thresh {exported:g}, "
                     f"and the graph returns no detection below it (export again with --score-thresh)")
    records = []
    for path in args.images:
        det = runner([load_rgb(path)], args.score_thresh)[0]
        print(f"{path}: {len(det['scores'])} detections")
        for box, score, name in zip(det["boxes"], det["scores"], det["names"]):
            print(f"  {name:>12s} {score:.3f}  [{box[0]:.1f}, {box[1]:.1f}, {box[2]:.1f}, {box[3]:.1f}]")
            records.append({"image": str(path), "label": name, "score": round(float(score), 5),
                            "box": [round(float(v), 2) for v in box]})
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
