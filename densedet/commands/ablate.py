"""``densedet ablate``: the focal-loss paper's Table 1b and 1d, in miniature, on any config.

Lin et al., "Focal Loss for Dense Object Detection" (ICCV 2017), Table 1:

- **1b** varies the focusing parameter γ of the focal loss, each with the best α the authors found
  for it (they tested α ∈ [.01, .999]; lower α wins at higher γ because easy negatives are already
  down-weighted). γ = 0 is α-balanced cross-entropy.
- **1d** compares FL with online hard example mining (OHEM, and "OHEM 1:3" with a fixed 1:3
  positive:negative ratio). We add GHM-C (Li et al., AAAI 2019), which seed 001 lists as related
  work; the losses live in :mod:`densedet.ablation_losses`.

Every run is one ``densedet.engine.trainer.train(cfg)`` call with the same config except the loss
settings, the same seed, a fixed budget (``--budget-iters N``: ``train.max_iters = N`` and the
config's step schedule and warm-up compressed proportionally; ``--budget-minutes M``:
``train.max_minutes = M``, the trainer stretches the schedule to it) and its own
``train.output_dir`` under ``OUT/runs/<name>``. A finished run leaves ``ablation_result.json``
there and is not trained again unless ``--rerun``.

Outputs in ``OUT``: ``table_gamma.md/.csv`` (γ, α, AP, AP50, AP75 as in Table 1b),
``table_loss.md/.csv`` (method, AP, AP50, AP75 as in Table 1d), ``ap_vs_gamma.png`` and
``ablation.json``. AP values are printed ×100, as the paper prints them. The paper's own numbers
are shown beside ours for orientation only: they are COCO, ResNet-50/101-FPN at 600 px and 90k
iterations; a miniature run can reproduce the ordering, not the values.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import Config, ConfigError, apply_overrides, find_config, load_config, to_dict
from ..engine.trainer import TrainingError, train
from ..errors import DensedetError, UsageError
from . import require_folder

__all__ = ["PAPER_TABLE_1B", "PAPER_TABLE_1D", "DEFAULT_GAMMAS", "LOSS_METHODS", "AblationRun", "paper_alpha",
           "plan_runs", "run_config", "run_ablation", "write_tables", "plot_ap_vs_gamma", "add_parser", "run"]

# Lin et al. 2017, Table 1b ("Varying γ for FL (w. optimal α)"; ResNet-50-FPN, 600 px, COCO minival):
# γ -> (best α, AP, AP50, AP75).
PAPER_TABLE_1B: dict[float, tuple[float, float, float, float]] = {
    0.0: (0.75, 31.1, 49.4, 33.0),
    0.1: (0.75, 31.4, 49.9, 33.1),
    0.2: (0.75, 31.9, 50.7, 33.4),
    0.5: (0.50, 32.9, 51.7, 35.2),
    1.0: (0.25, 33.7, 52.0, 36.2),
    2.0: (0.25, 34.0, 52.5, 36.5),
    5.0: (0.25, 32.2, 49.6, 34.8),
}
# Lin et al. 2017, Table 1d ("FL vs. OHEM baselines", ResNet-101-FPN): the rows matching our
# methods at batch size 128 per image and nms 0.5 (the best OHEM setting), and FL.
PAPER_TABLE_1D: dict[str, tuple[float, float, float]] = {
    "FL": (36.0, 54.9, 38.7),
    "OHEM 1:3": (31.1, 47.2, 33.2),
    "OHEM": (32.8, 50.3, 35.1),
}
# SPEC "Losses from the related work": the γ sweep to reproduce in miniature.
DEFAULT_GAMMAS: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0)
# Table 1d rows: method name -> model.retinanet.cls_loss. FL is the γ = 2, α = .25 run of the γ sweep.
LOSS_METHODS: dict[str, str] = {"FL": "focal", "OHEM 1:3": "ohem", "OHEM": "ohem_topk", "GHM-C": "ghmc"}
_METRICS = ("AP", "AP50", "AP75")


def paper_alpha(gamma: float) -> float:
    """The paper's best α for ``gamma`` (Table 1b); for an untabulated γ, that of the nearest tabulated one."""
    nearest = min(PAPER_TABLE_1B, key=lambda g: (abs(g - gamma), g))
    return PAPER_TABLE_1B[nearest][0]


@dataclass
class AblationRun:
    """One training run of the sweep.

    ``name`` is its folder under ``OUT/runs``; ``groups`` the tables it appears in ("gamma",
    "loss"); ``gamma``/``alpha`` are set for focal-loss runs (None where the loss ignores them).
    """

    name: str
    method: str
    cls_loss: str
    gamma: float | None = None
    alpha: float | None = None
    groups: list[str] = field(default_factory=list)

    def overrides(self) -> dict[str, Any]:
        """Config keys this run changes (besides budget and output folder)."""
        out: dict[str, Any] = {"model.retinanet.cls_loss": self.cls_loss}
        if self.gamma is not None:
            out["model.retinanet.focal_gamma"] = float(self.gamma)
        if self.alpha is not None:
            out["model.retinanet.focal_alpha"] = float(self.alpha)
        return out


def _focal_run(gamma: float, alpha: float) -> AblationRun:
    return AblationRun(f"fl_gamma{gamma:g}_alpha{alpha:g}", "FL", "focal", float(gamma), float(alpha))


def plan_runs(gammas: Sequence[float] | None = DEFAULT_GAMMAS,
              methods: Sequence[str] | None = tuple(LOSS_METHODS)) -> list[AblationRun]:
    """The runs of the γ sweep (each γ with :func:`paper_alpha`) and of the loss comparison.

    ``gammas=None`` or empty skips Table 1b, ``methods=None`` or empty skips Table 1d. The FL row
    of 1d is γ = 2, α = .25 — the same run as in the sweep, trained once.
    """
    runs: dict[str, AblationRun] = {}
    for g in gammas or ():
        r = _focal_run(g, paper_alpha(g))
        runs.setdefault(r.name, r).groups.append("gamma")
    for method in methods or ():
        if method not in LOSS_METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(LOSS_METHODS)}")
        if method == "FL":
            r = _focal_run(2.0, 0.25)
        else:
            r = AblationRun(LOSS_METHODS[method].replace("_", "-"), method, LOSS_METHODS[method])
        r = runs.setdefault(r.name, r)
        if "loss" not in r.groups:
            r.groups.append("loss")
    return list(runs.values())


def run_config(cfg: Config, run: AblationRun, out_dir: str | os.PathLike, budget_iters: int | None = None,
               budget_minutes: float | None = None) -> Config:
    """A copy of ``cfg`` for one run: the run's loss settings, the budget, ``OUT/runs/<name>``.

    With ``budget_iters`` the config's schedule is compressed to the budget: steps and warm-up
    scaled by ``budget_iters / train.max_iters`` (the paper's 1x schedule drops the rate at 2/3 and
    8/9 of training, which a fixed-budget comparison should keep). A config whose length is set
    by a time budget (``train.max_minutes > 0``, ``max_iters`` a mere cap) keeps its warm-up
    iterations as they are: scaling them by budget / cap would remove the warm-up. With ``budget_minutes``
    ``train.max_minutes`` is set and the trainer stretches the schedule to it.
    """
    if (budget_iters is None) == (budget_minutes is None):
        raise ValueError("give exactly one of budget_iters and budget_minutes")
    overrides = dict(run.overrides())
    overrides["train.output_dir"] = str(Path(out_dir) / "runs" / run.name)
    if budget_iters is not None:
        if budget_iters < 1:
            raise ValueError(f"budget_iters must be >= 1, got {budget_iters}")
        scale = budget_iters / cfg.train.max_iters
        overrides["train.max_iters"] = int(budget_iters)
        overrides["train.max_minutes"] = 0.0
        overrides["solver.steps"] = sorted({max(1, round(s * scale)) for s in cfg.solver.steps
                                            if s < cfg.train.max_iters})
        warmup_scale = 1.0 if cfg.train.max_minutes > 0 else scale
        overrides["solver.warmup_iters"] = min(round(cfg.solver.warmup_iters * warmup_scale), budget_iters)
    else:
        if budget_minutes <= 0:
            raise ValueError(f"budget_minutes must be > 0, got {budget_minutes}")
        overrides["train.max_minutes"] = float(budget_minutes)
    # JSON is valid YAML, so apply_overrides parses these back to the same values, type-checked.
    return apply_overrides(cfg, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def _default_train() -> Callable[..., dict]:
    """The trainer a run uses when ``run_ablation`` gets no ``train_fn`` (looked up per call: tests replace it)."""
    return train


def _load_result(path: Path, run_cfg: Config) -> dict | None:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("error") or result.get("config") != json.loads(json.dumps(to_dict(run_cfg))):
        return None   # failed before, or trained under other settings: train again
    return result


def run_ablation(cfg: Config, out_dir: str | os.PathLike, runs: Sequence[AblationRun],
                 budget_iters: int | None = None, budget_minutes: float | None = None,
                 train_fn: Callable[..., dict] | None = None, rerun: bool = False, log=print) -> list[dict]:
    """Train every run (or reuse its saved result), then write the tables, plot and ``ablation.json``.

    ``train_fn(cfg, resume=False, log=log) -> metrics`` defaults to
    ``densedet.engine.trainer.train``. A run that raises is recorded with its error and the sweep
    goes on. Returns one dict per run: ``name, method, cls_loss, gamma, alpha, groups, metrics,
    error, config``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = [run_config(cfg, r, out, budget_iters, budget_minutes) for r in runs]
    results = []
    for i, (r, run_cfg) in enumerate(zip(runs, configs), 1):
        result_path = Path(run_cfg.train.output_dir) / "ablation_result.json"
        saved = None if rerun else _load_result(result_path, run_cfg)
        if saved is not None:
            log(f"[{i}/{len(runs)}] {r.name}: reusing {result_path}")
            results.append(saved)
            continue
        log(f"[{i}/{len(runs)}] {r.name}: training with {r.overrides()}")
        metrics, error = None, None
        try:
            metrics = (train_fn or _default_train())(run_cfg, resume=False, log=log)
            if not isinstance(metrics, dict):
                raise TypeError(f"train returned {type(metrics).__name__}, expected a dict of metrics")
        except TrainingError as err:   # this run's loss diverged: the others may not
            error = f"{type(err).__name__}: {err}"
            log(f"[{i}/{len(runs)}] {r.name} failed: {error}")
        except DensedetError:
            raise   # bad data or files: the same in every run, so every run would fail on it
        except Exception as err:  # noqa: BLE001 - one failed run must not lose the others
            error = f"{type(err).__name__}: {err}"
            log(f"[{i}/{len(runs)}] {r.name} failed: {error}\n{traceback.format_exc()}")
        result = {"name": r.name, "method": r.method, "cls_loss": r.cls_loss, "gamma": r.gamma, "alpha": r.alpha,
                  "groups": r.groups, "metrics": _json_metrics(metrics), "error": error, "config": to_dict(run_cfg)}
        result_path.parent.mkdir(parents=True, exist_ok=True)
        result_path.write_text(json.dumps(result, indent=1))
        results.append(result)
    write_tables(results, out)
    plot_ap_vs_gamma(results, out / "ap_vs_gamma.png")
    (out / "ablation.json").write_text(json.dumps(
        {"budget_iters": budget_iters, "budget_minutes": budget_minutes, "runs": results}, indent=1))
    return results


def _json_metrics(metrics: dict | None) -> dict | None:
    if metrics is None:
        return None
    out = {}
    for k, v in metrics.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v) if math.isfinite(v) else None
    return out


# -- tables and plot ------------------------------------------------------------------------------

def _percent(result: dict, key: str) -> float | None:
    """Metric ``key`` ×100 (pycocotools gives fractions), or None when missing or the run failed."""
    value = (result.get("metrics") or {}).get(key)
    return None if value is None else 100.0 * float(value)


def _note(result: dict) -> str:
    return "failed: " + result["error"].replace("|", "/").replace("\n", " ") if result["error"] else ""


def _cell(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _paper_1b(gamma: float | None) -> tuple[float, float, float] | None:
    row = PAPER_TABLE_1B.get(float(gamma)) if gamma is not None else None
    return row[1:] if row else None


def write_tables(results: Sequence[dict], out_dir: str | os.PathLike) -> list[Path]:
    """``table_gamma.md/.csv`` (Table 1b layout) and ``table_loss.md/.csv`` (Table 1d layout)."""
    out = Path(out_dir)
    paths = []
    gamma_rows = sorted((r for r in results if "gamma" in r["groups"]), key=lambda r: r["gamma"])
    if gamma_rows:
        md = ["Varying γ for FL, each with the paper's best α (layout of Lin et al. 2017, Table 1b).",
              "AP ×100 on the validation split; *paper*: their COCO numbers (ResNet-50-FPN, 600 px), "
              "for the ordering.",
              "", "| γ | α | AP | AP50 | AP75 | paper AP | paper AP50 | paper AP75 | note |",
              "|---|---|---|---|---|---|---|---|---|"]
        rows = []
        for r in gamma_rows:
            ours = [_percent(r, k) for k in _METRICS]
            paper = _paper_1b(r["gamma"]) or (None, None, None)
            md.append(f"| {r['gamma']:g} | {r['alpha']:g} | " + " | ".join(_cell(v) for v in ours) + " | "
                      + " | ".join(_cell(v) for v in paper) + f" | {_note(r)} |")
            rows.append([r["name"], r["gamma"], r["alpha"], *ours, *paper, r["error"] or ""])
        paths += _write(out / "table_gamma", md, ["run", "gamma", "alpha", *_METRICS, "paper_AP", "paper_AP50",
                                                  "paper_AP75", "error"], rows)
    order = list(LOSS_METHODS)
    loss_rows = sorted((r for r in results if "loss" in r["groups"]),
                       key=lambda r: order.index(r["method"]) if r["method"] in order else len(order))
    if loss_rows:
        md = ["FL vs OHEM vs GHM-C (layout of Lin et al. 2017, Table 1d).",
              "OHEM keeps 128 anchors per image, "
              "without NMS among examples (the loss sees no boxes); *paper*: their ResNet-101-FPN rows at batch 128, "
              "nms .5.",
              "", "| method | loss | batch size | AP | AP50 | AP75 | paper AP | note |",
              "|---|---|---|---|---|---|---|---|"]
        rows = []
        for r in loss_rows:
            ours = [_percent(r, k) for k in _METRICS]
            paper = PAPER_TABLE_1D.get(r["method"], (None, None, None))
            batch = "128/img" if r["cls_loss"].startswith("ohem") else "n/a"
            method = r["method"] + (f" (γ {r['gamma']:g}, α {r['alpha']:g})" if r["gamma"] is not None else "")
            md.append(f"| {method} | {r['cls_loss']} | {batch} | " + " | ".join(_cell(v) for v in ours)
                      + f" | {_cell(paper[0])} | {_note(r)} |")
            rows.append([r["name"], r["method"], r["cls_loss"], *ours, paper[0], r["error"] or ""])
        paths += _write(out / "table_loss", md, ["run", "method", "cls_loss", *_METRICS, "paper_AP", "error"], rows)
    return paths


def _write(stem: Path, md_lines: list[str], header: list[str], rows: list[list]) -> list[Path]:
    md, csv_path = stem.with_suffix(".md"), stem.with_suffix(".csv")
    md.write_text("\n".join(md_lines) + "\n")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(["" if v is None else (round(v, 3) if isinstance(v, float) else v) for v in row])
    return [md, csv_path]


def plot_ap_vs_gamma(results: Sequence[dict], path: str | os.PathLike) -> Path | None:
    """AP against γ for the sweep (left axis), the paper's Table 1b beside it (right axis, grey), and the
    other losses as horizontal lines. None when no γ run finished."""
    # matplotlib is imported here, not at the top: it is heavy and only this plot needs it
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep = sorted(((r["gamma"], _percent(r, "AP")) for r in results if "gamma" in r["groups"]),
                   key=lambda t: t[0])
    sweep = [(g, ap) for g, ap in sweep if ap is not None]
    if not sweep:
        return None
    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([g for g, _ in sweep], [ap for _, ap in sweep], "o-", color="tab:blue", lw=2, label="FL, this run")
    others = [r for r in results
              if "loss" in r["groups"] and r["cls_loss"] != "focal" and _percent(r, "AP") is not None]
    for k, r in enumerate(others, 1):
        ax.axhline(_percent(r, "AP"), ls=":", lw=1.2, color=f"C{k}", label=r["method"])
    ax.set_xlabel("γ (α: the paper's best for each γ)")
    ax.set_ylabel("AP ×100")
    ax.grid(True, alpha=0.3)
    paper = ax.twinx()
    gs = sorted(PAPER_TABLE_1B)
    paper.plot(gs, [PAPER_TABLE_1B[g][1] for g in gs], "s--", color="grey", alpha=0.7,
               label="paper Table 1b (COCO)")
    paper.set_ylabel("paper AP (COCO, R50-FPN 600 px)", color="grey")
    handles = ax.get_legend_handles_labels()
    extra = paper.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower center")
    ax.set_title("AP vs γ (Lin et al. 2017, Table 1b, in miniature)")
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# -- command line ---------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    """Register ``densedet ablate CONFIG [key=value ...] (--budget-iters N | --budget-minutes M) --out DIR``."""
    p = subparsers.add_parser(
        "ablate", help="reproduce the focal-loss paper's γ and FL-vs-OHEM ablations in miniature",
        description="Train one model per setting — γ in {0, 0.5, 1, 2, 5} with the paper's best α (Table 1b), "
                    "and FL vs OHEM 1:3 vs OHEM vs GHM-C (Table 1d) — each with the same fixed budget, and write "
                    "the tables (Markdown and CSV) and a plot of AP against γ.")
    p.add_argument("config", help="YAML config file, or the name of a config shipped with densedet")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides applied to every run")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-iters", type=int, help="iterations per run (schedule compressed to it)")
    budget.add_argument("--budget-minutes", type=float, help="training minutes per run")
    p.add_argument("--out", required=True, help="output folder (runs go to OUT/runs/<name>)")
    p.add_argument("--gammas", type=float, nargs="*", default=list(DEFAULT_GAMMAS),
                   help="γ values of the sweep (default 0 0.5 1 2 5); none: skip the sweep")
    p.add_argument("--methods", nargs="*", default=list(LOSS_METHODS), choices=list(LOSS_METHODS),
                   help="losses to compare (default: all); none: skip the comparison")
    p.add_argument("--rerun", action="store_true", help="train again even where a run's result is saved")
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot give a meaningful sweep, naming the option (before any work)."""
    if args.budget_iters is not None and args.budget_iters < 1:
        raise UsageError(f"--budget-iters: must be >= 1, got {args.budget_iters}")
    if args.budget_minutes is not None and not (math.isfinite(args.budget_minutes) and args.budget_minutes > 0):
        raise UsageError(f"--budget-minutes: must be a number of minutes > 0, got {args.budget_minutes:g}")
    bad = [g for g in args.gammas or () if not (math.isfinite(g) and g >= 0)]
    if bad:   # γ < 0 up-weights the easy examples: not the focal loss the tables compare
        raise UsageError(f"--gammas: γ must be a number >= 0, got {' '.join(f'{g:g}' for g in bad)}")
    if not args.gammas and not args.methods:
        raise UsageError("--gammas, --methods: nothing to run: give γ values and/or methods")
    require_folder(args.out, "--out", "the tables, the plot and runs/")


def run(args: argparse.Namespace) -> int:
    """``densedet ablate``: 0 when every run finished, 1 when some failed; bad input raises (exit code 2
    through ``densedet.cli.main``)."""
    _check_args(args)
    path = find_config(args.config)
    cfg = load_config(path, list(args.overrides))
    if cfg.model.arch != "retinanet":   # the runs change model.retinanet.*, which another model ignores
        raise ConfigError(f"{path}: model.arch is {cfg.model.arch}; ablate compares RetinaNet's "
                          f"classification losses (model.retinanet.cls_loss), every run would train the same model")
    runs = plan_runs(args.gammas, args.methods)
    for r in runs:   # check every run's config before the first one trains
        run_config(cfg, r, args.out, args.budget_iters, args.budget_minutes)
    total = (f"{len(runs)} x {args.budget_iters} iterations" if args.budget_iters is not None
             else f"{len(runs)} x {args.budget_minutes:g} minutes = {len(runs) * args.budget_minutes:g} minutes")
    print(f"ablation: {total}: " + ", ".join(r.name for r in runs))
    results = run_ablation(cfg, args.out, runs, args.budget_iters, args.budget_minutes, rerun=args.rerun)
    for name in ("table_gamma.md", "table_loss.md"):
        if (Path(args.out) / name).exists():
            print((Path(args.out) / name).read_text())
    failed = [r["name"] for r in results if r["error"]]
    if failed:
        print(f"densedet ablate: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0
