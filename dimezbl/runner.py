"""Running profiles: training every model, seed and target of a profile (finished runs reused), collecting runs,
loading trained models and predicting, the ZBL term of trained DimezblNets.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import platform
import time
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch

from .checkpoints import git_state, load_checkpoint
from .config import PROFILE_MD17_DATA, PROFILE_MD17_GENERATION, PROFILE_SEEDS, TrainConfig, profile_config
from .data import (
    MD17_MOLECULES,
    QM9_TARGETS,
    load_md17,
    md17_default_path,
    md17_molecule_name,
    qm9_to_reporting_units,
)
from .files import _relative_to_results, atomic_write_bytes, portable_path, repository_path, results_path
from .md17_generate import generate_md17
from .shipped import shipped_weights_of_run
from .training import (
    _IGNORED_WHEN_REUSING,
    _SAFETY_LIMITS,
    ZBL_TERM_FILE,
    RunData,
    _config_mismatch,
    _energy_and_forces,
    _fields_differing,
    _write_zbl_term_file,
    build_model,
    reporting_unit,
    select_device,
    train,
)


def write_zbl_term(run_dir, subset: str = "test", device: str = "cpu", data_dir=None) -> dict:
    """`zbl_term_summary` of a finished DimezblNet run (its best checkpoint, EMA weights), written
    atomically to <run_dir>/zbl_term.json with the commit that computed it. train() writes it at the
    end of every DimezblNet run; this writes it for runs that finished before it did."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint_best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the ZBL term needs the run's best checkpoint")
    model, config = load_trained_model(path, device, data_dir)
    return _write_zbl_term_file(model, RunData(config, model.zbl), run_dir, subset)


def zbl_terms(runs: pd.DataFrame, results_dir=None) -> pd.DataFrame:
    """One row per DimezblNet run of a `collect_runs` table: the learned ZBL weight and what the
    term adds (from each run's zbl_term.json) beside the run's test MAE, the DimeNet test MAE of
    the same seed and the MAE of predicting the training mean (how much the target itself varies).
    Runs without zbl_term.json get NaN (write it with `write_zbl_term`)."""
    rows = []
    for run in runs[runs["model"].str.startswith("dimezblnet")].itertuples(index=False):
        path = results_path(results_dir, run.run_dir, ZBL_TERM_FILE)
        fix = f"restore it from git or write it again from the run's best checkpoint: dimezbl zbl-term {path.parent}"
        term = _read_run_file(path, fix) if path.exists() else None
        dimenet = runs[
            (runs["target"] == run.target)
            & (runs["seed"] == run.seed)
            & (runs["model"] == run.model.replace("dimezblnet", "dimenet"))
        ]["test_energy_mae"]
        rows.append({
            "target": run.target, "seed": run.seed,
            "zbl_weight": term["zbl_weight"] if term else math.nan,
            "zbl_energy_mean": term["zbl_energy"]["mean"] if term else math.nan,
            "zbl_energy_std": term["zbl_energy"]["std"] if term else math.nan,
            "zbl_energy_unit": term["zbl_energy"]["unit"] if term else None,
            "contribution_mean": term["contribution"]["mean"] if term else math.nan,
            "contribution_std": term["contribution"]["std"] if term else math.nan,
            "test_energy_mae": run.test_energy_mae,
            "dimenet_test_energy_mae": float(dimenet.iloc[0]) if len(dimenet) else math.nan,
            "mean_predictor_energy_mae": run.mean_predictor_energy_mae,
            "unit": run.energy_unit, "run_dir": run.run_dir,
            "zbl_term_commit": term["git"]["commit"] if term and term.get("git") else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def zbl_terms_header(dataset: str) -> list:
    """The provenance block of tables/zbl_term_<dataset>.csv (written as '# ' lines)."""
    structures = "molecules" if dataset == "qm9" else "configurations"
    return [
        f"ZBL term of each DimezblNet run ({dataset}): the ZBL weight (fixed 1 or learned), E_ZBL of the test "
        f"{structures} (mean, std over them; zbl_energy_unit) and weight x E_ZBL (contribution; unit), from each "
        "run's zbl_term.json (best checkpoint, EMA weights)",
        "Beside it: the run's test energy MAE, DimeNet's test MAE with the same seed and the MAE of predicting the "
        "training mean (unit)",
        "NaN: the run has no zbl_term.json (its checkpoint was not on the machine that wrote the table); write it "
        "with: dimezbl zbl-term RUN_DIR",
        f"Git commit that computed each row: column zbl_term_commit; table written at {git_state().get('commit')}",
        f"Written: {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {platform.node() or '?'}",
    ]


def write_zbl_terms(runs: pd.DataFrame, dataset: str, results_dir=None) -> pd.DataFrame:
    """`zbl_terms` of a dataset's runs, written atomically to <results_dir>/tables/zbl_term_<dataset>.csv
    under a '# ' provenance block (`zbl_terms_header`; read it back with pandas.read_csv(path, comment='#'))."""
    table = zbl_terms(runs[runs["dataset"] == dataset], results_dir)
    header = "".join(f"# {line}\n" for line in zbl_terms_header(dataset))
    atomic_write_bytes(
        results_path(results_dir, "tables", f"zbl_term_{dataset}.csv"),
        (header + table.to_csv(index=False)).encode("utf-8"),
    )
    return table


# --- training every (target, model, seed) ----------------------------------------------------------------

# The models a profile can train: name -> profile_config overrides. The ZBL recipes (docs/fair.md):
# (a) "dimezblnet", the literal Eq. 8 added with weight 1 (enveloped at the model cutoff only);
# (b) "dimezblnet_switched", the same switched off beyond 0.75 x the sum of covalent radii (MACE's
#     reach, shortened so that it is zero at every bond length of the QM9 and generated MD17 data:
#     their smallest r / (rcov_i + rcov_j) is 0.78, C-N triple bonds of QM9);
# (c) "dimezblnet_interpolated", DeePMD-kit's DP+ZBL blend (network off, ZBL on, below 0.4-0.7 A).
MODEL_RECIPES = {
    "dimenet": {"zbl": False},
    "dimezblnet": {"zbl": True},
    "dimezblnet_switched": {
        "zbl": True,
        "name": "dimezblnet_switched",
        "model.zbl_reach": "covalent",
        "model.zbl_covalent_factor": 0.75,
    },
    "dimezblnet_interpolated": {"zbl": True, "name": "dimezblnet_interpolated", "model.zbl_combine": "interpolate"},
}
MODEL_ZBL = {name: recipe["zbl"] for name, recipe in MODEL_RECIPES.items()}  # model name -> TrainConfig.zbl
MODEL_LABELS = {
    "dimenet": "DimeNet",
    "dimezblnet": "DimezblNet",
    "dimezblnet_switched": "DimezblNet (switched)",
    "dimezblnet_interpolated": "DimezblNet (interpolated)",
}


def generated_md17_path(molecule: str, profile: str, data_dir=None) -> Path:
    """<data_dir>/md17/generated/<profile>/<molecule>.npz: one GFN2-xTB data set per profile."""
    return md17_default_path(molecule, "generated", data_dir).parent / profile / f"{molecule}.npz"


def profile_seeds(profile: str) -> tuple:
    """The seeds a profile trains every model with."""
    if profile not in PROFILE_SEEDS:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILE_SEEDS)}")
    return PROFILE_SEEDS[profile]


def _md17_configs_needed(config: TrainConfig) -> int:
    """The fewest configurations RunData can split for this config (n_train + n_valid + test)."""
    n_train = config.n_train or 1000
    n_valid = config.n_valid if config.n_valid is not None else 1000
    return n_train + n_valid + (config.n_test or 1)


# The generator settings that shape the data (recorded in the data set's JSON sidecar).
_MD17_GENERATION_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(generate_md17).parameters.items()
    if name in ("temperature_k", "timestep_fs", "sample_every", "seed", "equilibration_steps", "friction_per_fs")
}


def ensure_md17_data(
    molecule: str, n_configs: int, data_dir=None, progress: bool = True, path=None, **generation
) -> Path:
    """The generated (GFN2-xTB) data file of `molecule` with at least `n_configs` configurations,
    made with the generator settings `generation` (generate_md17 keywords, e.g. sample_every):
    used as it is when large enough and made with those settings (never shrunk), else generated
    or extended (resumable; other settings start over)."""
    path = Path(path) if path is not None else md17_default_path(molecule, "generated", data_dir)
    sidecar = path.with_suffix(".json")
    if path.is_file():
        with np.load(path) as npz:
            available = int(npz["E"].shape[0])
        made_with = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        wanted = {**_MD17_GENERATION_DEFAULTS, **generation}
        changed = sorted(k for k, v in wanted.items() if k in made_with and made_with[k] != v)
        if available >= n_configs and not changed:
            return path
        why = (
            f"made with other settings ({', '.join(changed)})"
            if changed
            else f"{available} configurations, {n_configs} needed"
        )
        print(f"{molecule}: regenerating {path}: {why}", flush=True)
    torch_threads = torch.get_num_threads()
    try:
        return generate_md17(molecule, n_configs, out_path=path, data_dir=data_dir, progress=progress, **generation)
    finally:  # the generator pins OpenMP (shared with torch) to one thread for tblite
        torch.set_num_threads(torch_threads)


def run_models(
    profile: str,
    dataset: str,
    targets: Sequence[str],
    seeds: Optional[Sequence[int]] = None,
    models: Sequence[str] = ("dimenet", "dimezblnet"),
    data_dir=None,
    results_dir=None,
    progress: bool = True,
    overwrite: bool = False,
    md17_configs: Optional[int] = None,
    reuse_committed: bool = False,
    train_missing: bool = True,
    **overrides,
) -> pd.DataFrame:
    """Train every (target, model, seed) of a profile; return their metrics (`collect_runs`).

    targets: QM9 targets (QM9_TARGETS) or MD17 molecules (MD17_MOLECULES). seeds: None is
    the profile's (PROFILE_SEEDS). Each model gets the same data, splits, budget and seed.
    overrides: TrainConfig fields (e.g. max_steps=20, n_train=64, device="cpu"); None values
    mean "the profile's". Runs go to <results_dir>/runs/<profile>/<dataset>/<target>/.

    Resumable: a run whose metrics.json and checkpoint_best.pt exist with the same config (device
    and out_dir aside) is reused without training; an interrupted run resumes from its checkpoint
    (train). reuse_committed=True also reuses a finished run whose checkpoint is not here
    (metrics.json and config.json only: committed runs, whose checkpoints are not committed), so that a
    long profile can be assembled from runs trained at different times and places; such runs enter
    the tables and learning curves, not the plots that need the model (predict_runs skips them).
    train_missing=False trains nothing: unfinished or absent runs are named and left out (e.g. to
    rebuild tables and figures from finished runs while another process trains the rest).
    A run directory holding another config is an error unless overwrite=True (then it is trained
    again from scratch). Runs are trained seed by seed, both models of a seed together. Prints one
    line per run (reused, or trained: time, MAE).
    MD17 (source "generated"): when a run needs training, the GFN2-xTB data are generated first
    where missing, with md17_configs configurations (None: the profile's, PROFILE_MD17_GENERATION).
    """
    if dataset not in ("qm9", "md17"):
        raise ValueError(f"unknown dataset {dataset!r}: use 'qm9' or 'md17'")
    targets = [str(t) for t in ([targets] if isinstance(targets, str) else targets)]
    if not targets:
        raise ValueError("no targets given: name QM9 targets or MD17 molecules")
    if dataset == "qm9":
        unknown = [t for t in targets if t not in QM9_TARGETS]
        if unknown:
            raise ValueError(f"unknown QM9 targets {unknown}: use some of {QM9_TARGETS}")
    else:
        targets = [md17_molecule_name(t) for t in targets]
    unknown = [m for m in models if m not in MODEL_ZBL]
    if unknown:
        raise ValueError(f"unknown models {unknown}: use some of {tuple(MODEL_ZBL)}")
    seeds = [int(s) for s in (profile_seeds(profile) if seeds is None else seeds)]
    if not seeds:
        raise ValueError("no seeds given (None: the profile's seeds)")
    fields = {key: value for key, value in overrides.items() if value is not None}
    fields["out_dir"] = portable_path(results_path(results_dir, "runs"))  # config.json valid in any checkout
    if data_dir is not None:
        fields["data_dir"] = str(data_dir)

    for target in targets:
        if dataset == "md17" and fields.get("md17_source", "generated") == "generated":
            # one generated data set per profile, so profiles never overwrite each other's data
            fields["md17_path"] = portable_path(
                generated_md17_path(target, PROFILE_MD17_DATA.get(profile, profile), data_dir)
            )
        # seed by seed, both models of a seed together: an interrupted profile leaves complete pairs
        configs = [
            profile_config(profile, dataset, target, seed=seed, **{**MODEL_RECIPES[model], **fields})
            for seed in seeds
            for model in models
        ]
        to_train = []  # (config, resume) of the runs that are not finished
        for config in configs:
            run_dir = config.run_dir
            stored_path, metrics_path = run_dir / "config.json", run_dir / "metrics.json"
            resume = True
            if stored_path.exists():
                stop_reason = (
                    _read_run_file(metrics_path, "restore it from git or train the run again").get("stop_reason")
                    if metrics_path.exists()
                    else None
                )
                mismatch = _config_mismatch(json.loads(stored_path.read_text()), config, stop_reason)
                if mismatch and set(mismatch) <= set(_SAFETY_LIMITS) and (run_dir / "checkpoint_last.pt").exists():
                    # stopped by the old safety limit: continue it from its last checkpoint under the new one
                    print(
                        f"continuing {_relative_to_results(run_dir, results_dir)} (stopped by {stop_reason}) "
                        f"with {stop_reason}={getattr(config, stop_reason)}",
                        flush=True,
                    )
                    to_train.append((config, True))
                    continue
                if mismatch and not overwrite:
                    raise ValueError(
                        f"{run_dir} holds a run with another config (differs in {', '.join(mismatch)}); "
                        "pass overwrite=True to train it again, or use another results_dir"
                    )
                if not mismatch and metrics_path.exists():
                    has_best = (run_dir / "checkpoint_best.pt").exists()
                    stale = has_best and stale_best_checkpoint(run_dir)
                    if has_best and not stale:
                        print(f"reusing {_relative_to_results(run_dir, results_dir)} (same config)", flush=True)
                        continue
                    if reuse_committed:
                        why = f"{stale}, not used" if stale else "its checkpoint is not here"
                        print(
                            f"reusing {_relative_to_results(run_dir, results_dir)} (same config; metrics only: {why})",
                            flush=True,
                        )
                        continue
                    if stale:
                        raise ValueError(
                            f"{stale}; delete the checkpoints of {run_dir} to train it again, "
                            "or pass reuse_committed=True to use its metrics only"
                        )
                resume = not mismatch
            to_train.append((config, resume))
        if to_train and not train_missing:
            print(
                f"not training {len(to_train)} unfinished run(s) (train_missing=False), left out: "
                + ", ".join(_relative_to_results(c.run_dir, results_dir) for c, _ in to_train),
                flush=True,
            )
            to_train = []
        if to_train and dataset == "md17" and configs[0].md17_source == "generated":  # data only when needed
            generation = dict(PROFILE_MD17_GENERATION.get(profile, {}))
            wanted = md17_configs or generation.pop("n_configs", 0)
            generation.pop("n_configs", None)
            ensure_md17_data(
                target,
                max(wanted, _md17_configs_needed(configs[0])),
                data_dir,
                progress,
                path=repository_path(configs[0].md17_path),
                **generation,
            )
        if to_train and dataset == "md17":
            check_same_data_as_finished_runs(configs[0], [config for config, _ in to_train])
        for config, resume in to_train:
            start = time.perf_counter()
            metrics = train(config, resume=resume, progress=progress)
            test = ", ".join(
                f"{k} {v:.4g} {metrics['units'][k.split('_')[0]]}"
                for k, v in metrics["test"].items()
                if k.endswith("_mae")
            )
            print(
                f"trained {_relative_to_results(config.run_dir, results_dir)} in "
                f"{time.perf_counter() - start:.0f} s: test MAE {test}",
                flush=True,
            )
    runs = collect_runs(profile, dataset, results_dir)
    keep = runs["target"].isin(targets) & runs["model"].isin(list(models)) & runs["seed"].isin(seeds)
    return runs[keep].reset_index(drop=True)


class OtherDataError(ValueError):
    """A run would train on other data than the finished runs of its comparison (`check_same_data_as_finished_runs`)."""


def check_same_data_as_finished_runs(config: TrainConfig, to_train: Sequence[TrainConfig]) -> None:
    """Every run of one profile and target compares models on one data set: refuse to train `to_train` on MD17
    data (`config.md17_path`) whose content sha256 differs from the one the finished runs beside them recorded
    (their provenance.json). A generated set regenerated on another CPU can be another trajectory (docs/data.md);
    training on it would mix two data sets in one comparison."""
    cell_dir = config.run_dir.parent
    training = {c.run_dir.name for c in to_train}  # their own old files (a run trained again) do not count
    recorded: dict = {}
    for provenance_path in sorted(cell_dir.glob("*/provenance.json")):
        if provenance_path.parent.name in training or not (provenance_path.parent / "metrics.json").exists():
            continue
        provenance = _read_run_file(provenance_path, _retrain_hint(provenance_path.parent))
        sha = provenance.get("data", {}).get("content_sha256")
        if sha:
            recorded.setdefault(sha, []).append(provenance_path.parent.name)
    if not recorded:
        return
    found = load_md17(
        config.target, source=config.md17_source, data_dir=config.data_dir, path=repository_path(config.md17_path)
    ).content_sha256()
    if found in recorded:
        return
    finished = "; ".join(f"{sha[:16]}... ({', '.join(names)})" for sha, names in recorded.items())
    raise OtherDataError(
        f"the data of {cell_dir} ({config.md17_path or config.target}) have content sha256 {found[:16]}..., but "
        f"its finished runs were trained on {finished}: a run trained now ("
        + ", ".join(c.run_dir.name for c in to_train)
        + ") would not be comparable with them. Restore the data they used (a generated set regenerates bit for "
        "bit only on a CPU like the one that generated it: see docs/data.md), or train the whole comparison "
        "in another results directory"
    )


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
    chip = hardware.get("gpu") or hardware.get("cpu_model") or hardware.get("cpu") or "?"
    return (
        f"{hardware.get('device', '?')} ({chip}), {hardware.get('cpu_count', '?')} CPU cores, "
        f"{hardware.get('torch_threads', '?')} torch threads"
    )


SEGMENT_SEPARATOR = " + "  # joins the commits (hardware) of a run's training segments in runs.csv


def _in_order_once(texts) -> str:
    """Distinct texts in their first-seen order, joined by SEGMENT_SEPARATOR (one per training segment)."""
    return SEGMENT_SEPARATOR.join(dict.fromkeys(texts))


def segment_texts(text) -> list:
    """The per-segment texts of a runs.csv field that `_in_order_once` joined (e.g. each commit of a resumed run)."""
    return str(text).split(SEGMENT_SEPARATOR)


def _run_hardware_text(provenance: dict) -> str:
    """The hardware of a run: that of the process that finished it, preceded by any other hardware
    an earlier segment trained on (a run started on a GPU and resumed on a CPU names both)."""
    texts = [
        _hardware_text(segment["hardware"]) for segment in provenance.get("segments", []) if segment.get("hardware")
    ]
    return _in_order_once([*texts, _hardware_text(provenance.get("hardware", {}))])


def _run_git(provenance: dict) -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of a run: the commits of every process that trained it, in order, joined
    by " + " (a run started on a GPU copy and resumed here names both); dirty is True if any
    process ran with uncommitted changes, else None if any had no git (a declared commit)."""
    states = [segment for segment in provenance.get("segments", []) if "commit" in segment]
    states = states or [provenance.get("git", {})]
    commits = _in_order_once(state.get("commit") or "?" for state in states)  # "?": no git, none declared
    flags = [state.get("dirty") for state in states]
    dirty = True if True in flags else (None if None in flags else False)
    return commits, dirty


def _read_run_file(path: Path, fix: str) -> dict:
    """A JSON file of a run directory; unreadable or not JSON: an error naming the file and `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error}): {fix}") from None


def stale_best_checkpoint(run_dir) -> Optional[str]:
    """Why <run_dir>/checkpoint_best.pt does not belong to the finished run recorded beside it
    (config.json, metrics.json), or None when it does. A checkpoint is an ignored file, so it can
    outlive the committed files of its run (a pull or checkout that replaces them): its stored
    config must equal config.json (device, out_dir and safety limits aside) and its step the
    best_step of metrics.json."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint_best.pt"
    checkpoint = load_checkpoint(path)
    retrain = _retrain_hint(run_dir)
    stored = _read_run_file(run_dir / "config.json", retrain)
    differs = _fields_differing(stored, checkpoint.get("config", {}), _IGNORED_WHEN_REUSING + _SAFETY_LIMITS)
    if differs:
        return f"{path} was written by a run with another config (differs in {', '.join(differs)})"
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and "step" in checkpoint:
        best_step = _read_run_file(metrics_path, retrain).get("best_step")
        if best_step is not None and int(checkpoint["step"]) != int(best_step):
            return (
                f"{path} holds step {int(checkpoint['step'])}, but metrics.json's best step is "
                f"{best_step}: it is from another training of this run"
            )
    return None


def _retrain_hint(run_dir) -> str:
    """The fix named when a run directory's files are corrupt or do not belong together."""
    return f"restore it from git (git checkout -- {run_dir}) or train the run again (delete {run_dir}, then run_models)"


def _run_row(run_dir: Path, results_dir) -> dict:
    """One run's record from its metrics.json, config.json and provenance.json."""
    retrain = _retrain_hint(run_dir)
    metrics = _read_run_file(run_dir / "metrics.json", retrain)
    config = _read_run_file(run_dir / "config.json", retrain)
    provenance_path = run_dir / "provenance.json"
    provenance = _read_run_file(provenance_path, retrain) if provenance_path.exists() else {}
    model = TrainConfig.from_dict(config).model_name  # dimenet, dimezblnet (+ _pp for DimeNet++)
    test, valid = metrics["test"], metrics["valid"]
    baseline, units = metrics.get("test_mean_predictor", {}), metrics.get("units", {})
    commit, dirty = _run_git(provenance)
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
        "git_commit": commit, "git_dirty": dirty,
        "hardware": _run_hardware_text(provenance),
        "md17_source": config.get("md17_source") if config["dataset"] == "md17" else None,
        "data_dir": config.get("data_dir"),
    }  # fmt: skip


def collect_runs(profile: str, dataset: Optional[str] = None, results_dir=None) -> pd.DataFrame:
    """Every finished run (a metrics.json) of a profile under <results_dir>/runs, one row per run
    (RUN_COLUMNS); run_dir is relative to the results directory. Sorted in the tables' order."""
    root = results_path(results_dir, "runs", profile)
    datasets = [dataset] if dataset is not None else ["qm9", "md17"]
    rows = [
        _run_row(path.parent, results_dir)
        for name in datasets
        for path in sorted(root.glob(f"{name}/*/*_seed*/metrics.json"))
    ]
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    if runs.empty:
        return runs
    order = {name: i for i, name in enumerate(QM9_TARGETS + MD17_MOLECULES)}
    runs = runs.assign(_order=runs["target"].map(order).fillna(len(order)))
    return runs.sort_values(["dataset", "_order", "model", "seed"]).drop(columns="_order").reset_index(drop=True)


def checkpoint_path(
    runs: pd.DataFrame, target: str, model: str, seed: Optional[int] = None, results_dir=None, shipped: bool = True
) -> Path:
    """checkpoint_best.pt of one run in a `collect_runs` table (seed None: the lowest seed); where it is not here
    and `shipped`, the run's shipped potential file (`shipped.shipped_weights_of_run`), which loads the same."""
    rows = runs[(runs["target"] == target) & (runs["model"] == model)]
    if seed is not None:
        rows = rows[rows["seed"] == seed]
    if rows.empty:
        raise ValueError(
            f"no finished {model} run for {target!r}"
            f"{'' if seed is None else f' with seed {seed}'} in these runs; train it first "
            "(run_models)"
        )
    run_dir = rows.sort_values("seed")["run_dir"].iloc[0]
    path = results_path(results_dir, run_dir, "checkpoint_best.pt")
    if not path.exists() and shipped:
        weights = shipped_weights_of_run(path.parent)
        if weights is not None:
            return weights  # the run's best EMA weights, shipped (dimezbl.shipped): loads as its checkpoint
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run has a metrics.json but no best checkpoint")
    stale = stale_best_checkpoint(path.parent)
    if stale:  # a FileNotFoundError: callers that leave out runs without checkpoints leave it out too
        raise FileNotFoundError(f"{stale}; delete it, or train the run again, to plot its predictions")
    return path


# --- predictions and the compression (dimer) curve -------------------------------------------------------


def load_trained_model(path, device: str = "cpu", data_dir=None):
    """(model in eval mode with the best checkpoint's EMA weights, its TrainConfig). `path` may also be a shipped
    potential (`dimezbl.pretrained(...)`)."""
    if hasattr(path, "model") and hasattr(path, "metadata"):  # a dimezbl.shipped.Potential
        config = TrainConfig.from_dict(path.metadata["config"])
        return copy.deepcopy(path.model).to(device=select_device(device)).eval(), config
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=str(data_dir))
    model = build_model(config).to(device=select_device(device), dtype=getattr(torch, config.dtype))
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
    data = RunData(config, model.zbl)
    parts = {"energy_true": [], "energy_pred": [], "forces_true": [], "forces_pred": []}
    for batch in data.batches(getattr(data, subset)):
        batch = batch.to(device)
        need_forces = batch.forces is not None
        with torch.set_grad_enabled(need_forces):
            energy, forces = _energy_and_forces(model, batch, need_forces, create_graph=False)
        offset = batch.offset_energy  # float64, training units
        parts["energy_true"].append(batch.target.double().cpu() + offset.cpu())
        parts["energy_pred"].append(energy.detach().double().cpu() + offset.cpu())
        if need_forces:
            parts["forces_true"].append(batch.forces.detach().double().cpu())
            parts["forces_pred"].append(forces.detach().double().cpu())
    result = {key: (torch.cat(values).numpy() if values else None) for key, values in parts.items()}
    if config.dataset == "qm9":
        for key in ("energy_true", "energy_pred"):
            result[key] = qm9_to_reporting_units(result[key], config.target)
    units = reporting_unit(config)
    result.update(
        energy_unit=units["energy"],
        forces_unit=units.get("forces"),
        target=config.target,
        dataset=config.dataset,
        model=config.model_name,
        seed=config.seed,
        subset=subset,
    )
    return result


def predict_runs(
    runs: pd.DataFrame,
    subset: str = "test",
    device: str = "auto",
    seed: Optional[int] = None,
    results_dir=None,
    data_dir=None,
) -> dict:
    """`predict` for every (target, model) of a runs table (seed None: each run's lowest seed):
    {(target, model): prediction}. A run without its best checkpoint (reused from its metrics
    only, see run_models' reuse_committed) is left out, with a message naming it."""
    predictions = {}
    for target, model in runs[["target", "model"]].drop_duplicates().itertuples(index=False):
        try:
            path = checkpoint_path(runs, target, model, seed, results_dir)
        except FileNotFoundError as missing:
            print(f"left out of the predictions: {missing}", flush=True)
            continue
        predictions[(target, model)] = predict(path, subset, device, data_dir)
    if not predictions and not runs.empty:
        raise FileNotFoundError(
            "none of these runs has its best checkpoint here: train them (run_models "
            "without reuse_committed) to plot their predictions"
        )
    return predictions
