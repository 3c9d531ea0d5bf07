"""Bond compression (dimer-style) curves of trained models: one bond of a molecule shortened and stretched, the
other atoms fixed, against GFN2-xTB (Sec. 3.3: the short range that ZBL is meant to fix). Distances in Angstrom.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import torch

from .calculator import energy_unit_in_ev
from .checkpoints import load_checkpoint
from .config import QM9_ENERGY_TARGETS, TrainConfig
from .md17_generate import (
    bond_graph,
    md17_start_geometry,
    xtb_calculator,
)
from .runner import MODEL_LABELS, load_trained_model
from .training import molecule_zbl_energies, reporting_unit

LOG = logging.getLogger("dimezbl.shortrange")  # the experiment's log, which these curves are part of

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


def _energy_model(config: TrainConfig) -> None:
    if not (config.dataset == "md17" or config.target in QM9_ENERGY_TARGETS):
        raise ValueError(
            f"a compression curve needs an energy model (MD17, or QM9 "
            f"{', '.join(QM9_ENERGY_TARGETS)}); this checkpoint predicts {config.target!r}"
        )


def compression_curve(
    checkpoint,
    bond=("C", "H"),
    atoms=None,
    distances_a=None,
    dimenet_checkpoint=None,
    device: str = "cpu",
    other_checkpoints: Optional[Mapping[str, str]] = None,
) -> pd.DataFrame:
    """E(r) of a bond of a real molecule compressed and stretched: atom j moves along the bond
    i -> j so that d_ij = r (distances_a, Angstrom; default 0.3 to 3 A), all other atoms fixed.

    Columns (energy unit of the model, relative to the molecule as built, r = r0): distance_a,
    "DimezblNet" (the trained model with its ZBL), "learned part" (the same network, ZBL removed:
    model.zbl = None), "ZBL" (the ZBL term alone, Eq. 8-10, as the model switches it) and, with
    dimenet_checkpoint, "DimeNet", and a column per other_checkpoints entry (label -> checkpoint of the
    same target, e.g. other ZBL recipes). DimezblNet = learned part + ZBL. atoms: an ase.Atoms
    (default: MD17's starting geometry for MD17 models, ase's ethanol for QM9 models).
    `attrs` hold unit, bond, r0_a, molecule and checkpoints.
    """
    from ase.build import molecule as ase_molecule
    from torch_geometric.data import Data

    model, config = load_trained_model(checkpoint, device)
    _energy_model(config)
    if model.zbl is None:
        raise ValueError(
            f"{checkpoint} is a DimeNet checkpoint (no ZBL): give a DimezblNet one, and the "
            "DimeNet one as dimenet_checkpoint"
        )
    if atoms is None:
        atoms = md17_start_geometry(config.target)[0] if config.dataset == "md17" else ase_molecule("CH3CH2OH")
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
        curves["ZBL"] = molecule_zbl_energies(samples, model.zbl)  # includes the ZBL weight
        if dimenet_checkpoint is not None:
            dimenet, dimenet_config = load_trained_model(dimenet_checkpoint, device)
            if (dimenet_config.dataset, dimenet_config.target) != (config.dataset, config.target):
                raise ValueError(
                    f"the DimeNet checkpoint is for {dimenet_config.dataset}/{dimenet_config.target}, "
                    f"the DimezblNet one for {config.dataset}/{config.target}: use the same target"
                )
            curves["DimeNet"] = dimenet(z.to(device_), flat, batch.to(device_)).double().cpu()
        for label, other_checkpoint in (other_checkpoints or {}).items():
            other, other_config = load_trained_model(other_checkpoint, device)
            if (other_config.dataset, other_config.target) != (config.dataset, config.target):
                raise ValueError(
                    f"the {label} checkpoint is for {other_config.dataset}/{other_config.target}, "
                    f"the DimezblNet one for {config.dataset}/{config.target}: use the same target"
                )
            curves[label] = other(z.to(device_), flat, batch.to(device_)).double().cpu()
    frame = pd.DataFrame(
        {"distance_a": distances, **{name: (values[:-1] - values[-1]).numpy() for name, values in curves.items()}}
    )
    symbols = atoms.get_chemical_symbols()
    frame.attrs.update(
        unit=reporting_unit(config)["energy"] if config.dataset == "md17" else "eV",
        bond=f"{symbols[i]}-{symbols[j]} (atoms {i}-{j}, atom {j} moves)",
        r0_a=r0,
        molecule=atoms.get_chemical_formula(),
        target=f"{config.dataset}/{config.target}",
        checkpoint=str(checkpoint),
        dimenet_checkpoint=str(dimenet_checkpoint),
    )
    return frame


def checkpoint_compression_curves(checkpoints: pd.DataFrame, bonds, device: str = "cpu") -> list:
    """`compression_curve` of each bond for the DimezblNet of a checkpoints table of one molecule
    (`shortrange.shortrange_checkpoints`, `shipped.shipped_checkpoints`), with DimeNet and every other model of
    the table beside it."""
    paths = dict(zip(checkpoints["model"], checkpoints["checkpoint"]))
    if "dimezblnet" not in paths:
        raise ValueError(f"the checkpoints table has no dimezblnet model (it has {sorted(paths)})")
    others = {MODEL_LABELS.get(m, m): p for m, p in paths.items() if m not in ("dimenet", "dimezblnet")}
    return [
        compression_curve(
            paths["dimezblnet"],
            tuple(bond),
            dimenet_checkpoint=paths.get("dimenet"),
            device=device,
            other_checkpoints=others,
        )
        for bond in bonds
    ]


# --- bond compression against GFN2-xTB ---


def element_pair_bonds(atoms) -> list:
    """One bond (i, j) per element pair of `bond_graph(atoms)` (C-H, C-C, C-O, O-H, N-H, C-N, ...):
    the lowest-index bond of each pair; j, the atom that moves in a compression curve, is the H
    where there is one, else the higher index. Sorted by the pair's symbols."""
    symbols = atoms.get_chemical_symbols()
    chosen = {}
    for i, j in sorted(bond_graph(atoms)):
        if symbols[i] == "H" and symbols[j] != "H":
            i, j = j, i
        pair = tuple(sorted((symbols[i], symbols[j])))
        chosen.setdefault(pair, (i, j))
    return [chosen[pair] for pair in sorted(chosen)]


def xtb_bond_scan(atoms, bond, distances_a, unit: str = "kcal/mol", num_threads: int = 1) -> np.ndarray:
    """GFN2-xTB energies E(r) - E(r0) in `unit` of `atoms` with atom j of bond (i, j) moved
    along the bond to d_ij = r (distances_a, Angstrom), as `compression_curve` moves it; r0 is
    the bond length in `atoms`. NaN (logged) where tblite does not converge."""
    i, j = _bond_atoms(atoms, bond)
    base = atoms.get_positions()
    r0 = float(np.linalg.norm(base[j] - base[i]))
    unit_vector = (base[j] - base[i]) / r0
    probe = atoms.copy()
    probe.calc = xtb_calculator(num_threads)
    per_ev = 1.0 / energy_unit_in_ev(unit)
    energies = []
    for r in np.append(np.asarray(distances_a, dtype=np.float64), r0):  # the last one is the reference
        positions = base.copy()
        positions[j] = base[i] + r * unit_vector
        probe.set_positions(positions)
        try:
            energies.append(probe.get_potential_energy() * per_ev)
        except Exception as error:  # tblite's SCF at extreme compression
            LOG.warning("GFN2-xTB failed at r = %.3f A for bond %d-%d: %s", r, i, j, error)
            energies.append(math.nan)
    energies = np.asarray(energies)
    return energies[:-1] - energies[-1]


def compression_curve_with_reference(
    checkpoint, bond, atoms=None, distances_a=None, dimenet_checkpoint=None, device: str = "cpu", other_checkpoints=None
) -> pd.DataFrame:
    """`compression_curve` with a "GFN2-xTB" column: the reference method on the same
    geometries (`xtb_bond_scan`), relative to r0, in the model's unit (kcal/mol for MD17)."""
    curve = compression_curve(checkpoint, bond, atoms, distances_a, dimenet_checkpoint, device, other_checkpoints)
    if atoms is None:
        config = TrainConfig.from_dict(load_checkpoint(checkpoint)["config"])
        atoms = md17_start_geometry(config.target)[0] if config.dataset == "md17" else None
        if atoms is None:
            raise ValueError("give `atoms` for a QM9 model's compression curve with the GFN2-xTB reference")
    curve["GFN2-xTB"] = xtb_bond_scan(atoms, bond, curve["distance_a"].to_numpy(), curve.attrs["unit"])
    return curve


def _first_at_or_below(curve: pd.DataFrame, column: str, distance_a: float) -> float:
    rows = curve[curve["distance_a"] <= distance_a + 1e-9]
    return float(rows[column].iloc[-1]) if len(rows) else math.nan


def summarize_compression(curves: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One row per curve: molecule, bond, r0_a, E(r) - E(r0) at r = 0.5 A and r = 0.8 A (the grid
    point at or below) for GFN2-xTB, DimeNet, DimezblNet, and each model's "hole": the minimum of
    E(r) - E(r0) over r < r0 (negative: the model puts a compressed bond below equilibrium,
    which the reference never does), in the curves' unit."""
    rows = []
    for curve in curves:
        models = ["GFN2-xTB"] + [c for c in curve.columns if c not in ("distance_a", "learned part", "ZBL", "GFN2-xTB")]
        unit = curve.attrs["unit"]
        row = {
            "molecule": curve.attrs.get("molecule_name", curve.attrs["molecule"]),
            "bond": curve.attrs["bond"].split(" (")[0],
            "atoms": curve.attrs["bond"].split("(atoms ")[-1][:-1],
            "r0_a": round(curve.attrs["r0_a"], 3),
            "unit": unit,
        }
        compressed = curve[curve["distance_a"] < curve.attrs["r0_a"]]
        for r in (0.5, 0.8):
            for model in models:
                if model in curve:
                    row[f"{model} E({r} A)"] = _first_at_or_below(curve, model, r)
        for model in models:
            if model in curve:
                row[f"{model} hole"] = float(compressed[model].min()) if len(compressed) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)
