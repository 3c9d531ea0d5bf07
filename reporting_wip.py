"""Reporting: the paper's Tables 1 and 2 (quoted), our runs beside them, figures, `reproduce`.

Work in progress, to be merged into dimezbl_core.py as its "Reporting" section (after
"Training and evaluation", before "Command-line entry"); it only calls into that module.

=====================================  ===================================================
section                                paper
=====================================  ===================================================
The paper's numbers                    Table 1 (QM9) and Table 2 (MD17), verbatim
Results directory                      results/{runs,tables,figures,executed}
Training every model                   Sec. 4.2-4.3: DimeNet and DimezblNet on the same data,
                                       splits, budget and seeds
Tables                                 Tables 1 and 2 in the paper's layout, with "this run"
                                       columns (mean +/- std over seeds) and the relative change
Predictions and compression curves     parity data; E(r) of a bond compressed and stretched
                                       (learned part vs ZBL, Eq. 8-10)
Figures                                Eq. 4-6 bases, Eq. 8-10 ZBL, learning curves, parity
Notebooks                              `reproduce`: notebooks 01-05 through papermill
=====================================  ===================================================

Units: distances in Angstrom; QM9 MAEs in Table 1's units (meV for energies), MD17 in kcal/mol
and kcal/mol/Angstrom. Every "this run" number comes from the metrics.json of a run directory
that the tables name.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

import dimezbl_core as dc

# =============================================================================================
# --- Reporting: the paper's Tables 1 and 2, quoted verbatim ---
# =============================================================================================
# Cells are the strings printed in ../shared/paper/dimezblnet-paper.md (so "0.10" stays "0.10");
# None is the paper's "-" (no value). `paper_value` gives them as floats.

PAPER_TABLE1_COLUMNS = ("PPGN", "SchNet", "PhysNet", "Cormorant", "DimeNet", "DimezblNet")
PAPER_TABLE1 = {
    # QM9 target: (row label, unit as printed ("ao" read as a0), cells in PAPER_TABLE1_COLUMNS order)
    "mu": ("mu", "D", ("0.017", "0.033", "0.0529", "0.13", "0.0286", "0.0273")),
    "alpha": ("alpha", "a0^3", ("0.131", "0.235", "0.0615", "0.092", "0.0469", "0.0452")),
    "homo": ("HOMO", "meV", ("40.3", "41", "32.9", "36", "27.8", "26.7")),
    "lumo": ("LUMO", "meV", ("32.7", "34", "24.7", "36", "19.7", "18.9")),
    "gap": ("gap", "meV", ("60", "63", "42.5", "60", "34.8", "33.1")),
    "r2": ("R2", "a0^2", ("0.592", "0.703", "0.75", "0.673", "0.231", "0.217")),
    "zpve": ("ZPVE", "meV", ("3.12", "1.7", "1.395", "1.98", "1.29", "1.23")),
    "U0": ("U0", "meV", ("36.8", "18", "14", "13", "8.29", "8.07")),
    "U": ("U", "meV", ("36.8", "19", "14", None, "7.89", "7.63")),
    "H": ("H", "meV", ("36.3", "14", "14", None, "8.11", "7.92")),
    "G": ("G", "meV", ("36.4", "14", "14", None, "8.98", "8.71")),
    "cv": ("Cv", "(K*cal)/mol", ("0.055", "0.033", "0.028", "0.031", "0.0249", "0.0237")),
}
# The paper's units next to ours (dc.QM9_REPORTING_UNITS): a0 is the bohr; "(K*cal)/mol" is how
# the paper prints QM9's cal/(mol K) for Cv (DimeNet's table, which it copies, has cal/(mol K)).
PAPER_TABLE1_UNIT_NOTE = ("units: a0^3 and a0^2 of the paper are bohr^3 and bohr^2; Cv is in "
                          "cal/(mol K), printed '(K*cal)/mol' in the paper")

NOT_REPORTED = "not reported"  # the paper's Table 2 ends before uracil's forces row
PAPER_TABLE2_COLUMNS = ("sGDML", "SchNet", "DimeNet", "DimezblNet")  # printed "SGDML"
PAPER_TABLE2 = {
    # (MD17 molecule, quantity): cells in PAPER_TABLE2_COLUMNS order; energy kcal/mol, forces kcal/mol/A
    ("aspirin", "energy"): ("0.19", "0.37", "0.204", "0.194"),
    ("aspirin", "forces"): ("0.68", "1.35", "0.499", "0.473"),
    ("benzene", "energy"): ("0.1", "0.08", "0.078", "0.075"),
    ("benzene", "forces"): ("0.06", "0.31", "0.187", "0.181"),
    ("ethanol", "energy"): ("0.07", "0.08", "0.064", "0.062"),
    ("ethanol", "forces"): ("0.33", "0.39", "0.23", "0.217"),
    ("malonaldehyde", "energy"): ("0.10", "0.13", "0.104", "0.098"),
    ("malonaldehyde", "forces"): ("0.41", "0.66", "0.383", "0.367"),
    ("naphthalene", "energy"): ("0.12", "0.16", "0.122", "0.117"),
    ("naphthalene", "forces"): ("0.11", "0.58", "0.215", "0.208"),
    ("salicylic_acid", "energy"): ("0.12", "0.2", "0.134", "0.127"),
    ("salicylic_acid", "forces"): ("0.28", "0.85", "0.374", "0.361"),
    ("toluene", "energy"): ("0.1", "0.12", "0.102", "0.097"),
    ("toluene", "forces"): ("0.14", "0.57", "0.216", "0.207"),
    ("uracil", "energy"): ("0.11", "0.14", "0.115", "0.107"),
    ("uracil", "forces"): (NOT_REPORTED,) * 4,
}
MD17_LABELS = {"aspirin": "Aspirin", "benzene": "Benzene", "ethanol": "Ethanol",
               "malonaldehyde": "Malonaldehyde", "naphthalene": "Naphthalene",
               "salicylic_acid": "Salicylic acid", "toluene": "Toluene", "uracil": "Uracil"}
MD17_QUANTITIES = ("energy", "forces")
MD17_UNITS = {"energy": "kcal/mol", "forces": "kcal/mol/A"}


def paper_value(table: int, row, column: str) -> Optional[float]:
    """A quoted cell of the paper's Table `table` (1 or 2) as a float; None where the paper has
    none ("-" in Table 1, uracil's forces in Table 2). `row` is a QM9 target (Table 1) or a
    (molecule, quantity) pair (Table 2)."""
    if table == 1:
        cells, columns = PAPER_TABLE1[row][2], PAPER_TABLE1_COLUMNS
    elif table == 2:
        cells, columns = PAPER_TABLE2[tuple(row)], PAPER_TABLE2_COLUMNS
    else:
        raise ValueError(f"the paper has Tables 1 and 2, not {table!r}")
    if column not in columns:
        raise ValueError(f"Table {table} has no column {column!r}: use one of {columns}")
    cell = cells[columns.index(column)]
    return None if cell in (None, NOT_REPORTED) else float(cell)


# =============================================================================================
# --- Reporting: the results directory ---
# =============================================================================================

def results_path(results_dir=None, *parts) -> Path:
    """<results_dir>/<parts>: None is <repository>/results; a relative path is taken from the
    repository root (as TrainConfig.out_dir), so notebooks and `make` agree whatever their cwd."""
    root = Path(results_dir) if results_dir is not None else Path("results")
    if not root.is_absolute():
        root = dc.REPOSITORY_ROOT / root
    return root.joinpath(*parts)


def _relative_to_results(path, results_dir=None) -> str:
    """A run directory as written in tables: relative to the results directory when inside it."""
    path, root = Path(path).resolve(), results_path(results_dir).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# =============================================================================================
# --- Reporting: training every (target, model, seed) ---
# =============================================================================================

MODEL_ZBL = {"dimenet": False, "dimezblnet": True}  # TrainConfig.model_name -> TrainConfig.zbl
MODEL_LABELS = {"dimenet": "DimeNet", "dimezblnet": "DimezblNet"}
# Seeds per profile (issue 7: 1 for smoke, at least 3 for cpu and paper). To move into PROFILES.
PROFILE_SEEDS = {"smoke": (0,), "cpu": (0, 1, 2), "paper": (0, 1, 2)}
# GFN2-xTB configurations generated per MD17 molecule: n_train + n_valid + the test set
# (smoke 200 + 50 + 150; cpu 1,000 + 500 + 1,000; paper 1,000 + 1,000 + 10,000 as Sec. 4.3).
MD17_CONFIGS_PER_PROFILE = {"smoke": 400, "cpu": 2500, "paper": 12_000}
# Config fields that do not change what a finished run measured (out_dir: results may move).
_IGNORED_WHEN_REUSING = ("device", "out_dir")


def profile_seeds(profile: str) -> tuple:
    """The seeds a profile trains every model with."""
    if profile not in PROFILE_SEEDS:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILE_SEEDS)}")
    return PROFILE_SEEDS[profile]


def _md17_configs_needed(config: dc.TrainConfig) -> int:
    """The fewest configurations RunData can split for this config (n_train + n_valid + test)."""
    n_train = config.n_train or 1000
    n_valid = config.n_valid if config.n_valid is not None else 1000
    return n_train + n_valid + (config.n_test or 1)


def ensure_md17_data(molecule: str, n_configs: int, data_dir=None, progress: bool = True) -> Path:
    """The generated (GFN2-xTB) data file of `molecule` with at least `n_configs` configurations:
    used as it is when large enough (never shrunk), else generated or extended (resumable)."""
    path = dc.md17_default_path(molecule, "generated", data_dir)
    if path.is_file():
        with np.load(path) as npz:
            available = int(npz["E"].shape[0])
        if available >= n_configs:
            return path
        print(f"{molecule}: {available} generated configurations, {n_configs} needed: extending {path}",
              flush=True)
    torch_threads = torch.get_num_threads()
    try:
        return dc.generate_md17(molecule, n_configs, data_dir=data_dir, progress=progress)
    finally:  # the generator pins OpenMP (shared with torch) to one thread for tblite
        torch.set_num_threads(torch_threads)


def _config_mismatch(stored: dict, config: dc.TrainConfig) -> list:
    """Fields in which a run directory's config.json differs from `config`."""
    wanted = config.to_dict()
    return sorted(key for key in set(stored) | set(wanted)
                  if key not in _IGNORED_WHEN_REUSING and stored.get(key) != wanted.get(key))


def run_models(profile: str, dataset: str, targets: Sequence[str], seeds: Optional[Sequence[int]] = None,
               models: Sequence[str] = ("dimenet", "dimezblnet"), data_dir=None, results_dir=None,
               progress: bool = True, overwrite: bool = False, md17_configs: Optional[int] = None,
               **overrides) -> pd.DataFrame:
    """Train every (target, model, seed) of a profile; return their metrics (`collect_runs`).

    targets: QM9 targets (dc.QM9_TARGETS) or MD17 molecules (dc.MD17_MOLECULES). seeds: None is
    the profile's (PROFILE_SEEDS). Each model gets the same data, splits, budget and seed.
    overrides: TrainConfig fields (e.g. max_steps=20, n_train=64, device="cpu"); None values
    mean "the profile's". Runs go to <results_dir>/runs/<profile>/<dataset>/<target>/.

    Resumable: a run whose metrics.json and checkpoint_best.pt exist with the same config is
    reused without training; an interrupted run resumes from its checkpoint (dc.train). A run directory holding another
    config is an error unless overwrite=True (then it is trained again from scratch).
    MD17 (source "generated"): the GFN2-xTB data are generated first where missing, with
    md17_configs configurations (None: MD17_CONFIGS_PER_PROFILE of the profile).
    """
    if dataset not in ("qm9", "md17"):
        raise ValueError(f"unknown dataset {dataset!r}: use 'qm9' or 'md17'")
    targets = [str(t) for t in ([targets] if isinstance(targets, str) else targets)]
    if not targets:
        raise ValueError("no targets given: name QM9 targets or MD17 molecules")
    if dataset == "qm9":
        unknown = [t for t in targets if t not in dc.QM9_TARGETS]
        if unknown:
            raise ValueError(f"unknown QM9 targets {unknown}: use some of {dc.QM9_TARGETS}")
    else:
        targets = [dc.md17_molecule_name(t) for t in targets]
    unknown = [m for m in models if m not in MODEL_ZBL]
    if unknown:
        raise ValueError(f"unknown models {unknown}: use some of {tuple(MODEL_ZBL)}")
    seeds = [int(s) for s in (profile_seeds(profile) if seeds is None else seeds)]
    if not seeds:
        raise ValueError("no seeds given (None: the profile's seeds)")
    fields = {key: value for key, value in overrides.items() if value is not None}
    fields["out_dir"] = str(results_path(results_dir, "runs"))
    if data_dir is not None:
        fields["data_dir"] = str(data_dir)

    for target in targets:
        configs = [dc.profile_config(profile, dataset, target, zbl=MODEL_ZBL[model], seed=seed, **fields)
                   for model in models for seed in seeds]
        if dataset == "md17" and configs[0].md17_source == "generated":
            wanted = md17_configs or MD17_CONFIGS_PER_PROFILE.get(profile, 0)
            ensure_md17_data(target, max(wanted, _md17_configs_needed(configs[0])), data_dir, progress)
        for config in configs:
            run_dir = config.run_dir
            stored_path, metrics_path = run_dir / "config.json", run_dir / "metrics.json"
            resume = True
            if stored_path.exists():
                mismatch = _config_mismatch(json.loads(stored_path.read_text()), config)
                if mismatch and not overwrite:
                    raise ValueError(
                        f"{run_dir} holds a run with another config (differs in {', '.join(mismatch)}); "
                        "pass overwrite=True to train it again, or use another results_dir")
                if not mismatch and metrics_path.exists() and (run_dir / "checkpoint_best.pt").exists():
                    print(f"reusing {_relative_to_results(run_dir, results_dir)} (same config)", flush=True)
                    continue
                resume = not mismatch
            start = time.perf_counter()
            metrics = dc.train(config, resume=resume, progress=progress)
            test = ", ".join(f"{k} {v:.4g} {metrics['units'][k.split('_')[0]]}"
                             for k, v in metrics["test"].items() if k.endswith("_mae"))
            print(f"trained {_relative_to_results(run_dir, results_dir)} in {time.perf_counter() - start:.0f} s: "
                  f"test MAE {test}", flush=True)
    runs = collect_runs(profile, dataset, results_dir)
    keep = runs["target"].isin(targets) & runs["model"].isin(list(models)) & runs["seed"].isin(seeds)
    return runs[keep].reset_index(drop=True)


RUN_COLUMNS = (
    "profile", "dataset", "target", "model", "seed", "run_dir",
    "test_energy_mae", "test_forces_mae", "valid_energy_mae", "valid_forces_mae",
    "mean_predictor_energy_mae", "mean_predictor_forces_mae", "energy_unit", "forces_unit",
    "n_train", "n_valid", "n_test", "steps", "best_step", "stop_reason", "batch_size", "model_overrides",
    "num_parameters", "train_wall_time_s", "git_commit", "git_dirty", "hardware", "md17_source",
    "data_dir",
)  # fmt: skip


def _hardware_text(hardware: dict) -> str:
    if not hardware:
        return "unknown"
    chip = hardware.get("gpu") or hardware.get("cpu") or "?"
    return (f"{hardware.get('device', '?')} ({chip}), {hardware.get('cpu_count', '?')} CPU cores, "
            f"{hardware.get('torch_threads', '?')} torch threads")


def _run_row(run_dir: Path, results_dir) -> dict:
    """One run's record from its metrics.json, config.json and provenance.json."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    provenance_path = run_dir / "provenance.json"
    provenance = json.loads(provenance_path.read_text()) if provenance_path.exists() else {}
    model = "dimezblnet" if config["zbl"] else "dimenet"
    test, valid = metrics["test"], metrics["valid"]
    baseline, units = metrics.get("test_mean_predictor", {}), metrics.get("units", {})
    git = provenance.get("git", {})
    return {
        "profile": config["profile"], "dataset": config["dataset"], "target": config["target"],
        "model": model, "seed": int(config["seed"]), "run_dir": _relative_to_results(run_dir, results_dir),
        "test_energy_mae": test["energy_mae"], "test_forces_mae": test.get("forces_mae", math.nan),
        "valid_energy_mae": valid["energy_mae"], "valid_forces_mae": valid.get("forces_mae", math.nan),
        "mean_predictor_energy_mae": baseline.get("energy_mae", math.nan),
        "mean_predictor_forces_mae": baseline.get("forces_mae", math.nan),
        "energy_unit": units.get("energy"), "forces_unit": units.get("forces"),
        "n_train": metrics["n_train"], "n_valid": metrics["n_valid"], "n_test": metrics["n_test"],
        "steps": metrics["steps"], "best_step": metrics["best_step"], "stop_reason": metrics["stop_reason"],
        "batch_size": config["batch_size"], "model_overrides": json.dumps(config["model"], sort_keys=True),
        "num_parameters": provenance.get("num_parameters"),
        "train_wall_time_s": provenance.get("train_wall_time_s"),
        "git_commit": git.get("commit"), "git_dirty": git.get("dirty"),
        "hardware": _hardware_text(provenance.get("hardware", {})),
        "md17_source": config.get("md17_source") if config["dataset"] == "md17" else None,
        "data_dir": config.get("data_dir"),
    }  # fmt: skip


def collect_runs(profile: str, dataset: Optional[str] = None, results_dir=None) -> pd.DataFrame:
    """Every finished run (a metrics.json) of a profile under <results_dir>/runs, one row per run
    (RUN_COLUMNS); run_dir is relative to the results directory. Sorted in the tables' order."""
    root = results_path(results_dir, "runs", profile)
    datasets = [dataset] if dataset is not None else ["qm9", "md17"]
    rows = [_run_row(path.parent, results_dir)
            for name in datasets for path in sorted(root.glob(f"{name}/*/*_seed*/metrics.json"))]
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    if runs.empty:
        return runs
    order = {name: i for i, name in enumerate(dc.QM9_TARGETS + dc.MD17_MOLECULES)}
    runs = runs.assign(_order=runs["target"].map(order).fillna(len(order)))
    return runs.sort_values(["dataset", "_order", "model", "seed"]).drop(columns="_order").reset_index(drop=True)


def checkpoint_path(runs: pd.DataFrame, target: str, model: str, seed: Optional[int] = None,
                    results_dir=None) -> Path:
    """checkpoint_best.pt of one run in a `collect_runs` table (seed None: the lowest seed)."""
    rows = runs[(runs["target"] == target) & (runs["model"] == model)]
    if seed is not None:
        rows = rows[rows["seed"] == seed]
    if rows.empty:
        raise ValueError(f"no finished {model} run for {target!r}"
                         f"{'' if seed is None else f' with seed {seed}'} in these runs; train it first "
                         "(run_models)")
    run_dir = rows.sort_values("seed")["run_dir"].iloc[0]
    path = results_path(results_dir, run_dir, "checkpoint_best.pt")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run has a metrics.json but no best checkpoint")
    return path


# =============================================================================================
# --- Reporting: Tables 1 and 2 (quoted columns beside this run's) ---
# =============================================================================================

CHANGE_METHOD = ("relative change = 100 (DimezblNet - DimeNet) / DimeNet of the test MAE per seed "
                 "(same seed, data, split and budget), negative = DimezblNet better; the mean over "
                 "seeds, with a 95% paired Student-t interval (n - 1 degrees of freedom) where there "
                 "are at least 2 seeds")


def _quoted_column(name: str) -> str:
    return f"{name} (paper)"


def _this_run_column(model: str) -> str:
    return f"{MODEL_LABELS[model]} (this run)"


def relative_change(dimenet: Sequence[float], dimezblnet: Sequence[float]) -> tuple:
    """(mean, low, high) of 100 (b - a) / a over paired seeds (percent); low/high: the 95%
    Student-t interval of the mean, NaN with fewer than 2 pairs; all NaN with none."""
    a, b = np.asarray(dimenet, dtype=np.float64), np.asarray(dimezblnet, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values needed: {a.size} DimeNet and {b.size} DimezblNet seeds")
    if a.size == 0:
        return math.nan, math.nan, math.nan
    change = 100.0 * (b - a) / a
    mean = float(change.mean())
    if change.size < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = float(t.ppf(0.975, change.size - 1) * change.std(ddof=1) / math.sqrt(change.size))
    return mean, mean - half, mean + half


def _this_run_cells(runs: pd.DataFrame, dataset: str, target: str, quantity: str, models) -> dict:
    """Mean, sample std, seeds and run directories of each model, and the paired change."""
    metric = f"test_{quantity}_mae"
    cells, by_seed = {}, {}
    for model in models:
        rows = runs[(runs["dataset"] == dataset) & (runs["target"] == target) & (runs["model"] == model)]
        rows = rows.sort_values("seed")
        values = rows[metric].to_numpy(dtype=np.float64)
        column = _this_run_column(model)
        cells[column] = float(values.mean()) if values.size else math.nan
        cells[f"{column} std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        cells[f"{column} seeds"] = " ".join(str(s) for s in rows["seed"])
        cells[f"{column} runs"] = "; ".join(rows["run_dir"])
        by_seed[model] = dict(zip(rows["seed"], values))
        if model == "dimenet":
            cells["Mean predictor (this run)"] = (float(rows[f"mean_predictor_{quantity}_mae"].iloc[0])
                                                  if values.size else math.nan)
    if set(models) >= {"dimenet", "dimezblnet"}:
        seeds = sorted(set(by_seed["dimenet"]) & set(by_seed["dimezblnet"]))
        change = relative_change([by_seed["dimenet"][s] for s in seeds],
                                 [by_seed["dimezblnet"][s] for s in seeds])
        cells.update({"Change (this run, %)": change[0], "Change 95% low (this run, %)": change[1],
                      "Change 95% high (this run, %)": change[2]})
    return cells


def _paper_change(cells: Sequence[Optional[str]], columns: Sequence[str]) -> float:
    """100 (DimezblNet - DimeNet) / DimeNet from the paper's quoted cells (NaN where missing)."""
    values = dict(zip(columns, cells))
    try:
        dimenet, dimezblnet = float(values["DimeNet"]), float(values["DimezblNet"])
    except (TypeError, ValueError):
        return math.nan
    return 100.0 * (dimezblnet - dimenet) / dimenet


def build_table1(runs: pd.DataFrame, profile: Optional[str] = None,
                 models: Sequence[str] = ("dimenet", "dimezblnet")) -> pd.DataFrame:
    """Table 1 (QM9 test MAE) in the paper's layout: one row per target in the paper's order,
    Target, Unit (Table 1's units), the paper's six columns quoted ("<name> (paper)", strings as
    printed, None = "-"), the paper's own relative change, then for each model we train
    "<Model> (this run)" = mean test MAE over seeds (with std, seeds and run directories) and the
    paired relative change (CHANGE_METHOD). Targets without runs get NaN ("not run")."""
    runs = _select_runs(runs, "qm9", profile)
    rows = []
    for target, (label, _, cells) in PAPER_TABLE1.items():
        row = {"Target": label, "Unit": dc.QM9_REPORTING_UNITS[target]}
        row.update({_quoted_column(c): cell for c, cell in zip(PAPER_TABLE1_COLUMNS, cells)})
        row["Change (paper, %)"] = _paper_change(cells, PAPER_TABLE1_COLUMNS)
        row.update(_this_run_cells(runs, "qm9", target, "energy", models))
        rows.append(row)
    return pd.DataFrame(rows)


def build_table2(runs: pd.DataFrame, profile: Optional[str] = None,
                 models: Sequence[str] = ("dimenet", "dimezblnet")) -> pd.DataFrame:
    """Table 2 (MD17 test MAE of energies and forces) in the paper's layout: two rows (Energy,
    Forces) per molecule in the paper's order, the paper's four columns quoted (uracil's forces:
    NOT_REPORTED), then the "this run" columns as in `build_table1`."""
    runs = _select_runs(runs, "md17", profile)
    rows = []
    for (molecule, quantity), cells in PAPER_TABLE2.items():
        row = {"Molecule": MD17_LABELS[molecule], "Quantity": quantity.capitalize(),
               "Unit": MD17_UNITS[quantity]}
        row.update({_quoted_column(c): cell for c, cell in zip(PAPER_TABLE2_COLUMNS, cells)})
        row["Change (paper, %)"] = _paper_change(cells, PAPER_TABLE2_COLUMNS)
        row.update(_this_run_cells(runs, "md17", molecule, quantity, models))
        rows.append(row)
    return pd.DataFrame(rows)


def _select_runs(runs: pd.DataFrame, dataset: str, profile: Optional[str]) -> pd.DataFrame:
    missing = set(RUN_COLUMNS) - set(runs.columns)
    if missing:
        raise ValueError(f"runs table lacks columns {sorted(missing)}: build it with collect_runs or run_models")
    selected = runs[runs["dataset"] == dataset]
    if profile is not None:
        selected = selected[selected["profile"] == profile]
    profiles = sorted(set(selected["profile"]))
    if len(profiles) > 1:
        raise ValueError(f"runs of several profiles {profiles}: pass profile= to build one table per profile")
    return selected


# --- display (Markdown, LaTeX) and files ---

def _format_mae(mean: float, std: float) -> str:
    if not np.isfinite(mean):
        return "not run"
    return f"{mean:.4g}" if not np.isfinite(std) else f"{mean:.4g} ± {std:.2g}"


def _format_change(mean: float, low: float = math.nan, high: float = math.nan) -> str:
    if not np.isfinite(mean):
        return "–"
    text = f"{mean:+.1f}%"
    return text + (f" [{low:+.1f}, {high:+.1f}]" if np.isfinite(low) else "")


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The human-readable table (strings): quoted cells as printed ("–" where the paper has none),
    "this run" cells as mean ± std, changes in percent with their 95% interval. The machine
    columns (std, seeds, run directories, interval bounds) stay in the CSV only."""
    shown = {}
    for column in table.columns:
        if column.startswith("Change 95%") or column.endswith((" std", " seeds", " runs")) \
                or column.startswith("Mean predictor"):
            continue
        if column == "Change (this run, %)":
            shown["Change, this run"] = [
                _format_change(m, lo, hi) for m, lo, hi in zip(
                    table[column], table["Change 95% low (this run, %)"], table["Change 95% high (this run, %)"])]
        elif column == "Change (paper, %)":
            shown["Change, paper"] = [_format_change(v) for v in table[column]]
        elif column.endswith("(this run)"):
            shown[column] = [_format_mae(m, s) for m, s in zip(table[column], table[f"{column} std"])]
        elif column.endswith("(paper)"):
            shown[column] = ["–" if cell is None or (isinstance(cell, float) and math.isnan(cell)) else str(cell)
                             for cell in table[column]]
        elif column == "Molecule":  # the paper names each molecule once, on its energy row
            shown[column] = [name if k == 0 or name != table[column].iloc[k - 1] else ""
                             for k, name in enumerate(table[column])]
        else:
            shown[column] = [str(v) for v in table[column]]
    order = [c for c in shown if c != "Change, paper"] + ["Change, paper"]
    return pd.DataFrame(shown)[order]


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `display_table(table)`."""
    shown = display_table(table)
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
    lines = [line(shown.columns), line(["---"] * len(shown.columns))]
    lines += [line(row) for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                  "±": r"$\pm$", "–": "--"}


def _latex_escape(text) -> str:
    return "".join(_LATEX_ESCAPES.get(char, char) for char in str(text))


def latex_table(table: pd.DataFrame) -> str:
    """A booktabs tabular of `display_table(table)` (needs \\usepackage{booktabs})."""
    shown = display_table(table)
    spec = "l" * 3 + "r" * (len(shown.columns) - 3)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_latex_escape(c) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _range_text(values) -> str:
    values = sorted({v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})
    if not values:
        return "?"
    if len(values) == 1:
        return f"{values[0]:,}" if isinstance(values[0], (int, np.integer)) else str(values[0])
    return f"{values[0]:,}-{values[-1]:,}" if all(isinstance(v, (int, np.integer)) for v in values) \
        else ", ".join(map(str, values))


def _md17_data_text(runs: pd.DataFrame) -> str:
    """Where the MD17 data of these runs came from, in words."""
    sources = sorted(set(runs["md17_source"].dropna()))
    if sources != ["generated"]:
        return (f"MD17 from {', '.join(sources) or '?'} (sGDML/rMD17 npz files; DFT, PBE+vdW-TS, the "
                "data of the paper)")
    details = []
    for molecule, data_dir in sorted(set(zip(runs["target"], runs["data_dir"].fillna("")))):
        sidecar = dc.md17_default_path(molecule, "generated", data_dir or None).with_suffix(".json")
        if sidecar.exists():
            info = json.loads(sidecar.read_text())
            details.append(f"{molecule} {info.get('n_configs', '?')}")
    counts = f" ({', '.join(details)} configurations)" if details else ""
    return ("MD17-style data generated here with GFN2-xTB (semi-empirical tight binding, tblite), "
            f"Langevin MD at {dc.MD17_TEMPERATURE_K:g} K, one configuration every "
            f"{dc.MD17_SAMPLE_EVERY * dc.MD17_TIMESTEP_FS:g} fs{counts}. This is NOT the DFT "
            "(PBE+vdW-TS) data of MD17 that the paper used: only the two 'this run' columns are "
            "comparable with each other, not with the paper's columns")


def table_header(runs: pd.DataFrame, table: int, profile: str) -> list:
    """The provenance block of a table: profile, budget (sizes, steps), data source and level of
    theory, seeds, git commits, hardware and how the change is computed."""
    dataset = {1: "qm9", 2: "md17"}[table]
    runs = _select_runs(runs, dataset, profile)
    if table == 1:
        lines = ["Table 1: MAE of the QM9 targets on the test set (Tao & Wan), regenerated",
                 f"Data: QM9 from qm9pack (B3LYP/6-31G(2df,p)), DimeNet's split (RandomState(42)), "
                 f"{PAPER_TABLE1_UNIT_NOTE}"]
    else:
        lines = ["Table 2: MAE of MD17 energies (kcal/mol) and forces (kcal/mol/A) on the test set "
                 "(Tao & Wan), regenerated",
                 f"Data: {_md17_data_text(runs) if not runs.empty else 'no MD17 runs'}"]
    paper_columns = PAPER_TABLE1_COLUMNS if table == 1 else PAPER_TABLE2_COLUMNS
    lines.append(f"Columns '(paper)': {', '.join(paper_columns)} quoted verbatim from the paper's Table "
                 f"{table} (not re-run here); 'Change, paper' is computed from those quoted numbers")
    lines.append("Columns '(this run)': test MAE of the models trained here, mean ± sample std over seeds; "
                 + CHANGE_METHOD)
    lines.append(f"Profile: {profile}")
    if runs.empty:
        lines.append("No runs of this profile were found: the 'this run' columns are empty")
    else:
        wall = runs["train_wall_time_s"].dropna()
        lines += [
            f"Budget: train {_range_text(runs['n_train'])}, validation {_range_text(runs['n_valid'])}, "
            f"test {_range_text(runs['n_test'])} molecules/configurations; {_range_text(runs['steps'])} "
            f"steps of batch {_range_text(runs['batch_size'])} (stopped by {_range_text(runs['stop_reason'])}); "
            f"model overrides {_range_text(runs['model_overrides'])} ({{}} = DimeNet's architecture); "
            f"parameters {_range_text(runs['num_parameters'].dropna().astype(int))}",
            f"Seeds: {' '.join(str(s) for s in sorted(set(runs['seed'])))}; {len(runs)} runs "
            f"({runs['target'].nunique()} {'targets' if table == 1 else 'molecules'} with runs)",
            f"Git commit of the runs: {_range_text(runs['git_commit'])}"
            f"{' (uncommitted changes)' if runs['git_dirty'].fillna(False).any() else ''}; "
            f"tables written at {dc.git_state().get('commit')}",
            f"Hardware: {_range_text(runs['hardware'])}; training wall time per model "
            f"{wall.min():.0f}-{wall.max():.0f} s" if len(wall) else f"Hardware: {_range_text(runs['hardware'])}",
        ]
    lines.append(f"Written: {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {platform.node() or '?'}")
    return lines


def write_table(table: pd.DataFrame, header_lines: Sequence[str], basename: str,
                results_dir=None) -> dict:
    """Write <results_dir>/tables/<basename>.{csv,md,tex}, each opening with the header block
    (CSV: '# ' lines, read back with pandas.read_csv(path, comment='#'); Markdown: a list; LaTeX:
    '% ' comments). The CSV holds every column (machine-readable: means, std, seeds, run
    directories); Markdown and LaTeX hold `display_table`. All three are written to temporary
    names first and renamed only when all are complete, so a failure leaves the old tables."""
    folder = results_path(results_dir, "tables")
    folder.mkdir(parents=True, exist_ok=True)
    header = [str(line).replace("\n", " ") for line in header_lines]
    contents = {
        "csv": "".join(f"# {line}\n" for line in header) + table.to_csv(index=False),
        "md": "".join(f"- {line}\n" for line in header) + "\n" + markdown_table(table),
        "tex": "".join(f"% {line}\n" for line in header) + latex_table(table),
    }
    paths, temporary = {}, []
    try:
        for suffix, text in contents.items():
            path = folder / f"{basename}.{suffix}"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            temporary.append(tmp)
            paths[suffix] = path
        for tmp, path in zip(temporary, paths.values()):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
    return paths


def read_table(path) -> pd.DataFrame:
    """A table CSV written by `write_table` (header lines skipped; "–" cells stay strings)."""
    return pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)


def make_tables(profile: str, results_dir=None) -> dict:
    """Build Tables 1 and 2 from the runs of `profile` on disk and write them
    (results/tables/table1_qm9.* and table2_md17.*). Returns {"table1": df, "table2": df}."""
    runs = collect_runs(profile, results_dir=results_dir)
    table1, table2 = build_table1(runs, profile), build_table2(runs, profile)
    write_table(table1, table_header(runs, 1, profile), "table1_qm9", results_dir)
    write_table(table2, table_header(runs, 2, profile), "table2_md17", results_dir)
    return {"table1": table1, "table2": table2}


# =============================================================================================
# --- Reporting: predictions and the compression (dimer) curve ---
# =============================================================================================

def load_trained_model(path, device: str = "cpu", data_dir=None):
    """(model in eval mode with the best checkpoint's EMA weights, its TrainConfig)."""
    checkpoint = dc.load_checkpoint(path)
    config = dc.TrainConfig.from_dict(checkpoint["config"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=str(data_dir))
    model = dc.build_model(config).to(device=dc.select_device(device), dtype=getattr(torch, config.dtype))
    model.load_state_dict(checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"])
    return model.eval(), config


def predict(checkpoint, subset: str = "test", device: str = "auto", data_dir=None) -> dict:
    """Targets and predictions of a trained model on the train, valid or test set of its own
    config (same split, offsets and units as its metrics.json).

    Returns numpy float64 arrays: energy_true, energy_pred [molecules] (QM9: Table 1's units;
    MD17: absolute energies, kcal/mol), forces_true, forces_pred [atoms, 3] (MD17, kcal/mol/A;
    None for QM9), and energy_unit, forces_unit, target, model, seed, subset.
    """
    if subset not in ("train", "valid", "test"):
        raise ValueError(f"unknown subset {subset!r}: use 'train', 'valid' or 'test'")
    model, config = load_trained_model(checkpoint, device, data_dir)
    device = next(model.parameters()).device
    data = dc.RunData(config, model.zbl)
    parts = {"energy_true": [], "energy_pred": [], "forces_true": [], "forces_pred": []}
    for batch in data.batches(getattr(data, subset)):
        batch = batch.to(device)
        need_forces = batch.forces is not None
        with torch.set_grad_enabled(need_forces):
            energy, forces = dc._energy_and_forces(model, batch, need_forces, create_graph=False)
        offset = data.offset[0] + data.offset[1] * batch.num_atoms.double()  # float64, training units
        parts["energy_true"].append(batch.target.double().cpu() + offset.cpu())
        parts["energy_pred"].append(energy.detach().double().cpu() + offset.cpu())
        if need_forces:
            parts["forces_true"].append(batch.forces.detach().double().cpu())
            parts["forces_pred"].append(forces.detach().double().cpu())
    result = {key: (torch.cat(values).numpy() if values else None) for key, values in parts.items()}
    if config.dataset == "qm9":
        for key in ("energy_true", "energy_pred"):
            result[key] = dc.qm9_to_reporting_units(result[key], config.target)
    units = dc.reporting_unit(config)
    result.update(energy_unit=units["energy"], forces_unit=units.get("forces"), target=config.target,
                  dataset=config.dataset, model=config.model_name, seed=config.seed, subset=subset)
    return result


def predict_runs(runs: pd.DataFrame, subset: str = "test", device: str = "auto", seed: Optional[int] = None,
                 results_dir=None, data_dir=None) -> dict:
    """`predict` for every (target, model) of a runs table (seed None: each run's lowest seed):
    {(target, model): prediction}."""
    pairs = runs[["target", "model"]].drop_duplicates().itertuples(index=False)
    return {(target, model): predict(checkpoint_path(runs, target, model, seed, results_dir), subset,
                                     device, data_dir)
            for target, model in pairs}


COMPRESSION_DISTANCES_A = np.round(np.arange(0.30, 3.0001, 0.025), 3)  # Angstrom


def _bond_atoms(atoms, bond) -> tuple:
    """(i, j) atom indices of a bond given as indices or as two element symbols (the closest
    such pair); atom j is the one that moves."""
    if all(isinstance(b, (int, np.integer)) for b in bond):
        i, j = int(bond[0]), int(bond[1])
        if not (0 <= i < len(atoms) and 0 <= j < len(atoms) and i != j):
            raise ValueError(f"bond {bond} must name two different atoms of 0..{len(atoms) - 1}")
        return i, j
    symbols = np.asarray(atoms.get_chemical_symbols())
    first, second = (np.nonzero(symbols == s)[0] for s in bond)
    if not first.size or not second.size:
        raise ValueError(f"bond {bond}: {atoms.get_chemical_formula()} has no {bond[0]}-{bond[1]} pair")
    distance = np.linalg.norm(atoms.positions[first][:, None] - atoms.positions[second][None], axis=-1)
    distance[first[:, None] == second[None]] = np.inf
    a, b = np.unravel_index(np.argmin(distance), distance.shape)
    return int(first[a]), int(second[b])


def _energy_model(config: dc.TrainConfig) -> None:
    if not (config.dataset == "md17" or config.target in dc.QM9_ENERGY_TARGETS):
        raise ValueError(f"a compression curve needs an energy model (MD17, or QM9 "
                         f"{', '.join(dc.QM9_ENERGY_TARGETS)}); this checkpoint predicts {config.target!r}")


def compression_curve(checkpoint, bond=("C", "H"), atoms=None, distances_a=None, dimenet_checkpoint=None,
                      device: str = "cpu") -> pd.DataFrame:
    """E(r) of a bond of a real molecule compressed and stretched: atom j moves along the bond
    i -> j so that d_ij = r (distances_a, Angstrom; default 0.3 to 3 A), all other atoms fixed.

    Columns (energy unit of the model, relative to the molecule as built, r = r0): distance_a,
    "DimezblNet" (the trained model with its ZBL), "learned part" (the same network, ZBL removed:
    model.zbl = None), "ZBL" (the ZBL term alone, Eq. 8-10, as the model switches it) and, with
    dimenet_checkpoint, "DimeNet". DimezblNet = learned part + ZBL. atoms: an ase.Atoms
    (default: MD17's starting geometry for MD17 models, ase's ethanol for QM9 models).
    `attrs` hold unit, bond, r0_a, molecule and checkpoints.
    """
    from ase.build import molecule as ase_molecule
    from torch_geometric.data import Data

    model, config = load_trained_model(checkpoint, device)
    _energy_model(config)
    if model.zbl is None:
        raise ValueError(f"{checkpoint} is a DimeNet checkpoint (no ZBL): give a DimezblNet one, and the "
                         "DimeNet one as dimenet_checkpoint")
    if atoms is None:
        atoms = (dc.md17_start_geometry(config.target)[0] if config.dataset == "md17"
                 else ase_molecule("CH3CH2OH"))
    i, j = _bond_atoms(atoms, bond)
    base = torch.tensor(atoms.positions, dtype=torch.float64)
    r0 = float((base[j] - base[i]).norm())
    distances = np.asarray(COMPRESSION_DISTANCES_A if distances_a is None else distances_a, dtype=np.float64)
    radii = torch.tensor(np.append(distances, r0))  # the last geometry is the reference, r = r0
    unit_vector = (base[j] - base[i]) / r0
    positions = base.expand(len(radii), -1, -1).clone()  # [R, N, 3]
    positions[:, j] = base[i] + radii[:, None] * unit_vector
    n_atoms = len(atoms)
    z = torch.tensor(atoms.numbers, dtype=torch.long).repeat(len(radii))
    batch = torch.arange(len(radii)).repeat_interleave(n_atoms)
    device_ = next(model.parameters()).device
    flat = positions.reshape(-1, 3).to(device_, next(model.parameters()).dtype)

    learned = copy.deepcopy(model)
    learned.zbl = None
    curves = {}
    with torch.no_grad():
        curves["DimezblNet"] = model(z.to(device_), flat, batch.to(device_)).double().cpu()
        curves["learned part"] = learned(z.to(device_), flat, batch.to(device_)).double().cpu()
        samples = [Data(z=torch.tensor(atoms.numbers), pos=p) for p in positions]
        curves["ZBL"] = dc.molecule_zbl_energies(samples, model.zbl)  # includes the ZBL weight
        if dimenet_checkpoint is not None:
            dimenet, dimenet_config = load_trained_model(dimenet_checkpoint, device)
            if (dimenet_config.dataset, dimenet_config.target) != (config.dataset, config.target):
                raise ValueError(f"the DimeNet checkpoint is for {dimenet_config.dataset}/{dimenet_config.target}, "
                                 f"the DimezblNet one for {config.dataset}/{config.target}: use the same target")
            curves["DimeNet"] = dimenet(z.to(device_), flat, batch.to(device_)).double().cpu()
    frame = pd.DataFrame({"distance_a": distances,
                          **{name: (values[:-1] - values[-1]).numpy() for name, values in curves.items()}})
    symbols = atoms.get_chemical_symbols()
    frame.attrs.update(unit=dc.reporting_unit(config)["energy"] if config.dataset == "md17" else "eV",
                       bond=f"{symbols[i]}-{symbols[j]} (atoms {i}-{j}, atom {j} moves)", r0_a=r0,
                       molecule=atoms.get_chemical_formula(), target=f"{config.dataset}/{config.target}",
                       checkpoint=str(checkpoint), dimenet_checkpoint=str(dimenet_checkpoint))
    return frame


def compression_curves(runs: pd.DataFrame, target: str, bonds, seed: Optional[int] = None,
                       results_dir=None, device: str = "cpu") -> list:
    """`compression_curve` of each bond for the DimezblNet run of `target` in a runs table, with
    the DimeNet run of the same seed beside it (seed None: the lowest)."""
    of_target = runs[runs["target"] == target]
    if seed is None and (of_target["model"] == "dimezblnet").any():
        seed = int(of_target.loc[of_target["model"] == "dimezblnet", "seed"].min())
    dimezblnet = checkpoint_path(runs, target, "dimezblnet", seed, results_dir)
    has_dimenet = ((of_target["model"] == "dimenet") & (of_target["seed"] == seed)).any()
    dimenet = checkpoint_path(runs, target, "dimenet", seed, results_dir) if has_dimenet else None
    return [compression_curve(dimezblnet, tuple(bond), dimenet_checkpoint=dimenet, device=device)
            for bond in bonds]


# =============================================================================================
# --- Reporting: figures (PNG in results/figures/, returned for inline display) ---
# =============================================================================================
# Figures are matplotlib.figure.Figure objects, not pyplot state: a notebook shows the returned
# figure once (with %matplotlib inline), and nothing accumulates between calls.

MODEL_COLORS = {"dimenet": "tab:blue", "dimezblnet": "tab:red"}
ELEMENT_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}  # the elements of QM9 and MD17


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8, **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save_figure(fig, name: str, results_dir=None):
    """Write <results_dir>/figures/<name>.png (150 dpi, temporary name then rename); returns fig."""
    path = results_path(results_dir, "figures", f"{name}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=150, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return fig


def plot_radial_basis(num_radial: int = 6, cutoff_a: float = 5.0, envelope_exponent: int = 5,
                      results_dir=None):
    """Left: the radial basis of Eq. 4 times the envelope, as DimeNet computes it
    (dc.BesselBasisLayer, with Eq. 4's sqrt(2/c) restored: sqrt(2/c) sin(n pi d/c)/d * u(d/c),
    in A^-3/2). Right: the envelope u(d/c) of Eq. 6 (p = envelope_exponent + 1) and u/x."""
    d = torch.linspace(0.05, cutoff_a * 1.04, 500, dtype=torch.float64)
    layer = dc.BesselBasisLayer(num_radial, cutoff_a, envelope_exponent).double()
    with torch.no_grad():
        rbf = layer(d) * math.sqrt(2.0 / cutoff_a) / cutoff_a  # u(x)/x sin(n pi x) -> Eq. 4 * u
    p = envelope_exponent + 1
    u = dc.envelope_polynomial(d / cutoff_a, p)
    fig, axes = _figure(2)
    for n in range(num_radial):
        axes[0, 0].plot(d, rbf[:, n], label=f"n = {n + 1}")
    axes[0, 0].set(xlabel="distance d (Å)", ylabel=r"$e_{\mathrm{RBF},n}(d)\;u(d/c)$  (Å$^{-3/2}$)",
                   title=f"Radial Bessel basis (Eq. 4), c = {cutoff_a:g} Å")
    axes[0, 1].plot(d, u, color="k", label=f"u(d/c), p = {p} (Eq. 6)")
    axes[0, 1].plot(d, dc.Envelope(envelope_exponent)(d / cutoff_a).clamp(max=5.0), color="tab:gray",
                    linestyle="--", label="u(d/c)/(d/c) (DimeNet's code, clipped at 5)")
    axes[0, 1].set(xlabel="distance d (Å)", ylabel="envelope (dimensionless)",
                   title="Polynomial envelope (Eq. 6)")
    for ax in axes[0]:
        ax.axvline(cutoff_a, color="k", linewidth=0.8, linestyle=":")
        ax.axhline(0.0, color="k", linewidth=0.5)
        ax.legend(fontsize=8)
    return save_figure(fig, "basis_radial_envelope", results_dir)


def plot_spherical_basis(num_spherical: int = 7, num_radial: int = 6, cutoff_a: float = 5.0,
                         envelope_exponent: int = 5, radial_index: int = 0, results_dir=None):
    """Eq. 5 in its two factors, from dc.SphericalBasisLayer. Left: the normalised radial part
    j_l(z_ln d/c) times the envelope u(d/c), for n = radial_index + 1 and every l, vs distance
    (the layer's u(x)/x times x: Eq. 5 has no 1/d; DimeNet's normaliser, c^(3/2) absorbed).
    Right: the angular part Y_l^0(alpha) vs the angle alpha (degrees)."""
    layer = dc.SphericalBasisLayer(num_spherical, num_radial, cutoff_a, envelope_exponent).double()
    d = torch.linspace(0.05, cutoff_a, 400, dtype=torch.float64)
    alpha = torch.linspace(0.0, math.pi, 361, dtype=torch.float64)
    with torch.no_grad():
        radial = layer.radial(d)[:, :, radial_index] * (d / cutoff_a)[:, None]  # [D, L], u/x -> u
        angular = layer.angular(torch.cos(alpha))  # [A, L]
    fig, axes = _figure(2)
    for l in range(num_spherical):
        axes[0, 0].plot(d, radial[:, l], label=f"l = {l}")
        axes[0, 1].plot(torch.rad2deg(alpha), angular[:, l], label=f"l = {l}")
    axes[0, 0].set(xlabel=r"distance $d_{kj}$ (Å)", ylabel="radial factor (dimensionless)",
                   title=rf"Eq. 5 radial factor $j_l(z_{{ln}} d/c)\,u(d/c)$, n = {radial_index + 1}")
    axes[0, 1].set(xlabel="angle α (degrees)", ylabel=r"$Y_l^0(\alpha)$ (dimensionless)",
                   title=r"Eq. 5 angular factor $Y_l^0(\alpha)$", xticks=range(0, 181, 30))
    for ax in axes[0]:
        ax.axhline(0.0, color="k", linewidth=0.5)
        ax.legend(fontsize=8, ncols=2)
    return save_figure(fig, "basis_spherical", results_dir)


def plot_sbf_heatmap(l: int = 2, n: int = 1, num_spherical: int = 7, num_radial: int = 6,
                     cutoff_a: float = 5.0, envelope_exponent: int = 5, results_dir=None):
    """a_SBF,ln(d, alpha) of Eq. 5 (with the envelope, DimeNet's normalisation) over distance
    and angle for one (l, n), n counted from 1, from dc.SphericalBasisLayer.combine."""
    if not (0 <= l < num_spherical and 1 <= n <= num_radial):
        raise ValueError(f"need 0 <= l < {num_spherical} and 1 <= n <= {num_radial}, got l={l}, n={n}")
    layer = dc.SphericalBasisLayer(num_spherical, num_radial, cutoff_a, envelope_exponent).double()
    d = torch.linspace(0.3, cutoff_a, 240, dtype=torch.float64)
    alpha = torch.linspace(0.0, math.pi, 181, dtype=torch.float64)
    with torch.no_grad():
        idx_kj = torch.arange(d.numel()).repeat_interleave(alpha.numel())  # one triplet per (d, alpha)
        sbf = layer.combine(layer.radial(d), layer.angular(torch.cos(alpha)).repeat(d.numel(), 1), idx_kj)
    values = sbf[:, l * num_radial + (n - 1)].reshape(d.numel(), alpha.numel())
    limit = float(values.abs().max())
    fig, axes = _figure(1, width=6.0, height=4.5)
    image = axes[0, 0].pcolormesh(torch.rad2deg(alpha), d, values, cmap="RdBu_r", vmin=-limit, vmax=limit,
                                  shading="auto")
    fig.colorbar(image, ax=axes[0, 0], label=rf"$a_{{\mathrm{{SBF}},ln}}$ with envelope u(x)/x (dimensionless)")
    axes[0, 0].set(xlabel="angle α (degrees)", ylabel="distance d (Å)", xticks=range(0, 181, 30),
                   title=f"2D spherical Fourier-Bessel basis (Eq. 5), l = {l}, n = {n}")
    return save_figure(fig, f"basis_sbf_heatmap_l{l}_n{n}", results_dir)


def zbl_screening_function(x) -> np.ndarray:
    """phi(x) of Eq. 9 read back from dc.zbl_pair_energy (an H-H pair at r = x a): the figure
    shows the module's own implementation, not a second copy of the formula."""
    x = torch.as_tensor(x, dtype=torch.float64)
    a = dc.ZBL_SCREENING_LENGTH_A / 2.0  # Z_i^0.23 + Z_j^0.23 = 2 for H-H (Eq. 10)
    r = x * a
    return (dc.zbl_pair_energy(1, 1, r, "eV") * r / dc.COULOMB_CONSTANT_EV_A).numpy()


def plot_zbl_screening(results_dir=None):
    """phi(x) of Eq. 9 (log scale) against the reduced distance x of Eq. 10, and the screening
    length a (Eq. 10) of the H, C, N, O, F pairs for orientation."""
    x = np.linspace(0.05, 25.0, 600)
    fig, axes = _figure(1, width=6.0)
    ax = axes[0, 0]
    ax.plot(x, zbl_screening_function(x), color="k", label="φ(x), ZBL universal (Eq. 9)")
    ax.axhline(1.0, color="tab:gray", linestyle="--", label="unscreened Coulomb, φ = 1")
    for pair, color in (("H-H", "tab:blue"), ("C-H", "tab:orange"), ("C-C", "tab:green")):
        zi, zj = (ELEMENT_Z[s] for s in pair.split("-"))
        a = dc.ZBL_SCREENING_LENGTH_A / (zi**dc.ZBL_SCREENING_EXPONENT + zj**dc.ZBL_SCREENING_EXPONENT)
        bond = {"H-H": 0.74, "C-H": 1.09, "C-C": 1.54}[pair]
        ax.axvline(bond / a, color=color, linestyle=":", label=f"{pair} bond {bond} Å: x = {bond / a:.1f}")
    ax.set(yscale="log", xlabel="reduced distance x = r / a  (dimensionless, Eq. 10)",
           ylabel="screening function φ(x) (dimensionless)", title="ZBL screening function (Eq. 9)")
    ax.legend(fontsize=8)
    return save_figure(fig, "zbl_screening_function", results_dir)


def plot_zbl_pair_energies(elements: Sequence[str] = ("H", "C", "N", "O", "F"), unit: str = "eV",
                           cutoff_a: float = 5.0, results_dir=None):
    """Pair energies of every unordered pair of `elements` (log scale) for the three reaches of
    dc.ZBL side by side: "cutoff" (the literal term, enveloped at the model cutoff), "covalent"
    (switched off at the sum of covalent radii) and "lammps" (LAMMPS inner/outer switch)."""
    unknown = [e for e in elements if e not in ELEMENT_Z]
    if unknown:
        raise ValueError(f"elements {unknown} are not in {tuple(ELEMENT_Z)} (QM9/MD17)")
    pairs = [(a, b) for k, a in enumerate(elements) for b in elements[k:]]
    z_i = torch.tensor([ELEMENT_Z[a] for a, _ in pairs])[:, None]
    z_j = torch.tensor([ELEMENT_Z[b] for _, b in pairs])[:, None]
    r = torch.linspace(0.05, cutoff_a, 500, dtype=torch.float64)[None, :].expand(len(pairs), -1)
    fig, axes = _figure(len(dc.ZBL_REACHES), width=4.6, height=4.4, sharey=True)
    colors = [f"C{k % 10}" for k in range(len(pairs))]
    styles = ["-", "--"]
    for ax, reach in zip(axes[0], dc.ZBL_REACHES):
        zbl = dc.ZBL(unit, reach, cutoff_a).double()
        with torch.no_grad():
            energy = zbl.pair_energy(z_i.expand_as(r), z_j.expand_as(r), r)  # [pairs, R]
        for k, (a, b) in enumerate(pairs):
            ax.plot(r[k], energy[k], color=colors[k], linestyle=styles[k // 10], label=f"{a}-{b}")
        title = {"cutoff": f"reach 'cutoff': enveloped at {cutoff_a:g} Å",
                 "covalent": "reach 'covalent': off at r_cov,i + r_cov,j",
                 "lammps": f"reach 'lammps': switch {zbl.inner_a:g}-{zbl.outer_a:g} Å"}[reach]
        ax.set(yscale="log", xlabel="distance r (Å)", title=title, ylim=(1e-4, 1e5))
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel(f"ZBL pair energy ({unit}, log scale)")
    axes[0, -1].legend(fontsize=7, ncols=2, title="pair", loc="upper right")
    return save_figure(fig, "zbl_pair_energies", results_dir)


def plot_learning_curves(runs: pd.DataFrame, quantity: str = "energy", results_dir=None, name=None):
    """Validation MAE (EMA weights) against the training step, one panel per target, one line per
    (model, seed), from each run's learning_curve.csv; units of the tables, log scale where the
    values span more than a decade."""
    if runs.empty:
        raise ValueError("no runs to plot: train them first (run_models)")
    column = f"valid_{quantity}_mae"
    targets = list(dict.fromkeys(runs["target"]))
    ncols = min(4, len(targets))
    nrows = math.ceil(len(targets) / ncols)
    fig, axes = _figure(ncols, nrows, width=3.6, height=2.9)
    for ax, target in zip(axes.flat, targets):
        rows = runs[runs["target"] == target]
        values = []
        for row in rows.itertuples(index=False):
            curve = pd.read_csv(results_path(results_dir, row.run_dir, "learning_curve.csv"))
            if column not in curve:
                raise ValueError(f"{row.run_dir}/learning_curve.csv has no {column}: {quantity!r} is not "
                                 f"a quantity of {row.dataset}")
            ax.plot(curve["step"], curve[column], color=MODEL_COLORS[row.model], marker=".",
                    linestyle=["-", "--", ":", "-."][row.seed % 4],
                    label=f"{MODEL_LABELS[row.model]} seed {row.seed}")
            values += curve[column].tolist()
        unit = rows[f"{quantity}_unit"].iloc[0]
        spans_a_decade = min(values) > 0 and max(values) / min(values) > 10
        ax.set(yscale="log" if spans_a_decade else "linear", xlabel="training step",
               ylabel=f"valid MAE ({unit})", title=str(target))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    dataset = runs["dataset"].iloc[0]
    return save_figure(fig, name or f"learning_curves_{dataset}_{quantity}", results_dir)


def plot_parity(predictions: Mapping, quantity: str = "energy", results_dir=None, name=None):
    """Predicted against reference values on the test set, one panel per target, both models
    overlaid (from `predict_runs`). Energies are shown relative to the mean reference energy of
    the set (MD17's absolute energies are ~1e5 kcal/mol); forces are all Cartesian components."""
    if quantity not in ("energy", "forces"):
        raise ValueError(f"unknown quantity {quantity!r}: use 'energy' or 'forces'")
    targets = list(dict.fromkeys(target for target, _ in predictions))
    ncols = min(4, len(targets))
    nrows = math.ceil(len(targets) / ncols)
    fig, axes = _figure(ncols, nrows, width=3.3, height=3.3)
    for ax, target in zip(axes.flat, targets):
        low, high = math.inf, -math.inf
        for (name_, model), result in predictions.items():
            if name_ != target:
                continue
            true, pred = result[f"{quantity}_true"], result[f"{quantity}_pred"]
            if true is None:
                raise ValueError(f"{target}: no {quantity} in these predictions (QM9 has no forces)")
            if quantity == "energy":
                reference = true.mean()
                true, pred = true - reference, pred - reference
            true, pred = true.ravel(), pred.ravel()
            mae = float(np.abs(pred - true).mean())
            ax.scatter(true, pred, s=4, alpha=0.5, color=MODEL_COLORS[model],
                       label=f"{MODEL_LABELS[model]}: MAE {mae:.3g}")
            low, high = min(low, true.min(), pred.min()), max(high, true.max(), pred.max())
            unit = result[f"{quantity}_unit"]
        ax.plot([low, high], [low, high], color="k", linewidth=0.8, label="y = x")
        what = "E − ⟨E⟩" if quantity == "energy" else "F component"
        ax.set(xlabel=f"reference {what} ({unit})", ylabel=f"predicted ({unit})", title=str(target))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    dataset = next(iter(predictions.values()))["dataset"]
    return save_figure(fig, name or f"parity_{dataset}_{quantity}", results_dir)


def plot_compression_curves(curves: Sequence[pd.DataFrame], results_dir=None, name=None):
    """E(r) - E(r0) of `compression_curve` results side by side (symmetric log scale):
    DimezblNet, its learned part, ZBL alone and DimeNet, the bond length r0 as built marked."""
    curves = [curves] if isinstance(curves, pd.DataFrame) else list(curves)
    if not curves:
        raise ValueError("no compression curves to plot")
    styles = {"DimezblNet": ("tab:red", "-", "DimezblNet"),
              "learned part": ("tab:purple", "--", "learned part (DimezblNet without ZBL)"),
              "ZBL": ("k", ":", "ZBL alone (Eq. 8-10)"), "DimeNet": ("tab:blue", "-.", "DimeNet")}
    fig, axes = _figure(len(curves), width=5.2, height=4.3)
    for ax, curve in zip(axes[0], curves):
        for column, (color, linestyle, label) in styles.items():
            if column in curve:
                ax.plot(curve["distance_a"], curve[column], color=color, linestyle=linestyle, label=label)
        ax.axvline(curve.attrs["r0_a"], color="tab:gray", linewidth=0.8,
                   label=f"r0 = {curve.attrs['r0_a']:.3f} Å (as built)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set(xlabel="bond length r (Å)", ylabel=f"E(r) − E(r0) ({curve.attrs['unit']}, symlog)",
               title=f"{curve.attrs['molecule']}: {curve.attrs['bond']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"Bond compression, models trained on {curves[0].attrs['target']}")
    target = curves[0].attrs["target"].replace("/", "_")
    return save_figure(fig, name or f"compression_curves_{target}", results_dir)


# =============================================================================================
# --- Reporting: notebooks 01-05 through papermill (make reproduce) ---
# =============================================================================================

NOTEBOOK_DIR = dc.REPOSITORY_ROOT / "notebooks"
NOTEBOOKS = ("01_basis_visualization.ipynb", "02_zbl_curves.ipynb", "03_qm9_training.ipynb",
             "04_md17_training.ipynb", "05_tables.ipynb")
KERNEL_NAME = "python3"  # jupyter_client runs the kernel "python3" with the interpreter running papermill


class NotebookFailed(RuntimeError):
    """A notebook of `reproduce` raised: names the notebook, the cell and the error."""

    def __init__(self, notebook: str, cell: Optional[int], message: str, executed: Path):
        self.notebook, self.cell, self.executed = notebook, cell, executed
        where = f"cell {cell}" if cell is not None else "before any cell ran (kernel start?)"
        super().__init__(f"{notebook} failed in {where}: {message}; executed copy with the "
                         f"traceback: {executed}")


def _failed_cell(executed: Path, cell_index: int) -> tuple:
    """(1-based number of the failing cell in the source notebook, its first line): the executed
    copy holds papermill's injected-parameters cell, which the source notebook does not."""
    import nbformat

    cells = nbformat.read(executed, as_version=4).cells
    injected = [k for k, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])]
    number = cell_index + 1 - sum(1 for k in injected if k < cell_index)
    first_line = cells[cell_index].source.strip().splitlines()[0] if cells[cell_index].source.strip() else ""
    return number, first_line


def reproduce(profile: str = "smoke", results_dir=None, data_dir=None, device: str = "auto",
              parameters: Optional[dict] = None, notebooks: Sequence[str] = NOTEBOOKS,
              kernel_name: str = KERNEL_NAME, progress: bool = True) -> list:
    """Run the notebooks in order with papermill, executed copies to <results_dir>/executed/.

    Every notebook gets profile, data_dir, device, results_dir and progress_bars=False, plus
    `parameters` (e.g. targets, molecules, seeds, train_overrides, md17_configs), each only where
    its parameters cell declares it; a parameter no notebook declares is an error. Notebooks run with cwd
    notebooks/ (as in JupyterLab). Raises NotebookFailed naming the notebook and cell.
    Returns the executed notebooks' paths.
    """
    import papermill

    if profile not in dc.PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(dc.PROFILES)}")
    values = {"profile": profile, "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
              "device": device, "results_dir": str(results_path(results_dir)),
              "progress_bars": False,  # nobody watches them here; they would fill the executed copies
              **(parameters or {})}
    declared = {name: set(papermill.inspect_notebook(str(NOTEBOOK_DIR / name))) for name in notebooks}
    unused = sorted(set(parameters or {}) - set().union(*declared.values()))
    if unused:
        raise ValueError(f"parameters {unused} are declared by none of the notebooks {list(notebooks)}")
    executed_dir = results_path(results_dir, "executed")
    executed_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name in notebooks:
        executed = executed_dir / name
        start = time.perf_counter()
        if progress:
            print(f"reproduce: {name} ...", flush=True)
        try:
            papermill.execute_notebook(
                str(NOTEBOOK_DIR / name), str(executed),
                parameters={k: v for k, v in values.items() if k in declared[name]},
                kernel_name=kernel_name, cwd=str(NOTEBOOK_DIR), progress_bar=False, log_output=False)
        except papermill.PapermillExecutionError as error:
            number, first_line = _failed_cell(executed, error.cell_index)
            raise NotebookFailed(name, number, f"{error.ename}: {error.evalue} (cell starts "
                                 f"{first_line[:80]!r})", executed) from None
        except Exception as error:  # kernel died or did not start, notebook unreadable, ...
            raise NotebookFailed(name, None, f"{type(error).__name__}: {error}", executed) from error
        if progress:
            print(f"reproduce: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
        done.append(executed)
    return done


def reproduce_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python dimezbl_core.py reproduce [--profile smoke] [--set NAME=JSON ...]`: exit status 0,
    or 1 with the failing notebook and cell named on stderr."""
    import argparse

    parser = argparse.ArgumentParser(prog="python dimezbl_core.py reproduce",
                                     description="Run notebooks 01-05 with papermill (Tables 1 and 2, figures).")
    parser.add_argument("--profile", default="smoke", choices=sorted(dc.PROFILES))
    parser.add_argument("--results-dir", default=None, help="default <repository>/results")
    parser.add_argument("--data-dir", default=None, help="default $DIMEZBL_DATA_DIR or <repository>/data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel (default python3: this interpreter)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                        help="a notebook parameter, e.g. --set 'targets=[\"U0\"]' --set 'seeds=[0, 1]'")
    args = parser.parse_args(argv)
    parameters = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            parameters[key] = json.loads(value)
        except json.JSONDecodeError:
            parameters[key] = value
    start = time.perf_counter()
    try:
        reproduce(args.profile, args.results_dir, args.data_dir, args.device, parameters, kernel_name=args.kernel)
    except (NotebookFailed, ValueError) as error:
        print(f"reproduce: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"reproduce: all notebooks ran in {time.perf_counter() - start:.0f} s; tables in "
          f"{results_path(args.results_dir, 'tables')}, figures in {results_path(args.results_dir, 'figures')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(reproduce_main())
