"""The fair test of the paper's claim: DimeNet against three ZBL recipes, matched start, converging schedule.

Every model of a cell trains on the same data and split with the same per-element offset method, DimeNet's
warm-up and exponential decay compressed to the run (the `fair` and `fair_long` profiles of dimezbl_core), and
four seeds. The statistics compare each recipe with DimeNet seed by seed (`paired_change`). docs/fair.md
describes the experiment; `python -m dimezbl.fair train` trains (resumable), `python -m dimezbl.fair report`
writes results/fair/tables and results/fair/figures from the finished runs without training.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

import dimezbl_core as dc

FAIR_RESULTS_DIR = dc.REPOSITORY_ROOT / "results" / "fair"
FAIR_MODELS = ("dimenet", "dimezblnet", "dimezblnet_switched", "dimezblnet_interpolated")
RECIPE_LABELS = {
    "dimenet": "DimeNet",
    "dimezblnet": "(a) literal ZBL",
    "dimezblnet_switched": "(b) switched ZBL",
    "dimezblnet_interpolated": "(c) interpolated ZBL",
}
PAPER_CLAIM_PERCENT = (-5.3, -3.6)  # the paper's abstract: 3.6-5.3% lower errors than DimeNet
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Cell:
    """One comparison: a data set and target trained by every model of FAIR_MODELS under `profile`."""

    dataset: str  # "qm9" or "md17"
    target: str  # QM9 target or MD17 molecule
    profile: str = "fair"  # "fair" (2,000 steps) or "fair_long" (8,000 steps)

    @property
    def max_steps(self) -> int:
        return int(dc.PROFILES[self.profile]["max_steps"])

    @property
    def quantities(self) -> tuple:
        return ("energy", "forces") if self.dataset == "md17" else ("energy",)

    @property
    def label(self) -> str:
        return f"{'MD17' if self.dataset == 'md17' else 'QM9'} {self.target}, {self.max_steps:,} steps"


# In training order: the quick MD17 cells first, the 8,000-step cell last.
FAIR_CELLS = (
    Cell("md17", "ethanol"),
    Cell("md17", "malonaldehyde"),
    Cell("qm9", "U0"),
    Cell("qm9", "alpha"),
    Cell("md17", "ethanol", "fair_long"),
)


def train_fair(cells: Sequence[Cell] = FAIR_CELLS, seeds: Optional[Sequence[int]] = None,
               models: Sequence[str] = FAIR_MODELS, results_dir=FAIR_RESULTS_DIR, progress: bool = True,
               **overrides) -> pd.DataFrame:
    """Train (or resume, or reuse) every run of `cells`, seed by seed with all models of a seed together;
    returns the finished runs (`dc.collect_runs` rows of both profiles). overrides: TrainConfig fields."""
    for cell in cells:
        dc.run_models(cell.profile, cell.dataset, [cell.target], seeds=seeds, models=models,
                      results_dir=results_dir, progress=progress, reuse_committed=True, **overrides)
    return fair_runs(results_dir)


def fair_runs(results_dir=FAIR_RESULTS_DIR) -> pd.DataFrame:
    """Every finished run of the fair profiles, with the data sha256, offset method and last learning rate
    its files record (columns data_sha256, offset_method, final_learning_rate, profile)."""
    frames = [dc.collect_runs(profile, results_dir=results_dir) for profile in ("fair", "fair_long")]
    runs = pd.concat([f for f in frames if not f.empty], ignore_index=True) if any(
        not f.empty for f in frames) else pd.DataFrame(columns=list(dc.RUN_COLUMNS))
    extra = []
    for run_dir in runs["run_dir"]:
        path = dc.results_path(results_dir, run_dir)
        metrics = json.loads((path / "metrics.json").read_text())
        provenance_path = path / "provenance.json"
        provenance = json.loads(provenance_path.read_text()) if provenance_path.exists() else {}
        extra.append({"data_sha256": provenance.get("data", {}).get("content_sha256"),
                      "offset_method": metrics.get("offset_method"),
                      "final_learning_rate": metrics.get("final_learning_rate")})
    return pd.concat([runs, pd.DataFrame(extra, index=runs.index)], axis=1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dimezbl.fair", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train every fair run (resumable; finished runs are reused)")
    train.add_argument("--cells", nargs="+", default=None,
                       help="cells as dataset/target/profile, e.g. md17/ethanol/fair (default: all)")
    train.add_argument("--seeds", nargs="+", type=int, default=None)
    train.add_argument("--device", default="auto")
    train.add_argument("--no-progress", action="store_true")
    sub.add_parser("report", help="tables and figures from the finished runs (no training)")
    parser.add_argument("--results-dir", default=str(FAIR_RESULTS_DIR))
    args = parser.parse_args(argv)
    if args.command == "train":
        cells = FAIR_CELLS if args.cells is None else [Cell(*text.split("/")) for text in args.cells]
        train_fair(cells, args.seeds, results_dir=args.results_dir, progress=not args.no_progress,
                   device=args.device)
    else:
        paths = write_fair_report(args.results_dir)  # noqa: F821 (defined below)
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
