"""The short-range experiment (Sec. 3.3's motivation for ZBL): bond compression against GFN2-xTB and MD
stability (Langevin and NVE) of trained models, with tables and figures.
"""

from __future__ import annotations

import argparse
import logging
import math
import platform
import sys
import time
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .calculator import DimezblCalculator, DimezblCommittee
from .checkpoints import git_state, hardware_description
from .compression import (
    COMPRESSION_DISTANCES_A,
    compression_curve_with_reference,
    element_pair_bonds,
    summarize_compression,
)
from .config import PROFILES
from .data import MD17_MOLECULES, md17_molecule_name
from .figures import MODEL_COLORS, _figure, plot_compression_curves, save_figure
from .files import atomic_write_bytes, results_path
from .md17_generate import (
    BOND_CUTOFF_FACTOR,
    LANGEVIN_FRICTION_PER_FS,
    XTB_METHOD,
    _software_versions,
    _thermalize_momenta,
    bond_graph,
    langevin_dynamics,
    optimise_md17_geometry,
    xtb_calculator,
)
from .runner import MODEL_LABELS, MODEL_RECIPES, _hardware_text, checkpoint_path, collect_runs

# --- the short-range experiment (Sec. 3.3's motivation for ZBL) ---
# Two questions about the trained models away from the training data: (a) does compressing a bond
# raise the energy as the reference method does (no spurious hole at short range)? (b) do molecular
# dynamics trajectories at 500-1500 K stay physical? GFN2-xTB (tblite), the method that generated
# the offline MD17 data, is the reference for both. Budgets are per profile (SHORTRANGE_BUDGETS).

SHORTRANGE_LOG = logging.getLogger("dimezbl.shortrange")
SHORTRANGE_TEMPERATURES_K = (500.0, 1000.0, 1500.0)
SHORTRANGE_ENSEMBLES = ("langevin", "nve")
SHORTRANGE_MODELS = ("dimenet", "dimezblnet")
REFERENCE_MODEL = "gfn2-xtb"  # the reference method's rows in the MD tables
MODEL_LABELS_SHORTRANGE = {**MODEL_LABELS, REFERENCE_MODEL: "GFN2-xTB"}
CLOSE_CONTACT_A = 0.5  # Angstrom: two atoms closer than this are an unphysical state
BOND_BREAK_FACTOR = 2.0  # a starting bond longer than 2x its starting length is broken
SHORTRANGE_TIMESTEP_FS = 0.5  # MD17's time step
SHORTRANGE_CHECK_EVERY = 10  # MD steps between checks of the state (5 fs at 0.5 fs)
# Per profile: MD steps per trajectory, seeds per (molecule, ensemble, temperature, model), and the
# spacing of the bond-compression grid (0.3 to 3 A). smoke: ~10 min on 2 CPU cores with the smoke
# models (100 fs per trajectory: a check of the pipeline more than of the models).
# DeePMD-kit's model deviation: frames whose max per-atom force deviation exceeds an upper trust level (DP-GEN
# runs commonly use 0.15-0.35 eV/A) are flagged as unreliable; the committee of the training seeds warns above this.
COMMITTEE_WARNING_EV_A = 0.25

SHORTRANGE_BUDGETS = {
    "smoke": dict(n_steps=200, seeds=(0, 1), compression_step_a=0.05),
    "cpu": dict(n_steps=4000, seeds=(0, 1, 2, 3, 4), compression_step_a=0.025),
    "paper": dict(n_steps=20000, seeds=tuple(range(10)), compression_step_a=0.025),
}


def shortrange_checkpoints(
    profile: str = "smoke", molecules: Sequence[str] = MD17_MOLECULES, seed: Optional[int] = None, results_dir=None
) -> pd.DataFrame:
    """The best checkpoints of the MD17 DimeNet and DimezblNet runs of a profile (those of
    `make reproduce PROFILE=profile`), one row per (molecule, model): molecule, model, seed,
    checkpoint, run_dir, profile, git_commit. Raises FileNotFoundError naming the command when a
    run is missing (checkpoints are not committed: they exist where `make reproduce` ran)."""
    runs = collect_runs(profile, "md17", results_dir)
    rows = []
    for molecule in molecules:
        molecule = md17_molecule_name(molecule)
        for model in SHORTRANGE_MODELS:
            try:
                path = checkpoint_path(runs, molecule, model, seed, results_dir)
            except (ValueError, FileNotFoundError) as error:
                raise FileNotFoundError(
                    f"no {profile}-profile MD17 {model} checkpoint for {molecule} under "
                    f"{results_path(results_dir, 'runs', profile)} ({error}): run `make reproduce "
                    f"PROFILE={profile}` first (it trains the models; checkpoints are not committed)"
                ) from None
            row = runs[(runs["target"] == molecule) & (runs["model"] == model)].sort_values("seed")
            row = row[row["seed"] == seed].iloc[0] if seed is not None else row.iloc[0]
            rows.append(
                {
                    "molecule": molecule,
                    "model": model,
                    "seed": int(row["seed"]),
                    "checkpoint": str(path),
                    "run_dir": row["run_dir"],
                    "profile": profile,
                    "git_commit": row["git_commit"],
                }
            )
    return pd.DataFrame(rows)


def _shortrange_models(checkpoints: pd.DataFrame) -> list:
    """The models of a checkpoints table in MODEL_RECIPES order (DimeNet, then the ZBL recipes)."""
    present = set(checkpoints["model"])
    return [m for m in MODEL_RECIPES if m in present]


def _checkpoint_of(checkpoints: pd.DataFrame, molecule: str, model: str) -> str:
    rows = checkpoints[(checkpoints["molecule"] == molecule) & (checkpoints["model"] == model)]
    if rows.empty:
        raise ValueError(f"no {model} checkpoint for {molecule} in the checkpoints table (see shortrange_checkpoints)")
    return rows["checkpoint"].iloc[0]


def unphysical_state(positions, reference) -> Optional[str]:
    """Why the positions [N, 3] (Angstrom) of the molecule `reference` (ase.Atoms, the starting
    geometry) are an unphysical state, or None. Checked in this order:

    - "not finite": a position is NaN or inf;
    - "close contact": two atoms closer than CLOSE_CONTACT_A = 0.5 A (no covalent bond is shorter:
      H-H is 0.74 A);
    - "bond broken": a bond of `bond_graph(reference)` is longer than BOND_BREAK_FACTOR = 2 x its
      length in `reference`;
    - "new bond": two atoms that are not bonded in `reference` come closer than `bond_graph`'s own
      criterion, 1.2 x the sum of their covalent radii (this also flags real chemistry such as a
      proton transfer; the GFN2-xTB rows of the MD tables show how often the reference does it).

    The reason names the atoms and the distance, e.g. "close contact: atoms 2-5 at 0.41 A".
    """
    from ase.data import covalent_radii

    positions = np.asarray(positions, dtype=np.float64)
    if not np.isfinite(positions).all():
        return "not finite: a position is NaN or inf"
    numbers, start = reference.numbers, reference.get_positions()
    n = len(numbers)
    distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    start_distance = np.linalg.norm(start[:, None] - start[None], axis=-1)
    bonded = np.zeros((n, n), dtype=bool)
    for i, j in bond_graph(reference):
        bonded[i, j] = True
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    radii = covalent_radii[numbers]
    checks = (
        ("close contact", upper & (distance < CLOSE_CONTACT_A)),
        ("bond broken", bonded & (distance > BOND_BREAK_FACTOR * start_distance)),
        ("new bond", upper & ~bonded & (distance < BOND_CUTOFF_FACTOR * (radii[:, None] + radii[None]))),
    )
    for name, flagged in checks:
        if flagged.any():
            i, j = np.argwhere(flagged)[0]
            return (
                f"{name}: atoms {i}-{j} ({reference.get_chemical_symbols()[i]}-"
                f"{reference.get_chemical_symbols()[j]}) at {distance[i, j]:.2f} A "
                f"(start {start_distance[i, j]:.2f} A)"
            )
    return None


def md_trajectory(
    atoms,
    calculator,
    ensemble: str = "langevin",
    temperature_k: float = 500.0,
    seed: int = 0,
    n_steps: int = 200,
    timestep_fs: float = SHORTRANGE_TIMESTEP_FS,
    friction_per_fs: float = LANGEVIN_FRICTION_PER_FS,
    check_every: int = SHORTRANGE_CHECK_EVERY,
    committee=None,
    warning_ev_a: float = COMMITTEE_WARNING_EV_A,
) -> dict:
    """One MD trajectory of `atoms` (its positions are the start and the reference of
    `unphysical_state`) with an ASE calculator, stopped at the first unphysical state.

    ensemble "langevin": ase.md.langevin.Langevin at temperature_k (K), friction_per_fs (1/fs);
    "nve": ase.md.verlet.VelocityVerlet. Both start from Maxwell-Boltzmann momenta at
    temperature_k (rng seed `seed`, no centre-of-mass motion or rotation); timestep_fs (fs). The
    state is checked every `check_every` steps; a calculator error (e.g. coincident atoms) also
    ends the trajectory as unphysical. Returns: steps, time_fs, unphysical, reason,
    failure_time_fs (NaN if none), energy_drift_ev_atom_ps (NVE: least-squares slope of the total
    energy over the physical part, eV/atom/ps; NaN for Langevin or under 3 samples),
    max_energy_error_ev_atom (NVE: max |E_total - E_total(0)| per atom, eV), wall_s.

    committee (a `DimezblCommittee`, e.g. the training seeds of the driving model): evaluated at the start and at
    every check, not driving the MD; adds max_force_deviation_ev_a (the largest DeePMD-style per-atom force
    deviation of the committee over the physical part, eV/A), first_warning_time_fs (the first check at which it
    exceeded `warning_ev_a`; NaN if never) and warned_before_failure (True when that warning came at or before
    the last physical check of a trajectory that turned unphysical; NaN without a failure).
    """
    from ase import units
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    if ensemble not in SHORTRANGE_ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}: use one of {SHORTRANGE_ENSEMBLES}")
    if n_steps < 1 or check_every < 1 or timestep_fs <= 0 or temperature_k <= 0:
        raise ValueError(
            f"need n_steps >= 1, check_every >= 1, timestep_fs > 0, temperature_k > 0; got "
            f"{n_steps}, {check_every}, {timestep_fs}, {temperature_k}"
        )
    reference = atoms.copy()
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    _thermalize_momenta(atoms, temperature_k, rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    if ensemble == "langevin":
        atoms.set_constraint(FixCom())  # as generate_md17: no drift of the centre of mass
        dynamics = langevin_dynamics(atoms, timestep_fs, temperature_k, friction_per_fs, rng)
    else:
        dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    start = time.perf_counter()
    times_fs, totals_ev, steps, reason = [], [], 0, None
    deviations, first_warning_fs = [], math.nan

    def watch(time_fs):
        nonlocal first_warning_fs
        if committee is None:
            return
        committee.calculate(atoms.copy(), ["energy", "forces"])
        deviations.append(committee.results["max_force_deviation"])
        if math.isnan(first_warning_fs) and deviations[-1] > warning_ev_a:
            first_warning_fs = time_fs

    try:
        times_fs.append(0.0)
        totals_ev.append(atoms.get_total_energy())
        watch(0.0)
        while steps < n_steps and reason is None:
            block = min(check_every, n_steps - steps)
            dynamics.run(block)
            steps += block
            reason = unphysical_state(atoms.get_positions(), reference)
            total = atoms.get_total_energy()
            if reason is None and not np.isfinite(total):
                reason = "not finite: the energy is NaN or inf"
            if reason is None:
                times_fs.append(steps * timestep_fs)
                totals_ev.append(total)
                watch(steps * timestep_fs)
    except Exception as error:  # an outcome of the trajectory (coincident atoms, SCF failure), recorded
        reason = f"calculator error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    n_atoms = len(atoms)
    times_ps, totals = np.asarray(times_fs) / 1000.0, np.asarray(totals_ev) / n_atoms
    nve = ensemble == "nve"
    drift = float(np.polyfit(times_ps, totals, 1)[0]) if nve and len(totals) >= 3 else math.nan
    committee_results = {}
    if committee is not None:
        committee_results = {
            "max_force_deviation_ev_a": float(max(deviations)) if deviations else math.nan,
            "first_warning_time_fs": first_warning_fs,
            "warned_before_failure": (not math.isnan(first_warning_fs)) if reason is not None else math.nan,
        }
    return {
        "steps": steps,
        "time_fs": steps * timestep_fs,
        "unphysical": reason is not None,
        "reason": reason or "",
        "failure_time_fs": steps * timestep_fs if reason else math.nan,
        "energy_drift_ev_atom_ps": drift,
        "max_energy_error_ev_atom": float(np.abs(totals - totals[0]).max()) if nve and len(totals) else math.nan,
        "wall_s": round(time.perf_counter() - start, 3),
        **committee_results,
    }


def md_stability(
    checkpoints: pd.DataFrame,
    molecules: Optional[Sequence[str]] = None,
    temperatures_k: Sequence[float] = SHORTRANGE_TEMPERATURES_K,
    ensembles: Sequence[str] = SHORTRANGE_ENSEMBLES,
    seeds: Sequence[int] = (0, 1),
    n_steps: int = 200,
    timestep_fs: float = SHORTRANGE_TIMESTEP_FS,
    check_every: int = SHORTRANGE_CHECK_EVERY,
    reference: bool = True,
    device: str = "cpu",
    progress: bool = True,
    committees: Optional[Mapping] = None,
    warning_ev_a: float = COMMITTEE_WARNING_EV_A,
) -> pd.DataFrame:
    """`md_trajectory` for every molecule x ensemble x temperature x seed x model (the models of
    `checkpoints`, see `shortrange_checkpoints`, through `DimezblCalculator` in float64; with
    reference=True also GFN2-xTB). Every trajectory starts from the GFN2-xTB optimised geometry
    of the molecule (`optimise_md17_geometry`), the same for all models. One row per trajectory:
    molecule, n_atoms, model, ensemble, temperature_k, seed, n_steps_budget and `md_trajectory`'s
    results. committees: {(molecule, model): checkpoint paths of the committee} (e.g. its training seeds, the
    driving checkpoint among them) for the committee columns of `md_trajectory`; pairs without one get none."""
    from tqdm.auto import tqdm

    molecules = (
        list(dict.fromkeys(checkpoints["molecule"]))
        if molecules is None
        else [md17_molecule_name(m) for m in molecules]
    )
    for ensemble in ensembles:
        if ensemble not in SHORTRANGE_ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}: use one of {SHORTRANGE_ENSEMBLES}")
    models = _shortrange_models(checkpoints)
    tasks = [
        (molecule, ensemble, float(t), int(s))
        for molecule in molecules
        for ensemble in ensembles
        for t in temperatures_k
        for s in seeds
    ]
    rows = []
    bar = tqdm(
        total=len(tasks) * (len(models) + bool(reference)), desc="MD stability", unit="trajectory", disable=not progress
    )
    for molecule in molecules:
        atoms, _ = optimise_md17_geometry(molecule)
        calculators = {
            model: DimezblCalculator.from_checkpoint(_checkpoint_of(checkpoints, molecule, model), device=device)
            for model in models
        }
        watchers = {
            model: DimezblCommittee.from_checkpoints(paths, device=device)
            for (name, model), paths in (committees or {}).items()
            if name == molecule and model in calculators and len(paths) > 1
        }
        if reference:
            calculators[REFERENCE_MODEL] = xtb_calculator()
        for _, ensemble, temperature_k, seed in (task for task in tasks if task[0] == molecule):
            for model, calculator in calculators.items():
                bar.set_postfix_str(f"{molecule} {ensemble} {temperature_k:g} K seed {seed} {model}")
                result = md_trajectory(
                    atoms,
                    calculator,
                    ensemble,
                    temperature_k,
                    seed,
                    n_steps,
                    timestep_fs,
                    check_every=check_every,
                    committee=watchers.get(model),
                    warning_ev_a=warning_ev_a,
                )
                rows.append(
                    {
                        "molecule": molecule,
                        "n_atoms": len(atoms),
                        "model": model,
                        "ensemble": ensemble,
                        "temperature_k": temperature_k,
                        "seed": seed,
                        "n_steps_budget": n_steps,
                        "timestep_fs": timestep_fs,
                        **result,
                    }
                )
                if result["unphysical"]:
                    SHORTRANGE_LOG.info(
                        "%s %s %s %g K seed %d: unphysical after %g fs (%s)",
                        molecule,
                        model,
                        ensemble,
                        temperature_k,
                        seed,
                        result["failure_time_fs"],
                        result["reason"],
                    )
                bar.update()
    bar.close()
    return pd.DataFrame(rows)


def summarize_md_stability(trajectories: pd.DataFrame) -> pd.DataFrame:
    """Per (model, ensemble, temperature_k) over all molecules and seeds: trajectories,
    unphysical (count), unphysical_percent, median failure time (fs), the reasons counted, and
    for NVE the median |energy drift| (eV/atom/ps) and max |E_total - E_total(0)| (eV/atom) of
    the trajectories that stayed physical."""
    rows = []
    order = {name: k for k, name in enumerate((*MODEL_RECIPES, REFERENCE_MODEL))}
    for (model, ensemble, temperature), group in trajectories.groupby(["model", "ensemble", "temperature_k"]):
        failed, physical = group[group["unphysical"]], group[~group["unphysical"]]
        reasons = failed["reason"].str.split(":").str[0].value_counts()
        nve = ensemble == "nve" and len(physical)
        rows.append({
            "model": MODEL_LABELS_SHORTRANGE.get(model, model), "ensemble": ensemble,
            "temperature_k": temperature, "molecules": group["molecule"].nunique(), "trajectories": len(group),
            "unphysical": len(failed), "unphysical_percent": round(100.0 * len(failed) / len(group), 1),
            "median_failure_time_fs": failed["failure_time_fs"].median() if len(failed) else math.nan,
            "reasons": "; ".join(f"{name} {count}" for name, count in reasons.items()) or "none",
            "median_abs_drift_ev_atom_ps": physical["energy_drift_ev_atom_ps"].abs().median() if nve else math.nan,
            "max_energy_error_ev_atom": physical["max_energy_error_ev_atom"].max() if nve else math.nan,
            "simulated_time_fs": group["n_steps_budget"].iloc[0] * group["timestep_fs"].iloc[0],
            "_order": order.get(model, len(order)),
        })  # fmt: skip
        if "max_force_deviation_ev_a" in group and group["max_force_deviation_ev_a"].notna().any():
            # the seed committee (md_trajectory's committee): did its spread warn before the state turned unphysical?
            warned = failed["warned_before_failure"] == True  # noqa: E712 - the column holds True, False and NaN
            rows[-1].update(
                committee_max_force_deviation_ev_a=group["max_force_deviation_ev_a"].median(),
                committee_warned_before_failure=f"{int(warned.sum())} of {len(failed)}",
                committee_false_warnings=int(physical["first_warning_time_fs"].notna().sum()),
            )
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(["ensemble", "temperature_k", "_order"]).drop(columns="_order").reset_index(drop=True)


def shortrange_compression(
    checkpoints: pd.DataFrame,
    molecules: Optional[Sequence[str]] = None,
    distances_a=None,
    device: str = "cpu",
    progress: bool = True,
) -> list:
    """`compression_curve_with_reference` for each molecule and each of its `element_pair_bonds`,
    on the GFN2-xTB optimised geometry (r0 = GFN2-xTB's bond length), DimezblNet and DimeNet of
    `checkpoints` side by side. Returns the curves (attrs: molecule_name, bond, r0_a, unit)."""
    from tqdm.auto import tqdm

    molecules = (
        list(dict.fromkeys(checkpoints["molecule"]))
        if molecules is None
        else [md17_molecule_name(m) for m in molecules]
    )
    curves = []
    for molecule in tqdm(molecules, desc="bond compression", unit="molecule", disable=not progress):
        atoms, _ = optimise_md17_geometry(molecule)
        dimezblnet = _checkpoint_of(checkpoints, molecule, "dimezblnet")
        dimenet = (
            _checkpoint_of(checkpoints, molecule, "dimenet") if (checkpoints["model"] == "dimenet").any() else None
        )
        others = {
            MODEL_LABELS.get(m, m): _checkpoint_of(checkpoints, molecule, m)
            for m in _shortrange_models(checkpoints)
            if m not in ("dimenet", "dimezblnet")
        }
        for bond in element_pair_bonds(atoms):
            curve = compression_curve_with_reference(dimezblnet, bond, atoms, distances_a, dimenet, device, others)
            curve.attrs["molecule_name"] = molecule
            curves.append(curve)
    return curves


# --- tables, figures and the whole experiment (make shortrange) ---


def _markdown_grid(table: pd.DataFrame, digits: int = 3) -> str:
    """A plain GitHub-flavoured Markdown table (floats to `digits` significant digits)."""

    def cell(value):
        if isinstance(value, (float, np.floating)):
            return "–" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_shortrange_table(
    table: pd.DataFrame, header_lines: Sequence[str], basename: str, results_dir=None, folder: str = "shortrange"
) -> dict:
    """<results_dir>/<folder>/<basename>.csv and .md, each opening with the provenance block
    (CSV: '# ' lines, read with pandas.read_csv(path, comment='#'); Markdown: a list), each
    written to a temporary name and renamed."""
    folder = results_path(results_dir, folder)
    header = [str(line).replace("\n", " ") for line in header_lines]
    contents = {
        "csv": "".join(f"# {line}\n" for line in header) + table.to_csv(index=False),
        "md": "".join(f"- {line}\n" for line in header) + "\n" + _markdown_grid(table),
    }
    paths = {}
    for suffix, text in contents.items():
        paths[suffix] = folder / f"{basename}.{suffix}"
        atomic_write_bytes(paths[suffix], text.encode("utf-8"))
    return paths


def shortrange_header(title: str, checkpoints: pd.DataFrame, budget: Mapping) -> list:
    """The provenance block of a short-range table: what it is, the checkpoints (profile, run
    directories, git commits of their training), the budget and seeds, reference method,
    software, hardware, the commit the table was written at, and the date."""
    runs = checkpoints.drop_duplicates(["molecule", "model"])
    commits = sorted({str(c) for c in runs.get("git_commit", pd.Series(dtype=str)).dropna()}) or ["unknown"]
    profiles = sorted({str(p) for p in runs.get("profile", pd.Series(dtype=str)).dropna()}) or ["custom"]
    where = runs["run_dir"] if "run_dir" in runs else runs["checkpoint"]
    software = _software_versions()
    git = git_state()
    return [
        title,
        f"Checkpoints: {len(runs)} best (EMA) checkpoints, profile {', '.join(profiles)}, trained at git commit "
        f"{', '.join(commits)}: "
        + "; ".join(f"{m} {model}: {w}" for m, model, w in zip(runs["molecule"], runs["model"], where)),
        "Budget: " + ", ".join(f"{key} {value}" for key, value in budget.items()),
        f"Reference: {XTB_METHOD} (tblite {software.get('tblite')}), the method that generated the offline MD17 "
        "data; start geometries: GFN2-xTB optimised (optimise_md17_geometry)",
        f"Unphysical state: a distance below {CLOSE_CONTACT_A} A, a starting bond stretched beyond "
        f"{BOND_BREAK_FACTOR:g}x, a new bond (d < {BOND_CUTOFF_FACTOR} x sum of covalent radii), a non-finite "
        "value or a calculator error (dimezbl.shortrange.unphysical_state)",
        f"Software: torch {software.get('torch')}, ase {software.get('ase')}, numpy {software.get('numpy')}",
        f"Hardware: {_hardware_text(hardware_description(torch.device('cpu')))}",
        f"Written at git commit {git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} on {platform.node() or '?'}",
    ]


def plot_md_stability(summary: pd.DataFrame, results_dir=None, name: str = "shortrange_md_stability"):
    """Percent of unphysical trajectories against temperature (K) per model, Langevin and NVE
    panels, and the NVE energy drift (eV/atom/ps, log scale) of the physical trajectories."""
    if summary.empty:
        raise ValueError("no MD stability results to plot")
    colors = {**{MODEL_LABELS[m]: color for m, color in MODEL_COLORS.items()}, "GFN2-xTB": "k"}
    models = list(dict.fromkeys(summary["model"]))
    fig, axes = _figure(3, width=4.2, height=3.4)
    width = 0.8 / len(models)
    for ax, ensemble in zip(axes[0][:2], SHORTRANGE_ENSEMBLES):
        rows = summary[summary["ensemble"] == ensemble]
        temperatures = sorted(set(rows["temperature_k"]))
        for k, model in enumerate(models):
            of_model = rows[rows["model"] == model].set_index("temperature_k")
            values = [of_model["unphysical_percent"].get(t, math.nan) for t in temperatures]
            ax.bar(
                np.arange(len(temperatures)) + (k - (len(models) - 1) / 2) * width,
                values,
                width,
                color=colors.get(model),
                label=model,
            )
        ax.set_xticks(np.arange(len(temperatures)), [f"{t:g}" for t in temperatures])
        ax.set(
            xlabel="temperature (K)",
            ylabel="unphysical trajectories (%)",
            ylim=(0, 105),
            yticks=np.arange(0, 101, 20),
            title=f"{'Langevin' if ensemble == 'langevin' else 'NVE (velocity Verlet)'}, "
            f"{rows['simulated_time_fs'].max():g} fs"
            if len(rows)
            else ensemble,
        )
    ax = axes[0][2]
    nve = summary[(summary["ensemble"] == "nve") & summary["median_abs_drift_ev_atom_ps"].notna()]
    for model in models:
        of_model = nve[nve["model"] == model]
        ax.plot(
            of_model["temperature_k"],
            of_model["median_abs_drift_ev_atom_ps"],
            marker="o",
            color=colors.get(model),
        )
    ax.set(
        xlabel="start temperature (K)",
        ylabel="median |energy drift| (eV/atom/ps)",
        title="NVE drift, physical trajectories",
    )
    if len(nve) and (nve["median_abs_drift_ev_atom_ps"] > 0).all():
        ax.set_yscale("log")
    # one legend for the three panels, below them: inside a panel, a row of five labels squeezes the panels
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(models), fontsize=8)
    fig.suptitle(f"MD stability over {summary['molecules'].max()} MD17 molecule(s)")
    return save_figure(fig, name, results_dir)


def shortrange_experiment(
    profile: str = "smoke",
    molecules: Optional[Sequence[str]] = None,
    checkpoints: Optional[pd.DataFrame] = None,
    seeds: Optional[Sequence[int]] = None,
    n_steps: Optional[int] = None,
    temperatures_k: Sequence[float] = SHORTRANGE_TEMPERATURES_K,
    ensembles: Sequence[str] = SHORTRANGE_ENSEMBLES,
    timestep_fs: float = SHORTRANGE_TIMESTEP_FS,
    compression_step_a: Optional[float] = None,
    compression: bool = True,
    reference: bool = True,
    results_dir=None,
    device: str = "cpu",
    progress: bool = True,
    committees: Optional[Mapping] = None,
    tables_folder: str = "shortrange",
    md_figure: str = "shortrange_md_stability",
) -> dict:
    """The short-range experiment (`make shortrange`): bond compression against GFN2-xTB and MD
    stability for the MD17 DimeNet and DimezblNet models of `profile` (or `checkpoints`, a
    `shortrange_checkpoints`-like table). Budget: SHORTRANGE_BUDGETS[profile] unless given
    (n_steps MD steps of timestep_fs per trajectory, seeds, compression grid spacing in A).

    Writes results/<tables_folder>/{compression_curves.csv, compression_summary.{csv,md},
    md_stability.{csv,md} (summary), md_trajectories.csv (every trajectory)} with provenance
    headers, and results/figures/shortrange_compression_<molecule>.png and <md_figure>.png.
    Returns the tables and curves."""
    if profile not in SHORTRANGE_BUDGETS:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(SHORTRANGE_BUDGETS)}")
    budget = dict(SHORTRANGE_BUDGETS[profile])
    budget.update(
        {
            k: v
            for k, v in dict(n_steps=n_steps, seeds=seeds, compression_step_a=compression_step_a).items()
            if v is not None
        }
    )
    molecules = list(MD17_MOLECULES if molecules is None else [md17_molecule_name(m) for m in molecules])
    if checkpoints is None:
        checkpoints = shortrange_checkpoints(profile, molecules, results_dir=results_dir)
    result = {"checkpoints": checkpoints}
    if compression:
        distances = np.round(
            np.arange(COMPRESSION_DISTANCES_A[0], COMPRESSION_DISTANCES_A[-1] + 1e-9, budget["compression_step_a"]), 3
        )
        curves = shortrange_compression(checkpoints, molecules, distances, device, progress)
        summary = summarize_compression(curves)
        header = shortrange_header(
            f"Bond compression E(r) - E(r0) ({curves[0].attrs['unit']}), one bond per element pair of each MD17 "
            "molecule, atom j moved along the bond, all others fixed; 'hole' = min over r < r0 (negative is "
            "unphysical)",
            checkpoints,
            {
                "distances": f"{distances[0]:g}-{distances[-1]:g} A every {budget['compression_step_a']:g} A",
                "molecules": " ".join(molecules),
            },
        )
        long = pd.concat(
            [
                curve.assign(molecule=curve.attrs["molecule_name"], bond=curve.attrs["bond"], r0_a=curve.attrs["r0_a"])
                for curve in curves
            ]
        )
        write_shortrange_table(long, header, "compression_curves", results_dir, tables_folder)
        write_shortrange_table(summary, header, "compression_summary", results_dir, tables_folder)
        for molecule in dict.fromkeys(summary["molecule"]):
            plot_compression_curves(
                [c for c in curves if c.attrs["molecule_name"] == molecule],
                results_dir,
                name=f"shortrange_compression_{molecule}",
            )
        result.update(curves=curves, compression_summary=summary)
    trajectories = md_stability(
        checkpoints,
        molecules,
        temperatures_k,
        ensembles,
        budget["seeds"],
        budget["n_steps"],
        timestep_fs,
        reference=reference,
        device=device,
        progress=progress,
        committees=committees,
    )
    summary = summarize_md_stability(trajectories)
    header = shortrange_header(
        "MD stability: trajectories that reach an unphysical state within the simulated time, and NVE energy "
        "drift, per model, ensemble and temperature, over all molecules and seeds",
        checkpoints,
        {
            "molecules": " ".join(molecules),
            "ensembles": " ".join(ensembles),
            "temperatures": " ".join(f"{t:g} K" for t in temperatures_k),
            "seeds": " ".join(map(str, budget["seeds"])),
            "steps": budget["n_steps"],
            "timestep": f"{timestep_fs:g} fs",
            "simulated time": f"{budget['n_steps'] * timestep_fs:g} fs per trajectory",
            "Langevin friction": f"{LANGEVIN_FRICTION_PER_FS:g} 1/fs",
            "state checked every": f"{SHORTRANGE_CHECK_EVERY} steps",
            "model precision": "float64 (DimezblCalculator)",
        },
    )
    write_shortrange_table(summary, header, "md_stability", results_dir, tables_folder)
    write_shortrange_table(trajectories, header, "md_trajectories", results_dir, tables_folder)
    plot_md_stability(summary, results_dir, md_figure)
    result.update(trajectories=trajectories, md_summary=summary)
    return result


def shortrange_main(argv: Optional[Sequence[str]] = None) -> int:
    """`dimezbl shortrange [--profile smoke] ...` (make shortrange)."""
    parser = argparse.ArgumentParser(
        prog="dimezbl shortrange",
        description="Bond compression against GFN2-xTB and MD stability (Langevin and NVE at 500-1500 K) of the "
        "MD17 DimeNet and DimezblNet models trained by `make reproduce`; results/shortrange/ and "
        "results/figures/.",
    )
    parser.add_argument(
        "--profile",
        default="smoke",
        choices=sorted(PROFILES),
        help="whose models, and the budget of SHORTRANGE_BUDGETS",
    )
    parser.add_argument("--molecules", nargs="+", default=None, help="default: the 8 MD17 molecules")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--n-steps", type=int, default=None, help="MD steps per trajectory (0.5 fs)")
    parser.add_argument("--temperatures", nargs="+", type=float, default=list(SHORTRANGE_TEMPERATURES_K), help="K")
    parser.add_argument("--ensembles", nargs="+", choices=SHORTRANGE_ENSEMBLES, default=list(SHORTRANGE_ENSEMBLES))
    parser.add_argument("--no-compression", action="store_true", help="skip the bond-compression curves")
    parser.add_argument("--no-reference", action="store_true", help="skip the GFN2-xTB MD trajectories")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = shortrange_experiment(
            args.profile,
            args.molecules,
            seeds=args.seeds,
            n_steps=args.n_steps,
            temperatures_k=args.temperatures,
            ensembles=args.ensembles,
            compression=not args.no_compression,
            reference=not args.no_reference,
            results_dir=args.results_dir,
            progress=not args.no_progress,
        )
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_markdown_grid(result["md_summary"]))
    print(
        f"tables in {results_path(args.results_dir, 'shortrange')}, figures in "
        f"{results_path(args.results_dir, 'figures')}"
    )
    return 0
