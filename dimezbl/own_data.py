"""Your own data: molecules from an extended-XYZ file or an ASE database, with energies (and forces) in a stated unit.

`load_structures(path, energy_unit, energy_key, forces_key)` reads every frame (ase.io.read for .xyz/.extxyz,
ase.db for .db/.json databases), checks it and stores it as a `StructureDataset` (ragged like QM9, with MD17's
item layout: z, pos in Angstrom, energy, forces). Energies are converted to the training unit of their family
(eV, or kcal/mol for kcal/mol and kJ/mol data), forces to training unit per Angstrom. Frames may hold different
molecules. Errors name the file, the frame and the fix: a missing key (with the keys the frame has), non-finite
values, forces in some frames but not in others, an unknown unit, periodic cells, unsupported elements.

Splits: `split_fractions` (train, valid, test; default 0.8, 0.1, 0.1, shuffled with `split_seed`) or a JSON
`split_file` {"train": [...], "valid": [...], "test": [...]} of frame indices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch_geometric.data import Data

from dimezbl_core import HARTREE_TO_EV, MAX_ATOMIC_NUMBER

from .data import IndexedDataset

# energy unit of a file -> (training unit, factor to it); positions are Angstrom, forces energy unit / Angstrom
ENERGY_UNITS = {
    "eV": ("eV", 1.0),
    "meV": ("eV", 1e-3),
    "Hartree": ("eV", HARTREE_TO_EV),
    "kcal/mol": ("kcal/mol", 1.0),
    "kJ/mol": ("kcal/mol", 1.0 / 4.184),
}
DEFAULT_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DB_SUFFIXES = (".db", ".json")  # ASE databases (SQLite, JSON)


def training_unit(energy_unit: str) -> str:
    if energy_unit not in ENERGY_UNITS:
        raise ValueError(
            f"unknown energy unit {energy_unit!r}: use one of {list(ENERGY_UNITS)} (positions in Angstrom)"
        )
    return ENERGY_UNITS[energy_unit][0]


class StructureDataset(IndexedDataset):
    """Frames of a file (possibly different molecules); items are ``Data(z int64 [N], pos float32 [N, 3] Angstrom,
    energy float64 [1], forces float32 [N, 3] (when the file has forces), idx int64 [1])`` in the training unit."""

    def __init__(self, tensors: dict, name: str, unit: str):
        self.name, self.unit = name, unit
        self._z, self._pos, self._ptr = tensors["z"], tensors["pos"], tensors["ptr"]
        self._energy, self._forces = tensors["energy"], tensors.get("forces")
        super().__init__(torch.arange(self._energy.shape[0]))

    @property
    def has_forces(self) -> bool:
        return self._forces is not None

    def _item(self, row: int) -> Data:
        start, end = int(self._ptr[row]), int(self._ptr[row + 1])
        item = Data(
            z=self._z[start:end].clone(),
            pos=self._pos[start:end].clone(),
            energy=self._energy[row : row + 1].clone(),
            idx=torch.tensor([row]),
        )
        if self._forces is not None:
            item.forces = self._forces[start:end].clone()
        return item

    def _content(self) -> dict:
        content = {"z": self._z, "pos": self._pos, "ptr": self._ptr, "energy": self._energy}
        if self._forces is not None:
            content["forces"] = self._forces
        return content

    def __repr__(self) -> str:
        return f"StructureDataset({self.name}, {len(self)} frames, {self.unit})"


def _read_frames(path: Path) -> list:
    if not path.exists():
        raise FileNotFoundError(f"data file {path} does not exist: give an extended-XYZ file or an ASE database")
    try:
        if path.suffix.lower() in DB_SUFFIXES:
            import ase.db

            with ase.db.connect(str(path)) as database:
                rows = list(database.select())
            frames = []
            for row in rows:
                atoms = row.toatoms(add_additional_information=True)
                atoms.info.update(row.key_value_pairs)
                atoms.info.update(row.data or {})
                frames.append(atoms)
            return frames
        import ase.io

        return ase.io.read(str(path), index=":")
    except Exception as error:  # noqa: BLE001 - any reader error, reported with the file
        raise ValueError(
            f"could not read {path} ({type(error).__name__}: {error}): is it extended XYZ or an ASE db?"
        ) from error


def _energy_of(atoms, key: str, path: Path, frame: int) -> float:
    if key in atoms.info:
        value = atoms.info[key]
    elif atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        value = atoms.calc.results[key]
    else:
        results = sorted(getattr(atoms.calc, "results", {}) or {})
        raise KeyError(
            f"frame {frame} of {path} has no energy {key!r} (its info keys: {sorted(atoms.info)}, calculator "
            f"results: {results}); name the key with energy_key (--set energy_key=...)"
        )
    try:
        return float(np.asarray(value, dtype=np.float64).reshape(()))
    except (TypeError, ValueError) as error:
        raise ValueError(f"frame {frame} of {path}: energy {key!r} is not a number ({value!r})") from error


def _forces_of(atoms, key: str):
    if key in atoms.arrays:
        return np.asarray(atoms.arrays[key], dtype=np.float64)
    if atoms.calc is not None and key in getattr(atoms.calc, "results", {}):
        return np.asarray(atoms.calc.results[key], dtype=np.float64)
    if key in atoms.info and np.ndim(atoms.info[key]) == 2:  # an ASE database row's data
        return np.asarray(atoms.info[key], dtype=np.float64)
    return None


def load_structures(
    path,
    energy_unit: Optional[str],
    energy_key: Optional[str] = None,
    forces_key: Optional[str] = None,
) -> StructureDataset:
    """Every frame of `path` (extended XYZ, or an ASE database .db/.json) as a `StructureDataset` in the training
    unit of `energy_unit`. energy_key: default "energy"; forces_key: default "forces", optional (without forces in
    any frame the data are energies only); a named forces_key must be in every frame."""
    path = Path(path)
    if energy_unit is None:
        raise ValueError(f"state the energy unit of {path}: energy_unit, one of {list(ENERGY_UNITS)}")
    unit = training_unit(energy_unit)
    factor = ENERGY_UNITS[energy_unit][1]
    energy_key = energy_key or "energy"
    frames = _read_frames(path)
    if not frames:
        raise ValueError(f"{path} holds no frames")
    zs, positions, energies, forces, with_forces = [], [], [], [], []
    for k, atoms in enumerate(frames):
        if atoms.pbc.any():
            raise ValueError(
                f"frame {k} of {path} is periodic (pbc={atoms.pbc.tolist()}): DimezblNet is for isolated molecules; "
                "set pbc to False in the file for molecules in vacuum"
            )
        z = atoms.get_atomic_numbers()
        if len(z) == 0:
            raise ValueError(f"frame {k} of {path} has no atoms")
        bad = z[(z < 1) | (z > MAX_ATOMIC_NUMBER)]
        if bad.size:
            raise ValueError(
                f"frame {k} of {path} holds atomic number {int(bad[0])}: supported are 1..{MAX_ATOMIC_NUMBER}"
            )
        pos = atoms.get_positions()
        if not np.isfinite(pos).all():
            raise ValueError(f"frame {k} of {path}: positions are not finite (NaN or inf)")
        energy = _energy_of(atoms, energy_key, path, k)
        if not np.isfinite(energy):
            raise ValueError(f"frame {k} of {path}: energy {energy_key!r} is {energy} (not finite)")
        frame_forces = _forces_of(atoms, forces_key or "forces")
        if frame_forces is None and forces_key is not None:
            raise KeyError(
                f"frame {k} of {path} has no forces {forces_key!r} (its per-atom arrays: {sorted(atoms.arrays)}); "
                "name the key with forces_key, or leave it unset for energies only"
            )
        if frame_forces is not None:
            if frame_forces.shape != pos.shape:
                raise ValueError(f"frame {k} of {path}: forces have shape {frame_forces.shape}, positions {pos.shape}")
            if not np.isfinite(frame_forces).all():
                raise ValueError(f"frame {k} of {path}: forces {forces_key or 'forces'!r} are not finite (NaN or inf)")
        zs.append(z)
        positions.append(pos)
        energies.append(energy * factor)
        forces.append(frame_forces)
        with_forces.append(frame_forces is not None)
    if any(with_forces) and not all(with_forces):
        missing = [k for k, has in enumerate(with_forces) if not has]
        raise ValueError(
            f"{path}: {len(missing)} of {len(frames)} frames have no forces (first: frame {missing[0]}) while the "
            "others have them; give forces for every frame, or drop them all to train on energies only"
        )
    counts = np.array([len(z) for z in zs])
    tensors = {
        "z": torch.as_tensor(np.concatenate(zs), dtype=torch.long),
        "pos": torch.as_tensor(np.concatenate(positions), dtype=torch.float32),
        "ptr": torch.as_tensor(np.concatenate([[0], np.cumsum(counts)]), dtype=torch.long),
        "energy": torch.as_tensor(np.array(energies), dtype=torch.float64),
    }
    if all(with_forces):
        tensors["forces"] = torch.as_tensor(np.concatenate(forces) * factor, dtype=torch.float32)
    return StructureDataset(tensors, path.stem, unit)


def structure_split(
    n: int, fractions: Optional[Sequence[float]] = None, split_file=None, seed: int = 42
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, valid, test) frame indices: from `split_file` (JSON with the three lists), else a shuffle of
    0..n-1 (seeded) cut by `fractions` (train, valid, test; each > 0 but test may be 0, summing to at most 1)."""
    if split_file is not None:
        path = Path(split_file)
        if not path.exists():
            raise FileNotFoundError(f"split file {path} does not exist")
        try:
            stored = json.loads(path.read_text())
            parts = [np.asarray(stored[key], dtype=np.int64) for key in ("train", "valid", "test")]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(
                f'split file {path} must be JSON {{"train": [...], "valid": [...], "test": [...]}} '
                f"of frame indices ({error})"
            ) from error
        everything = np.concatenate(parts)
        if everything.size and (everything.min() < 0 or everything.max() >= n):
            raise ValueError(f"split file {path} names frames outside 0..{n - 1}")
        if len(np.unique(everything)) != everything.size:
            raise ValueError(f"split file {path} names a frame in more than one subset (or twice)")
        if not parts[0].size or not parts[1].size:
            raise ValueError(f"split file {path} needs at least one training and one validation frame")
        return tuple(parts)
    fractions = tuple(DEFAULT_SPLIT_FRACTIONS if fractions is None else fractions)
    if len(fractions) != 3 or any(f < 0 for f in fractions) or sum(fractions) > 1 + 1e-9 or min(fractions[:2]) <= 0:
        raise ValueError(
            f"split_fractions {list(fractions)} must be three fractions (train, valid, test), train and valid > 0, "
            "summing to at most 1"
        )
    order = np.random.default_rng(seed).permutation(n)
    n_train, n_valid = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    n_test = min(int(round(fractions[2] * n)), n - n_train - n_valid)
    if n_train < 1 or n_valid < 1:
        raise ValueError(
            f"{n} frames are too few for split_fractions {list(fractions)}: no training or validation frame"
        )
    return order[:n_train], order[n_train : n_train + n_valid], order[n_train + n_valid : n_train + n_valid + n_test]
