"""Data: QM9 (qm9pack, cached) and MD17 (npz readers, PyG download), their datasets and DimeNet's splits.

QM9 is stored in training units (D, bohr^3, eV, bohr^2, cal/(mol K)), MD17 in kcal/mol and kcal/mol/Angstrom;
positions always in Angstrom.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import logging
import socket
import time
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch_geometric.data import Data

from dimezbl_core import HARTREE_TO_EV

from .files import atomic_write_bytes, atomic_write_json, data_dir_path, portable_path, sha256_hex

# QM9 is stored in training units (D, bohr^3, eV, bohr^2, cal/(mol K)), MD17 in kcal/mol and
# kcal/mol/Angstrom; positions always in Angstrom.

LOG = logging.getLogger("dimezbl.data")


# --- Units and constants -------------------------------------------------------------------------

EV_TO_MEV = 1000.0

QM9_TARGETS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "cv")

# Training units: DESIGN.md section 2 (models train in eV; U0, U, H, G are atomization energies).
QM9_TRAINING_UNITS = {
    "mu": "D",
    "alpha": "bohr^3",
    "homo": "eV",
    "lumo": "eV",
    "gap": "eV",
    "r2": "bohr^2",
    "zpve": "eV",
    "U0": "eV",
    "U": "eV",
    "H": "eV",
    "G": "eV",
    "cv": "cal/(mol K)",
}
# Reporting units: Table 1 of the paper (energy-like MAEs in meV).
QM9_REPORTING_UNITS = {target: ("meV" if unit == "eV" else unit) for target, unit in QM9_TRAINING_UNITS.items()}
_QM9_TRAINING_TO_REPORTING = {
    target: (EV_TO_MEV if unit == "eV" else 1.0) for target, unit in QM9_TRAINING_UNITS.items()
}


def qm9_to_reporting_units(values, target: str):
    """Convert ``values`` of QM9 ``target`` from training units to Table 1's reporting units.

    eV -> meV for homo, lumo, gap, zpve, U0, U, H, G; mu (D), alpha (bohr^3), r2 (bohr^2) and
    cv (cal/(mol K)) are unchanged. Works on floats, numpy arrays and torch tensors.
    """
    if target not in _QM9_TRAINING_TO_REPORTING:
        raise ValueError(f"unknown QM9 target {target!r}: choose one of {', '.join(QM9_TARGETS)}")
    return values * _QM9_TRAINING_TO_REPORTING[target]


# QM9 atomic reference energies, in Hartree, per property: the "atomref" table of the QM9 record
# (Ramakrishnan, Dral, Rupp, von Lilienfeld, Sci. Data 1, 140022 (2014), file atomref.txt;
# B3LYP/6-31G(2df,p) energies of the free atoms). Columns: U0 (0 K), U (298.15 K), H (298.15 K),
# G (298.15 K). PyG's torch_geometric.datasets.qm9.atomrefs holds the same numbers times 27.211386246.
QM9_ATOMREF_HARTREE = {
    #     U0           U            H            G
    1: (-0.500273, -0.498857, -0.497912, -0.510927),  # H
    6: (-37.846772, -37.845355, -37.844411, -37.861317),  # C
    7: (-54.583861, -54.582445, -54.581501, -54.598897),  # N
    8: (-75.064579, -75.063163, -75.062219, -75.079532),  # O
    9: (-99.718730, -99.717314, -99.716370, -99.733544),  # F
}
_QM9_ATOMIZATION_TARGETS = ("U0", "U", "H", "G")  # the column order of QM9_ATOMREF_HARTREE

# qm9pack column holding each target, and the factor from that column's unit to the training unit.
# ("Enthalphy" is qm9pack's spelling.)
QM9_CSV_COLUMNS = {
    "mu": ("Dipole_debye", 1.0),  # D
    "alpha": ("Polarizability_bohr3", 1.0),  # bohr^3
    "homo": ("HOMO_au", HARTREE_TO_EV),  # Hartree -> eV
    "lumo": ("LUMO_au", HARTREE_TO_EV),  # Hartree -> eV
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_EV),  # Hartree -> eV
    "r2": ("R2_bohr2", 1.0),  # bohr^2
    "zpve": ("ZPVE_au", HARTREE_TO_EV),  # Hartree -> eV
    "U0": ("InternalEnergy_0K_au", HARTREE_TO_EV),  # Hartree -> eV (after atomref subtraction)
    "U": ("InternalEnergy_298K_au", HARTREE_TO_EV),
    "H": ("Enthalphy_298K_au", HARTREE_TO_EV),
    "G": ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),  # cal/(mol K)
}

QM9_NUM_MOLECULES = 130_831  # QM9 without the 3,054 molecules that failed the consistency check
QM9_CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
QM9_POLARIZABILITY_FILE = "qm9_polarizability.csv"
QM9_CACHE_FORMAT_VERSION = 1
QM9_CACHE_FILE = f"qm9_v{QM9_CACHE_FORMAT_VERSION}.pt"
QM9_SPLIT_SIZES = (110_000, 10_000)  # train, validation; the rest (10,831) is test (DimeNet)

_SETUP_HINT = "run `make setup` (or `pip install qm9pack==1.0.3` in the project's venv)"


# --- QM9 source and parsing ----------------------------------------------------------------------


def qm9_source_files() -> dict[str, Path]:
    """Paths of qm9pack's CSV files, found without importing qm9pack (it needs pkg_resources)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the QM9 source package qm9pack is not installed: {_SETUP_HINT}")
    data_folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: data_folder / name for name in (*QM9_CSV_FILES, QM9_POLARIZABILITY_FILE)}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"qm9pack is installed but its data files are missing: {', '.join(missing)}; reinstall it: {_SETUP_HINT}"
        )
    return files


def _qm9_source_fingerprint(files: dict[str, Path]) -> dict[str, int]:
    """File name -> size in bytes; a changed qm9pack makes the cache stale."""
    return {name: path.stat().st_size for name, path in sorted(files.items())}


# Atomic number of each element symbol byte; QM9 holds only H, C, N, O, F.
_ELEMENT_BYTE_TO_Z = np.zeros(256, dtype=np.uint8)
for _symbol, _z in (("H", 1), ("C", 6), ("N", 7), ("O", 8), ("F", 9)):
    _ELEMENT_BYTE_TO_Z[ord(_symbol)] = _z


def parse_qm9_csv(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """Parse qm9pack's CSVs in bulk.

    Returns numpy arrays: ``z`` uint8 [A], ``pos`` float32 [A, 3] in Angstrom, ``ptr`` int64 [M + 1]
    (molecule i owns atoms ptr[i]:ptr[i+1]), ``y`` float32 [M, 12] in training units (QM9_TARGETS
    order), ``gdb_id`` int64 [M] (the QM9 index, 1..133885).
    """
    value_columns = [column for column, _ in QM9_CSV_COLUMNS.values()]
    usecols = ["XYZ_file", "Index", "N_atoms", "Elements", "XYZ_Ang", *value_columns]
    frame = pd.concat([pd.read_csv(files[name], usecols=usecols) for name in QM9_CSV_FILES], ignore_index=True)
    n_molecules = len(frame)
    if n_molecules != QM9_NUM_MOLECULES:
        raise ValueError(
            f"qm9pack holds {n_molecules} molecules, expected {QM9_NUM_MOLECULES}: "
            f"the DimeNet split needs the full set; {_SETUP_HINT}"
        )
    gdb_id = frame["Index"].to_numpy(np.int64, copy=True)  # writable (pandas copy-on-write)
    if not np.all(np.diff(gdb_id) > 0):
        raise ValueError("qm9pack rows are not sorted by QM9 index: the split would not match DimeNet's")

    n_atoms = frame["N_atoms"].to_numpy(np.int64)
    ptr = np.zeros(n_molecules + 1, dtype=np.int64)
    np.cumsum(n_atoms, out=ptr[1:])
    total_atoms = int(ptr[-1])

    # Elements: "['C','H','H']" -> one byte per atom after deleting brackets, quotes and commas.
    element_bytes = "".join(frame["Elements"].tolist()).encode("ascii").translate(None, b"[]', ")
    z = _ELEMENT_BYTE_TO_Z[np.frombuffer(element_bytes, dtype=np.uint8)]
    if z.size != total_atoms or not z.all():
        raise ValueError(
            f"qm9pack Elements column parsed to {z.size} atoms ({int((z == 0).sum())} unknown symbols), "
            f"N_atoms sums to {total_atoms}: the CSV is damaged; {_SETUP_HINT}"
        )

    # Coordinates: "[[x,y,z],[x,y,z]]" -> one comma-separated list of floats for the whole data set.
    coordinate_text = ",".join(frame["XYZ_Ang"].tolist()).translate(str.maketrans("", "", "[]"))
    pos = np.fromstring(coordinate_text, dtype=np.float64, sep=",")
    if pos.size != 3 * total_atoms or not np.isfinite(pos).all():
        raise ValueError(
            f"qm9pack XYZ_Ang column parsed to {pos.size} numbers, expected 3 * {total_atoms}: "
            f"the CSV is damaged; {_SETUP_HINT}"
        )
    pos = pos.reshape(total_atoms, 3)

    # Targets, in float64 until the atomization energies are formed (|U0| reaches hundreds of Hartree).
    raw = np.stack([frame[column].to_numpy(np.float64) for column, _ in QM9_CSV_COLUMNS.values()], axis=1)
    atomref_table = np.zeros((256, len(_QM9_ATOMIZATION_TARGETS)))
    for atomic_number, refs in QM9_ATOMREF_HARTREE.items():
        atomref_table[atomic_number] = refs
    atomref_per_molecule = np.add.reduceat(atomref_table[z], ptr[:-1], axis=0)  # [M, 4] Hartree
    for column, target in enumerate(_QM9_ATOMIZATION_TARGETS):
        raw[:, QM9_TARGETS.index(target)] -= atomref_per_molecule[:, column]
    factors = np.array([factor for _, factor in QM9_CSV_COLUMNS.values()])
    y = raw * factors

    _check_qm9_polarizability(files[QM9_POLARIZABILITY_FILE], frame)
    return {"z": z, "pos": pos.astype(np.float32), "ptr": ptr, "y": y.astype(np.float32), "gdb_id": gdb_id}


QM9_ALPHA_TOLERANCE_BOHR3 = 0.01  # the CSV rounds alpha to 0.01 bohr^3, the tensor to 0.001


def _check_qm9_polarizability(path: Path, frame: pd.DataFrame) -> None:
    """Check the alpha column against the trace/3 of qm9pack's polarizability tensors (bohr^3)."""
    tensor = pd.read_csv(path, usecols=["XYZ_file", "A_xx", "A_yy", "A_zz"])
    if len(tensor) != len(frame) or not (tensor["XYZ_file"].to_numpy() == frame["XYZ_file"].to_numpy()).all():
        raise ValueError(f"{path} does not list the same molecules as the QM9 CSVs; {_SETUP_HINT}")
    isotropic = tensor[["A_xx", "A_yy", "A_zz"]].to_numpy().mean(axis=1)
    deviation = np.abs(isotropic - frame["Polarizability_bohr3"].to_numpy())
    if deviation.max() > QM9_ALPHA_TOLERANCE_BOHR3:
        worst = int(deviation.argmax())
        raise ValueError(
            f"QM9 alpha of {frame['XYZ_file'].iloc[worst]} differs from its polarizability tensor "
            f"by {deviation[worst]:.4f} bohr^3: the CSV is damaged; {_SETUP_HINT}"
        )


# --- QM9 cache -----------------------------------------------------------------------------------


def _qm9_cache_paths(data_dir) -> tuple[Path, Path]:
    cache = data_dir_path(data_dir) / QM9_CACHE_FILE
    return cache, cache.with_suffix(".json")


def _write_qm9_cache(arrays: dict[str, np.ndarray], data_dir, fingerprint: dict[str, int]) -> None:
    """torch.save the arrays into one file (atomically), then its sidecar (version, size, sha256)."""
    cache_path, sidecar_path = _qm9_cache_paths(data_dir)
    buffer = io.BytesIO()
    torch.save({key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}, buffer)
    payload = buffer.getvalue()
    atomic_write_bytes(cache_path, payload)
    atomic_write_json(
        sidecar_path,
        {
            "format_version": QM9_CACHE_FORMAT_VERSION,
            "sha256": sha256_hex(payload),
            "size_bytes": len(payload),
            "source_sizes_bytes": fingerprint,
            "num_molecules": int(arrays["ptr"].size - 1),
        },
    )


def _read_qm9_cache(data_dir, fingerprint: dict[str, int] | None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The cached tensors, or (None, why the cache cannot be used). ``fingerprint`` None (qm9pack
    absent): the cache's own checks (version, size, sha256, shapes) only, not staleness."""
    cache_path, sidecar_path = _qm9_cache_paths(data_dir)
    if not cache_path.exists():
        return None, f"no cache at {cache_path}"
    try:
        sidecar = json.loads(sidecar_path.read_text())
        expected_sha, expected_size = sidecar["sha256"], sidecar["size_bytes"]
        version, sources = sidecar["format_version"], sidecar["source_sizes_bytes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"its sidecar {sidecar_path} is missing or unreadable ({error})"
    if version != QM9_CACHE_FORMAT_VERSION:
        return None, f"it has format version {version}, this code writes {QM9_CACHE_FORMAT_VERSION}"
    if fingerprint is not None and sources != fingerprint:
        return None, f"the qm9pack CSV sizes changed ({sources} -> {fingerprint})"
    payload = cache_path.read_bytes()
    if len(payload) != expected_size:
        return None, f"it is {len(payload)} bytes, {expected_size} were written (truncated?)"
    if sha256_hex(payload) != expected_sha:
        return None, "its sha256 does not match the one recorded when it was written (corrupt)"
    try:
        tensors = torch.load(io.BytesIO(payload), weights_only=True)
        ptr = tensors["ptr"]
        consistent = (
            ptr.numel() == QM9_NUM_MOLECULES + 1
            and int(ptr[-1]) == tensors["z"].shape[0] == tensors["pos"].shape[0]
            and tensors["y"].shape == (QM9_NUM_MOLECULES, len(QM9_TARGETS))
        )
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, with the reason
        return None, f"torch.load failed ({type(error).__name__}: {str(error)[:200]})"
    if not consistent:
        return None, "its tensors have inconsistent shapes"
    return tensors, ""


# --- QM9 dataset and splits ----------------------------------------------------------------------


class IndexedDataset(torch.utils.data.Dataset):
    """Rows of data held in a few big tensors. ``dataset[i]`` builds one PyG ``Data``; an index array,
    boolean mask, list, tensor or slice gives a view dataset of those rows (no copy of the tensors)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.dim() == 0):
            position = int(index)
            if not -len(self) <= position < len(self):
                raise IndexError(f"index {position} is out of range for {self!r}")
            return self._item(int(self.rows[position]))
        if isinstance(index, slice):
            return self._view(self.rows[index])
        positions = torch.as_tensor(np.asarray(index))
        if positions.dtype == torch.bool:
            if positions.shape != self.rows.shape:
                raise IndexError(f"boolean mask of shape {tuple(positions.shape)} for {self!r}")
            return self._view(self.rows[positions])
        positions = positions.long()
        if positions.numel() and not (-len(self) <= int(positions.min()) and int(positions.max()) < len(self)):
            raise IndexError(f"index array reaches outside 0..{len(self) - 1} of {self!r}")
        return self._view(self.rows[positions])

    def _item(self, row: int) -> Data:
        raise NotImplementedError

    def _content(self) -> dict[str, torch.Tensor]:
        """The tensors that hold the whole data set (every row, not only this view's)."""
        raise NotImplementedError

    def content_sha256(self) -> str:
        """sha256 of the whole data set's values (names, dtypes, shapes and bytes of its tensors):
        the same data give the same digest whichever file or cache they were read from, so that
        provenance can tell whether a regenerated data set is the one a run was trained on."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self._content().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _view(self, rows: torch.Tensor) -> IndexedDataset:
        view = self.__class__.__new__(self.__class__)
        view.__dict__.update(self.__dict__)
        view.rows = rows
        return view


class QM9Dataset(IndexedDataset):
    """QM9 molecules stored as concatenated tensors (z, pos, ptr, y, gdb_id); items are PyG ``Data``.

    ``dataset[i]`` is ``Data(z int64 [N], pos float32 [N, 3] Angstrom, y float32 [1, 12] training units,
    idx int64 [1] row index in the full set, gdb_id int64 [1] QM9 index)``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._z, self._pos, self._ptr = tensors["z"], tensors["pos"], tensors["ptr"]
        self._y, self._gdb_id = tensors["y"], tensors["gdb_id"]
        super().__init__(torch.arange(self._y.shape[0]))

    def _item(self, row: int) -> Data:
        start, end = int(self._ptr[row]), int(self._ptr[row + 1])
        return Data(
            z=self._z[start:end].long(),
            pos=self._pos[start:end].clone(),
            y=self._y[row : row + 1].clone(),
            idx=torch.tensor([row]),
            gdb_id=self._gdb_id[row : row + 1].clone(),
        )

    def _content(self) -> dict[str, torch.Tensor]:
        return {"z": self._z, "pos": self._pos, "ptr": self._ptr, "y": self._y, "gdb_id": self._gdb_id}

    @property
    def y(self) -> torch.Tensor:
        """All targets of the molecules in this (sub)set, float32 [len, 12] in training units."""
        return self._y[self.rows]

    def __repr__(self) -> str:
        return f"QM9Dataset({len(self)} molecules)"


def load_qm9(data_dir=None) -> QM9Dataset:
    """The whole QM9 set (130,831 molecules) as a dataset of PyG ``Data``, parsed once and cached.

    The cache ``<data_dir>/qm9_v1.pt`` (+ ``.json`` sidecar) is verified on every load (format version,
    qm9pack file sizes, byte size, sha256); a missing, stale, truncated or corrupt cache is rebuilt
    from qm9pack's CSVs with a logged warning.
    """
    try:
        files = qm9_source_files()
    except ModuleNotFoundError as error:
        # A machine without qm9pack (a GPU node, say) can use a cache built elsewhere: copy
        # <data_dir>/qm9_v1.pt and its .json; it is verified as usual, only its staleness cannot be.
        tensors, reason = _read_qm9_cache(data_dir, None)
        if tensors is None:
            cache_path, _ = _qm9_cache_paths(data_dir)
            raise ModuleNotFoundError(
                f"{error}; or copy a QM9 cache built where qm9pack is installed to {cache_path} "
                f"(with its .json sidecar): {reason}"
            ) from error
        LOG.warning(
            "qm9pack is not installed: using the verified QM9 cache in %s as it is "
            "(its sha256 matches; whether qm9pack changed since cannot be checked here)",
            data_dir_path(data_dir),
        )
        return QM9Dataset(tensors)
    fingerprint = _qm9_source_fingerprint(files)
    tensors, reason = _read_qm9_cache(data_dir, fingerprint)
    if tensors is None:
        cache_path, _ = _qm9_cache_paths(data_dir)
        if cache_path.exists():
            LOG.warning("QM9 cache %s is not used and will be rebuilt: %s", cache_path, reason)
        else:
            LOG.info("building the QM9 cache: %s", reason)
        start = time.perf_counter()
        arrays = parse_qm9_csv(files)
        _write_qm9_cache(arrays, data_dir, fingerprint)
        LOG.info("QM9 parsed and cached at %s in %.1f s", cache_path, time.perf_counter() - start)
        tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    return QM9Dataset(tensors)


def qm9_split(n: int = QM9_NUM_MOLECULES, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DimeNet's QM9 split: ``RandomState(seed).permutation(n)``, 110,000 train, 10,000 valid, rest test."""
    n_train, n_valid = QM9_SPLIT_SIZES
    if n <= n_train + n_valid:
        raise ValueError(f"qm9_split needs n > {n_train + n_valid} (got n={n}); use n={QM9_NUM_MOLECULES}")
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[:n_train], permutation[n_train : n_train + n_valid], permutation[n_train + n_valid :]


def subset_split(split, n_train: int | None, n_valid: int | None, n_test: int | None):
    """Prefixes of a (train, valid, test) split, for small profiles; ``None`` keeps a whole set.

    Prefixes keep every subset inside its parent set, so small-profile test molecules are true test
    molecules.
    """
    subsets = []
    for name, indices, size in zip(("train", "valid", "test"), split, (n_train, n_valid, n_test)):
        if size is not None and not 0 < size <= len(indices):
            raise ValueError(f"n_{name}={size} must be between 1 and the {name} set's size {len(indices)}")
        subsets.append(np.asarray(indices)[:size])
    return tuple(subsets)


# --- MD17 readers --------------------------------------------------------------------------------

MD17_MOLECULES = (
    "aspirin",
    "benzene",
    "ethanol",
    "malonaldehyde",
    "naphthalene",
    "salicylic_acid",
    "toluene",
    "uracil",
)
MD17_FORMULAS = {  # Hill formulas, to check that a file holds the molecule it is named for
    "aspirin": "C9H8O4",
    "benzene": "C6H6",
    "ethanol": "C2H6O",
    "malonaldehyde": "C3H4O2",
    "naphthalene": "C10H8",
    "salicylic_acid": "C7H6O3",
    "toluene": "C7H8",
    "uracil": "C4H4N2O2",
}
MD17_PYG_NAMES = {name: name.replace("_", " ") for name in MD17_MOLECULES}  # torch_geometric's keys
MD17_SGDML_KEYS = ("E", "F", "R", "z")
MD17_RMD17_KEYS = ("energies", "forces", "coords", "nuclear_charges")
MD17_SOURCES = ("generated", "npz", "pyg")


def md17_download_help(molecule: str | None = None) -> str:
    """Where the published MD17 files are (URLs from torch_geometric.datasets.MD17's tables)."""
    from torch_geometric.datasets import MD17

    if molecule is None:
        sgdml, revised = f"{MD17.gdml_url}/md17_<molecule>.npz", "rmd17_<molecule>.npz"
    else:
        pyg_name = MD17_PYG_NAMES[md17_molecule_name(molecule)]
        sgdml, revised = f"{MD17.gdml_url}/{MD17.file_names[pyg_name]}", MD17.file_names[f"revised {pyg_name}"]
    return f"MD17 (sGDML layout): {sgdml}; rMD17: {MD17.revised_url} (file rmd17/npz_data/{revised})"


def md17_molecule_name(molecule: str) -> str:
    """Canonical MD17 molecule name (``'Salicylic acid'`` -> ``'salicylic_acid'``), or a clear error."""
    name = str(molecule).strip().lower().replace(" ", "_").replace("-", "_")
    if name not in MD17_MOLECULES:
        raise ValueError(f"unknown MD17 molecule {molecule!r}: choose one of {', '.join(MD17_MOLECULES)}")
    return name


def read_md17_npz(path) -> dict[str, np.ndarray]:
    """Read an MD17 npz in the sGDML layout (E, F, R, z) or the rMD17 layout (energies, forces, coords,
    nuclear_charges).

    Returns ``z`` int64 [N], ``R`` float64 [M, N, 3] Angstrom, ``E`` float64 [M] kcal/mol,
    ``F`` float64 [M, N, 3] kcal/mol/Angstrom, and ``layout`` ('sgdml' or 'rmd17').
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no MD17 npz at {path}; get one from {md17_download_help()}, or generate "
            "GFN2-xTB data offline: dimezbl generate-md17 --molecule <name>"
        )
    unreadable = f"{path} is not a readable npz file"
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{unreadable} ({error}); re-download or regenerate it") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{unreadable} (it holds a single array, not named arrays)")
    with npz:
        keys = set(npz.files)
        if set(MD17_SGDML_KEYS) <= keys:
            layout, layout_keys = "sgdml", MD17_SGDML_KEYS
        elif set(MD17_RMD17_KEYS) <= keys:
            layout, layout_keys = "rmd17", MD17_RMD17_KEYS
        else:
            raise ValueError(
                f"{path} is neither an sGDML MD17 npz (missing keys {sorted(set(MD17_SGDML_KEYS) - keys)}) "
                f"nor an rMD17 npz (missing keys {sorted(set(MD17_RMD17_KEYS) - keys)}); it holds {sorted(keys)}"
            )
        try:
            e, f, r, z = (npz[key] for key in layout_keys)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{unreadable} ({error}); re-download or regenerate it") from None
    e = np.asarray(e, dtype=np.float64)
    if e.ndim == 2 and e.shape[1] == 1:
        e = e[:, 0]
    r, f, z = np.asarray(r, dtype=np.float64), np.asarray(f, dtype=np.float64), np.asarray(z)
    if z.ndim != 1 or z.size == 0 or not np.issubdtype(z.dtype, np.integer) or z.min() < 1:
        raise ValueError(f"{path}: atomic numbers must be positive integers of shape [N], got {z.dtype} {z.shape}")
    n_atoms = z.size
    if r.ndim != 3 or r.shape[1:] != (n_atoms, 3) or r.shape[0] == 0:
        raise ValueError(f"{path}: positions have shape {r.shape}, expected [M, {n_atoms}, 3] for {n_atoms} atoms")
    if f.shape != r.shape:
        raise ValueError(f"{path}: forces have shape {f.shape}, positions {r.shape}; they must match")
    if e.shape != (r.shape[0],):
        raise ValueError(f"{path}: energies have shape {e.shape}, expected [{r.shape[0]}] or [{r.shape[0]}, 1]")
    for key, values in zip(layout_keys[:3], (e, f, r)):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            raise ValueError(
                f"{path}: {key} of configuration {int(np.argmax(bad))} is not finite (NaN or inf; "
                f"{int(bad.sum())} configuration(s) in all): remove them or regenerate the file"
            )
    return {"z": z.astype(np.int64), "R": r, "E": e, "F": f, "layout": layout}


class MD17Dataset(IndexedDataset):
    """Configurations of one molecule; items are ``Data(z int64 [N], pos float32 [N, 3] Angstrom,
    energy float64 [1] kcal/mol, forces float32 [N, 3] kcal/mol/Angstrom, idx int64 [1])``.

    Energies stay float64: absolute energies reach 1e4 to 1e5 kcal/mol, where float32 steps are
    0.001 to 0.01 kcal/mol.
    """

    def __init__(self, arrays: dict[str, np.ndarray], molecule: str):
        self.molecule = molecule
        self._z = torch.as_tensor(arrays["z"], dtype=torch.long)
        self._pos = torch.as_tensor(arrays["R"], dtype=torch.float32)
        self._energy = torch.as_tensor(arrays["E"], dtype=torch.float64)
        self._forces = torch.as_tensor(arrays["F"], dtype=torch.float32)
        super().__init__(torch.arange(self._pos.shape[0]))

    def _item(self, row: int) -> Data:
        return Data(
            z=self._z.clone(),
            pos=self._pos[row].clone(),
            energy=self._energy[row : row + 1].clone(),
            forces=self._forces[row].clone(),
            idx=torch.tensor([row]),
        )

    def _content(self) -> dict[str, torch.Tensor]:
        return {"z": self._z, "R": self._pos, "E": self._energy, "F": self._forces}

    @property
    def energy(self) -> torch.Tensor:
        """Energies of the configurations in this (sub)set, float64 [len] kcal/mol."""
        return self._energy[self.rows]

    def __repr__(self) -> str:
        return f"MD17Dataset({self.molecule}, {len(self)} configurations)"


def md17_default_path(molecule: str, source: str = "generated", data_dir=None) -> Path:
    """Where ``load_md17`` looks: ``<data_dir>/md17/generated/<molecule>.npz`` or ``.../md17/npz/...``."""
    folder = {"generated": "generated", "npz": "npz"}[source]
    return data_dir_path(data_dir) / "md17" / folder / f"{md17_molecule_name(molecule)}.npz"


def _check_md17_formula(arrays: dict[str, np.ndarray], molecule: str, path) -> None:
    from ase import Atoms  # lazily: ase.build/ase.md are not needed to read data

    formula = Atoms(numbers=arrays["z"]).get_chemical_formula(mode="hill")
    if formula != MD17_FORMULAS[molecule]:
        raise ValueError(f"{path} holds {formula}, but {molecule} is {MD17_FORMULAS[molecule]}: wrong file?")


PYG_DOWNLOAD_TIMEOUT_S = 30.0


def _download_md17_pyg(molecule: str, data_dir) -> Path:
    """Download MD17's npz through torch_geometric.datasets.MD17's URL and raw-file layout.

    The file lands where ``MD17(root=<data_dir>/md17/pyg, name=...)`` looks for it
    (``<root>/<pyg name>/raw/<file>``), so PyG finds it too. Our reader then keeps float64 energies
    and skips PyG's per-frame Python processing loop.
    """
    from torch_geometric.data import download_url
    from torch_geometric.datasets import MD17

    pyg_name = MD17_PYG_NAMES[molecule]
    file_name = MD17.file_names[pyg_name]
    raw_path = data_dir_path(data_dir) / "md17" / "pyg" / pyg_name / "raw" / file_name
    if raw_path.is_file():
        return raw_path
    url = f"{MD17.gdml_url}/{file_name}"
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(PYG_DOWNLOAD_TIMEOUT_S)  # fail in seconds where packets are dropped
    try:
        return Path(download_url(url, str(raw_path.parent), log=False))
    except (urllib.error.URLError, OSError) as error:
        if raw_path.exists():  # a download cut off mid-way
            raw_path.unlink()
        raise ConnectionError(
            f"could not download MD17 {molecule!r} for torch_geometric.datasets.MD17 from {url} "
            f"({getattr(error, 'reason', error)}; no network?). Fix: on a machine with internet, download "
            f"that file and put it at {raw_path} (PyG then uses it without downloading); or put any "
            f"sGDML/rMD17 npz at {md17_default_path(molecule, 'npz', data_dir)} and use source='npz'; "
            f"or generate GFN2-xTB data offline: dimezbl generate-md17 --molecule {molecule}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def load_md17(molecule: str, source: str = "generated", data_dir=None, path=None) -> MD17Dataset:
    """One MD17 molecule as a dataset of ``Data(z, pos [Angstrom], energy [kcal/mol], forces [kcal/mol/A])``.

    source: 'generated' (GFN2-xTB data from ``generate_md17``, default ``<data_dir>/md17/generated/``),
    'npz' (an sGDML or rMD17 npz, default ``<data_dir>/md17/npz/<molecule>.npz``), or 'pyg' (downloaded
    via torch_geometric.datasets.MD17, needs internet). ``path`` overrides the file for 'generated'/'npz'.
    """
    molecule = md17_molecule_name(molecule)
    if source not in MD17_SOURCES:
        raise ValueError(f"unknown MD17 source {source!r}: choose one of {', '.join(MD17_SOURCES)}")
    if source == "pyg":
        if path is not None:
            raise ValueError("path is for source='npz' or 'generated'; source='pyg' downloads its own file")
        file_path = _download_md17_pyg(molecule, data_dir)
    else:
        file_path = Path(path) if path is not None else md17_default_path(molecule, source, data_dir)
        if not file_path.is_file():
            how = (
                f"generate it: dimezbl generate-md17 --molecule {molecule} --n-configs 2000"
                if source == "generated"
                else f"put an sGDML or rMD17 npz there; get one from {md17_download_help(molecule)}"
            )
            if source == "generated" and path is None:  # the sets `make reproduce` and run-models wrote, per profile
                found = sorted(file_path.parent.glob(f"*/{molecule}.npz"))
                if found:
                    listed = ", ".join(portable_path(p) for p in found)
                    how = (
                        f"the generated sets are per profile ({listed}): train on the one your runs used with "
                        f"--set md17_path={portable_path(found[0])}, or {how}"
                    )
            raise FileNotFoundError(f"no MD17 {source} data for {molecule} at {file_path}: {how}")
    arrays = read_md17_npz(file_path)
    _check_md17_formula(arrays, molecule, file_path)
    return MD17Dataset(arrays, molecule)


def ev_to_kcal_per_mol() -> float:
    """eV -> kcal/mol from ase.units (CODATA 2014), the units tblite's ASE calculator uses."""
    from ase import units

    return 1.0 / (units.kcal / units.mol)


# --- MD17 splits and command line ----------------------------------------------------------------


def md17_split(n_total: int, n_train: int = 1000, n_valid: int = 1000, seed: int = 42):
    """Seeded (train, valid, test) index arrays: ``n_train`` (DimeNet: 1,000), ``n_valid``, the rest test.

    For small (smoke) data sets pass smaller ``n_train``/``n_valid`` explicitly.
    """
    if n_train < 1 or n_valid < 0 or n_train + n_valid >= n_total:
        raise ValueError(
            f"md17_split: n_train={n_train} + n_valid={n_valid} must leave at least one test "
            f"configuration of n_total={n_total}; pass smaller n_train/n_valid for small data sets"
        )
    permutation = np.random.RandomState(seed).permutation(n_total)
    return permutation[:n_train], permutation[n_train : n_train + n_valid], permutation[n_train + n_valid :]
