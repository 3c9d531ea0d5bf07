"""MD17-style data generated offline: GFN2-xTB (tblite) Langevin MD from built starting geometries.

Resumable (checkpoints every CHECKPOINT_EVERY configurations); the sidecar JSON records method, software and settings.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import importlib.util
import io
import json
import logging
import platform
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .data import LOG, MD17_FORMULAS, MD17_MOLECULES, ev_to_kcal_per_mol, md17_default_path, md17_molecule_name
from .files import atomic_write_bytes, atomic_write_json

# --- MD17 offline generator: starting geometries -------------------------------------------------

MD17_ASE_G2_NAMES = {"benzene": "C6H6", "ethanol": "CH3CH2OH"}  # the two of the 8 in ase's g2 set

# Bond lengths (Angstrom) for the hand-built starting geometries; typical organic values. They only
# need to be close enough for the GFN2-xTB optimisation that follows to keep the bonding.
_AROMATIC_CC_A, _CH_A, _OH_A, _NH_A = 1.39, 1.08, 0.97, 1.01
_TETRAHEDRAL_DEG = 109.47


def _place(a, b, c, bond_a: float, angle_deg: float, dihedral_deg: float) -> np.ndarray:
    """Position of atom d with |cd| = bond_a, angle b-c-d and dihedral a-b-c-d (natural extension)."""
    a, b, c = (np.asarray(p, dtype=float) for p in (a, b, c))
    bc = (c - b) / np.linalg.norm(c - b)
    normal = np.cross(b - a, bc)
    normal /= np.linalg.norm(normal)
    angle, dihedral = np.radians(angle_deg), np.radians(dihedral_deg)
    local = np.array([-np.cos(angle), np.sin(angle) * np.cos(dihedral), np.sin(angle) * np.sin(dihedral)])
    return c + bond_a * (np.column_stack([bc, np.cross(normal, bc), normal]) @ local)


def _hexagon(center, radius_a: float, first_angle_deg: float) -> np.ndarray:
    """Six ring atoms [6, 3] in the z = 0 plane, clockwise from ``first_angle_deg``."""
    angles = np.radians(first_angle_deg - 60.0 * np.arange(6))
    return np.column_stack([center[0] + radius_a * np.cos(angles), center[1] + radius_a * np.sin(angles), np.zeros(6)])


def _radial(ring: np.ndarray, k: int, bond_a: float, center=None) -> np.ndarray:
    """A substituent on ring atom k, pointing away from the ring centre."""
    center = ring.mean(axis=0) if center is None else np.array([center[0], center[1], 0.0])
    direction = ring[k] - center
    return ring[k] + bond_a * direction / np.linalg.norm(direction)


def _methyl_hydrogens(reference, parent, carbon) -> list[np.ndarray]:
    return [_place(reference, parent, carbon, 1.09, _TETRAHEDRAL_DEG, dihedral) for dihedral in (60, 180, 300)]


def _benzoic_ring_with_carboxyl():
    """Ring (atom 0 carries COOH, atom 1 the ortho group) and the carboxyl atoms C, =O, O, H."""
    ring = _hexagon((0.0, 0.0), _AROMATIC_CC_A, 90.0)
    carbon = _radial(ring, 0, 1.48)
    carbonyl_o = _place(ring[1], ring[0], carbon, 1.22, 123.0, 0.0)  # towards the ortho group
    hydroxyl_o = _place(ring[1], ring[0], carbon, 1.34, 113.0, 180.0)
    hydroxyl_h = _place(carbonyl_o, carbon, hydroxyl_o, _OH_A, 106.0, 0.0)  # syn O=C-O-H
    return ring, [carbon, carbonyl_o, hydroxyl_o, hydroxyl_h]


def _build_salicylic_acid():
    ring, carboxyl = _benzoic_ring_with_carboxyl()
    phenol_o = _radial(ring, 1, 1.36)
    phenol_h = _place(ring[0], ring[1], phenol_o, _OH_A, 108.0, 0.0)  # H-bond to the carbonyl O
    ring_h = [_radial(ring, k, _CH_A) for k in range(2, 6)]
    return "C7O3H6", np.vstack([ring, carboxyl[0], carboxyl[1:3], phenol_o, carboxyl[3], phenol_h, ring_h])


def _build_aspirin():
    ring, carboxyl = _benzoic_ring_with_carboxyl()
    ester_o = _radial(ring, 1, 1.38)
    acetyl_c = _place(ring[0], ring[1], ester_o, 1.37, 118.0, 90.0)  # acetoxy out of the ring plane
    acetyl_o = _place(ring[1], ester_o, acetyl_c, 1.20, 123.0, 0.0)  # Z ester
    methyl_c = _place(ring[1], ester_o, acetyl_c, 1.50, 110.0, 180.0)
    ring_h = [_radial(ring, k, _CH_A) for k in range(2, 6)]
    return "C9O4H8", np.vstack(
        [
            ring,
            carboxyl[0],
            acetyl_c,
            methyl_c,
            carboxyl[1:3],
            ester_o,
            acetyl_o,
            carboxyl[3],
            _methyl_hydrogens(ester_o, acetyl_c, methyl_c),
            ring_h,
        ]
    )


def _build_toluene():
    ring = _hexagon((0.0, 0.0), _AROMATIC_CC_A, 90.0)
    methyl_c = _radial(ring, 0, 1.51)
    methyl_h = [_place(ring[1], ring[0], methyl_c, 1.09, _TETRAHEDRAL_DEG, d) for d in (90, 210, 330)]
    return "C7H8", np.vstack([ring, methyl_c, methyl_h, [_radial(ring, k, _CH_A) for k in range(1, 6)]])


def _build_naphthalene():
    half_width = _AROMATIC_CC_A * np.sqrt(3.0) / 2.0  # two hexagons sharing the edge at x = 0
    centers = [(-half_width, 0.0), (half_width, 0.0)]
    left, right = (_hexagon(center, _AROMATIC_CC_A, 90.0) for center in centers)
    # right ring atoms 4 (210 deg) and 5 (150 deg) are the shared left ring atoms 2 (-30 deg) and 1 (30 deg)
    carbons = np.vstack([left, right[[0, 1, 2, 3]]])
    hydrogens = [_radial(left, k, _CH_A, centers[0]) for k in (0, 3, 4, 5)]
    hydrogens += [_radial(right, k, _CH_A, centers[1]) for k in (0, 1, 2, 3)]
    return "C10H8", np.vstack([carbons, hydrogens])


def _build_uracil():
    ring = _hexagon((0.0, 0.0), 1.38, 90.0)  # N1, C2, N3, C4, C5, C6
    substituents = [
        _radial(ring, 1, 1.22),
        _radial(ring, 3, 1.22),  # O2, O4
        _radial(ring, 0, _NH_A),
        _radial(ring, 2, _NH_A),  # H1, H3
        _radial(ring, 4, _CH_A),
        _radial(ring, 5, _CH_A),
    ]  # H5, H6
    return "NCNCCCOOHHHH", np.vstack([ring, substituents])


def _build_malonaldehyde():
    """Planar enol form O=CH-CH=CH-OH with its intramolecular O-H...O hydrogen bond (as in MD17)."""
    central_c = np.zeros(3)
    aldehyde_c = 1.42 * np.array([np.cos(np.radians(150)), np.sin(np.radians(150)), 0.0])
    enol_c = 1.37 * np.array([np.cos(np.radians(30)), np.sin(np.radians(30)), 0.0])
    aldehyde_o = aldehyde_c + 1.24 * np.array([np.cos(np.radians(100)), np.sin(np.radians(100)), 0.0])
    enol_o = enol_c + 1.33 * np.array([np.cos(np.radians(80)), np.sin(np.radians(80)), 0.0])
    bridge_h = enol_o + _OH_A * (aldehyde_o - enol_o) / np.linalg.norm(aldehyde_o - enol_o)
    c_h = [
        central_c + np.array([0.0, -_CH_A, 0.0]),
        aldehyde_c + _CH_A * np.array([np.cos(np.radians(210)), np.sin(np.radians(210)), 0.0]),
        enol_c + _CH_A * np.array([np.cos(np.radians(-30)), np.sin(np.radians(-30)), 0.0]),
    ]
    return "CCCOOHHHH", np.vstack([aldehyde_c, central_c, enol_c, aldehyde_o, enol_o, bridge_h, c_h])


_MD17_BUILDERS = {
    "aspirin": _build_aspirin,
    "malonaldehyde": _build_malonaldehyde,
    "naphthalene": _build_naphthalene,
    "salicylic_acid": _build_salicylic_acid,
    "toluene": _build_toluene,
    "uracil": _build_uracil,
}


def md17_start_geometry(molecule: str):
    """Unoptimised starting geometry (ase.Atoms, Angstrom): ase's g2 database for benzene and ethanol,
    hand-built from bond lengths, angles and dihedrals for the other six. Returns (atoms, source)."""
    from ase import Atoms
    from ase.build import molecule as ase_molecule

    molecule = md17_molecule_name(molecule)
    if molecule in MD17_ASE_G2_NAMES:
        atoms = ase_molecule(MD17_ASE_G2_NAMES[molecule])
        source = f"ase.build.molecule({MD17_ASE_G2_NAMES[molecule]!r})"
    else:
        symbols, positions = _MD17_BUILDERS[molecule]()
        atoms, source = Atoms(symbols, positions=positions), "hand-built (dimezbl data section)"
    if atoms.get_chemical_formula(mode="hill") != MD17_FORMULAS[molecule]:
        raise AssertionError(f"{molecule} start geometry is {atoms.get_chemical_formula(mode='hill')}")
    return atoms, source


BOND_CUTOFF_FACTOR = 1.2  # bonded if d < 1.2 * (sum of ase's covalent radii, Cordero et al. 2008)


def bond_graph(atoms) -> set[tuple[int, int]]:
    """Covalent bonds (i < j) of an ase.Atoms: d_ij < 1.2 * (r_cov_i + r_cov_j)."""
    from ase.data import covalent_radii

    positions = atoms.get_positions()
    radii = covalent_radii[atoms.numbers]
    distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    i, j = np.nonzero(np.triu(distance < BOND_CUTOFF_FACTOR * (radii[:, None] + radii[None]), k=1))
    return set(zip(i.tolist(), j.tolist()))


# --- MD17 offline generator: GFN2-xTB Langevin MD ------------------------------------------------

XTB_METHOD = "GFN2-xTB"
MD17_TEMPERATURE_K = 500.0  # MD17's MD temperature (Chmiela et al., Sci. Adv. 3, e1603015 (2017))
MD17_TIMESTEP_FS = 0.5  # MD17's time step
MD17_SAMPLE_EVERY = 20  # 10 fs between stored configurations: less correlated than every step
MD17_EQUILIBRATION_STEPS = 2000  # 1 ps at 0.5 fs before the first stored configuration
LANGEVIN_FRICTION_PER_FS = 0.01  # 1/fs (100 fs relaxation time), ase's documented example value
OPTIMISATION_FMAX_EV_A = 0.01  # eV/Angstrom, BFGS on the starting geometry
CHECKPOINT_EVERY = 100  # configurations between checkpoints
COMMITTED_SETS_BLAS_CORE = "Haswell"  # numpy's OpenBLAS kernels on the AMD EPYC that regenerates the fair sets


def _limit_openmp_threads(num_threads: int) -> None:
    """Set the OpenMP thread count tblite's libgomp uses from this thread on.

    GFN2-xTB on a 9-atom molecule runs ~1 ms per step on one thread; with two OpenMP threads and
    another process busy on a 2-core machine it slowed down 100-fold here, so the generator uses 1.
    """
    import tblite.interface  # noqa: F401 - loads libgomp

    try:
        ctypes.CDLL("libgomp.so.1").omp_set_num_threads(int(num_threads))
    except (OSError, AttributeError):
        LOG.info("could not set the OpenMP thread count (no libgomp); set OMP_NUM_THREADS=%d", num_threads)


def xtb_calculator(num_threads: int = 1):
    """tblite's ASE calculator for GFN2-xTB, silent (verbosity 0)."""
    from tblite.ase import TBLite

    _limit_openmp_threads(num_threads)
    return TBLite(method=XTB_METHOD, verbosity=0)


def optimise_md17_geometry(molecule: str, num_threads: int = 1):
    """Starting geometry optimised with GFN2-xTB (BFGS to fmax 0.01 eV/A), bonding checked unchanged."""
    from ase.optimize import BFGS

    atoms, source = md17_start_geometry(molecule)
    bonds_before = bond_graph(atoms)
    atoms.calc = xtb_calculator(num_threads)
    converged = BFGS(atoms, logfile=None).run(fmax=OPTIMISATION_FMAX_EV_A, steps=1000)
    if not converged:
        LOG.warning("%s: BFGS stopped before fmax %.3f eV/A", molecule, OPTIMISATION_FMAX_EV_A)
    bonds_after = bond_graph(atoms)
    if bonds_after != bonds_before:
        raise RuntimeError(
            f"{molecule}: GFN2-xTB optimisation changed the bonding (lost "
            f"{sorted(bonds_before - bonds_after)}, gained {sorted(bonds_after - bonds_before)}): "
            "fix the starting geometry"
        )
    return atoms, source


def _thermalize_momenta(atoms, temperature_k: float, rng) -> None:
    """Maxwell-Boltzmann momenta at ``temperature_k`` (K): ase >= 3.29 API, older name as fallback."""
    try:
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # ase 3.23 - 3.28
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_k, rng=rng)
        return
    thermalize_momenta(atoms, temperature_k, rng=rng)


def _software_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("tblite", "ase", "numpy", "torch"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def openblas_core() -> str | None:
    """The OpenBLAS kernel set numpy's linear algebra runs on in this process ("Haswell" on the 2-core AMD EPYC
    CPUs, other names on AVX-512 CPUs), or None where numpy bundles no OpenBLAS that says. The start geometry's
    BFGS optimisation goes through it: other kernels round differently in the last bit (forcing SSE kernels here
    moved the optimised ethanol by 3e-15 A), and the Langevin trajectory, chaotic, then drifts into another set."""
    libs = sorted((Path(np.__file__).parent.parent / "numpy.libs").glob("libscipy_openblas*.so*"))
    for lib in libs:
        try:
            handle = ctypes.CDLL(str(lib))
        except OSError:
            continue
        for symbol in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename"):
            function = getattr(handle, symbol, None)
            if function is not None:
                function.restype = ctypes.c_char_p
                return function().decode()
    return None


def _warn_about_other_blas_kernels(core: str | None) -> None:
    if core is not None and core != COMMITTED_SETS_BLAS_CORE:
        LOG.warning(
            "numpy's OpenBLAS runs on %s kernels here; the committed generated sets were made on %s kernels, and "
            "other kernels give another trajectory (another data set, another sha256). To aim at those sets, "
            "start Python with OPENBLAS_CORETYPE=%s (CPUs with AVX2) and compare the sha256 (docs/data.md).",
            core,
            COMMITTED_SETS_BLAS_CORE,
            COMMITTED_SETS_BLAS_CORE,
        )


def _state_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".state.npz")


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


RESUME_NOTE = (
    "A checkpoint stores, with the positions, momenta and random-generator state, GFN2-xTB's converged "
    "wavefunction (tblite's Result.save) and the energy and forces at the checkpoint's positions, so a resumed "
    "trajectory starts its next SCF from the same guess as the uninterrupted run and continues it bit for bit. "
    "Checkpoints without a stored wavefunction restart the SCF from tblite's SAD guess: energies and forces of the "
    "first resumed step then differ at the SCF convergence level (~1e-4 kcal/mol) and the trajectory drifts apart "
    "from the uninterrupted one from that configuration on (equally valid samples of the same ensemble, not the "
    "same numbers)."
)
CALC_RESULT_PREFIX = "calc_result_"


def _calculator_state(calc) -> dict:
    """The xtb calculator's restart state as npz arrays: its converged wavefunction (tblite's own npz file, as
    bytes) and its cached results (energy eV, forces eV/Angstrom, ...) at the current positions; {} before the
    first calculation."""
    result = getattr(calc, "_res", None)
    if result is None or not getattr(calc, "results", None):
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wavefunction.npz"
        result.save(str(path))
        blob = path.read_bytes()
    arrays = {"wavefunction_npz": np.frombuffer(blob, dtype=np.uint8)}
    for key, value in calc.results.items():
        arrays[CALC_RESULT_PREFIX + key] = np.asarray(value)
    return arrays


def _restore_calculator(calc, atoms, state: dict) -> bool:
    """Put a checkpoint's wavefunction and cached results back into `calc` for `atoms` (already at the
    checkpoint's positions): the next MD step then runs exactly as in the uninterrupted trajectory. False
    (nothing restored) for checkpoints without a wavefunction."""
    if "wavefunction_npz" not in state:
        return False
    from tblite.interface import Result

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "wavefunction.npz"
        path.write_bytes(np.asarray(state["wavefunction_npz"], dtype=np.uint8).tobytes())
        result = Result()
        try:
            result.load(str(path))
        except Exception as error:  # noqa: BLE001 - tblite raises its own error types
            LOG.warning("the checkpoint's wavefunction does not load (%s): resuming from the SAD guess", error)
            return False
    calc._res = result
    calc.atoms = atoms.copy()
    calc.results = {
        key[len(CALC_RESULT_PREFIX) :]: (value.item() if value.ndim == 0 else value.copy())
        for key, value in state.items()
        if key.startswith(CALC_RESULT_PREFIX)
    }
    return True


def _md_state(atoms, rng, md_steps_done: int, n_frames: int) -> dict:
    """The MD state at a step boundary as npz arrays: positions (Angstrom), momenta, the random generator's
    state, the MD steps and configurations done, and the xtb calculator's restart state (`_calculator_state`)."""
    return {
        "positions": atoms.get_positions(),
        "momenta": atoms.get_momenta(),
        "rng_state": np.array(json.dumps(rng.bit_generator.state)),
        "md_steps_done": np.array(md_steps_done),
        "n_frames": int(n_frames),
        **_calculator_state(atoms.calc),
    }


def _write_generation_state(
    path: Path,
    settings: dict,
    frames: dict[str, list],
    md_state: dict,
    n_atoms: int,
    wall_s: float,
    resumed_at: Sequence[int] = (),
    inexact_resumed_at: Sequence[int] = (),
) -> None:
    """Checkpoint: the configurations up to `md_state` (the last step boundary, `_md_state`), that MD state
    and the configuration counts at which the trajectory was resumed, in all and without a stored wavefunction
    (`RESUME_NOTE`)."""
    n_frames = md_state["n_frames"]
    atomic_write_bytes(
        path,
        _npz_bytes(
            R=np.array(frames["R"][:n_frames]).reshape(-1, n_atoms, 3),
            E=np.array(frames["E"][:n_frames]),
            F=np.array(frames["F"][:n_frames]).reshape(-1, n_atoms, 3),
            md_step=np.array(frames["md_step"][:n_frames], dtype=np.int64),
            temperature_k=np.array(frames["temperature_k"][:n_frames]),
            settings=np.array(json.dumps(settings, sort_keys=True)),
            wall_s=np.array(wall_s),
            resumed_at=np.array(list(resumed_at), dtype=np.int64),
            inexact_resumed_at=np.array(list(inexact_resumed_at), dtype=np.int64),
            **{key: value for key, value in md_state.items() if key != "n_frames"},
        ),
    )


def _read_generation_state(path: Path, settings: dict):
    """The checkpoint at ``path`` if its settings match, else (None, reason)."""
    try:
        with np.load(path, allow_pickle=False) as state:
            stored = json.loads(str(state["settings"]))
            data = {key: state[key] for key in state.files}
    except Exception as error:  # noqa: BLE001 - unreadable checkpoints are reported and replaced
        return None, f"checkpoint {path} is unreadable ({type(error).__name__}: {error})"
    if stored != json.loads(json.dumps(settings, sort_keys=True)):
        changed = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
        return None, f"checkpoint {path} was made with other settings ({', '.join(changed)})"
    return data, ""


def langevin_dynamics(atoms, timestep_fs: float, temperature_k: float, friction_per_fs: float, rng):
    """ase's Langevin integrator with time step (fs), temperature (K), friction (1/fs) and `rng`, the centre of
    mass kept by the atoms' FixCom constraint (fixcm=False): the dynamics of the generator and of the short-range
    experiment."""
    from ase import units
    from ase.md.langevin import Langevin

    return Langevin(
        atoms,
        timestep=timestep_fs * units.fs,
        temperature_K=temperature_k,
        friction=friction_per_fs / units.fs,
        fixcm=False,
        rng=rng,
    )


def generate_md17(
    molecule: str,
    n_configs: int,
    out_path=None,
    temperature_k: float = MD17_TEMPERATURE_K,
    timestep_fs: float = MD17_TIMESTEP_FS,
    sample_every: int = MD17_SAMPLE_EVERY,
    seed: int = 0,
    equilibration_steps: int = MD17_EQUILIBRATION_STEPS,
    resume: bool = True,
    progress: bool = True,
    friction_per_fs: float = LANGEVIN_FRICTION_PER_FS,
    checkpoint_every: int = CHECKPOINT_EVERY,
    num_threads: int = 1,
    data_dir=None,
) -> Path:
    """Generate an MD17-style data set with GFN2-xTB: Langevin MD at ``temperature_k`` (K),
    ``timestep_fs`` (fs) steps, one configuration stored every ``sample_every`` steps after
    ``equilibration_steps``.

    Writes ``out_path`` (default ``<data_dir>/md17/generated/<molecule>.npz``) in the sGDML layout:
    E [M, 1] kcal/mol, F [M, N, 3] kcal/mol/Angstrom, R [M, N, 3] Angstrom, z [N], name, theory; plus
    ``<name>.json`` (method, settings, versions, wall time) and ``<name>.state.npz`` (checkpoint with the
    MD state). With ``resume=True`` a run continues from a checkpoint made with the same settings;
    asking for more configurations than exist extends the trajectory.
    """
    from ase.constraints import FixCom
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from tqdm.auto import tqdm

    molecule = md17_molecule_name(molecule)
    if n_configs < 1 or sample_every < 1 or equilibration_steps < 0:
        raise ValueError(
            f"need n_configs >= 1, sample_every >= 1, equilibration_steps >= 0; got "
            f"{n_configs}, {sample_every}, {equilibration_steps}"
        )
    out_path = Path(out_path) if out_path is not None else md17_default_path(molecule, "generated", data_dir)
    state_path = _state_path(out_path)
    settings = {
        "molecule": molecule,
        "method": XTB_METHOD,
        "temperature_k": float(temperature_k),
        "timestep_fs": float(timestep_fs),
        "sample_every": int(sample_every),
        "seed": int(seed),
        "equilibration_steps": int(equilibration_steps),
        "friction_per_fs": float(friction_per_fs),
        "optimisation_fmax_ev_a": OPTIMISATION_FMAX_EV_A,
        "checkpoint_format": 1,
    }
    ev_to_kcal = ev_to_kcal_per_mol()

    blas_core = openblas_core()
    _warn_about_other_blas_kernels(blas_core)
    atoms, geometry_source = optimise_md17_geometry(molecule, num_threads)
    atoms.set_constraint(FixCom())  # keep the centre of mass in place (ase's advice over fixcm=True)
    rng = np.random.default_rng(seed)
    frames = {"R": [], "E": [], "F": [], "md_step": [], "temperature_k": []}
    md_steps_done, wall_before, resumed_at, inexact_resumed_at = 0, 0.0, [], []
    state, reason = (
        (None, "resume=False")
        if not resume
        else (_read_generation_state(state_path, settings) if state_path.exists() else (None, "no checkpoint"))
    )
    if state is not None:
        frames = {key: list(state[key]) for key in frames}
        atoms.set_positions(state["positions"], apply_constraint=False)
        atoms.set_momenta(state["momenta"], apply_constraint=False)
        rng.bit_generator.state = json.loads(str(state["rng_state"]))
        md_steps_done, wall_before = int(state["md_steps_done"]), float(state["wall_s"])
        resumed_at = [int(k) for k in state.get("resumed_at", ())]
        # checkpoints written before the wavefunction was stored: every resume restarted from the SAD guess
        inexact_resumed_at = [int(k) for k in state.get("inexact_resumed_at", resumed_at)]
        exact = _restore_calculator(atoms.calc, atoms, state)
        if len(frames["E"]) < n_configs:  # the trajectory continues from here (not when it only gets cut)
            resumed_at.append(len(frames["E"]))
            if not exact:
                inexact_resumed_at.append(len(frames["E"]))
        LOG.info("%s: resuming from %d configurations in %s", molecule, len(frames["E"]), state_path)
    else:
        if resume and state_path.exists():
            LOG.warning("%s: starting over: %s", molecule, reason)
        _thermalize_momenta(atoms, temperature_k, rng)
        Stationary(atoms)
        ZeroRotation(atoms)
    resumed_from = len(frames["E"])

    dynamics = langevin_dynamics(atoms, timestep_fs, temperature_k, friction_per_fs, rng)
    start = time.perf_counter()

    boundary = _md_state(atoms, rng, md_steps_done, len(frames["E"]))  # what a checkpoint writes

    def checkpoint():
        _write_generation_state(
            state_path,
            settings,
            frames,
            boundary,
            len(atoms),
            wall_before + time.perf_counter() - start,
            resumed_at,
            inexact_resumed_at,
        )

    bar = tqdm(
        total=n_configs,
        initial=min(resumed_from, n_configs),
        desc=f"{molecule} {XTB_METHOD} MD",
        unit="config",
        disable=not progress,
    )
    try:
        if md_steps_done < equilibration_steps:
            dynamics.run(equilibration_steps - md_steps_done)
            md_steps_done = equilibration_steps
            boundary = _md_state(atoms, rng, md_steps_done, len(frames["E"]))
        sampling_start = time.perf_counter()
        while len(frames["E"]) < n_configs:
            dynamics.run(sample_every)
            md_steps_done += sample_every
            frames["R"].append(atoms.get_positions())
            frames["E"].append(atoms.get_potential_energy() * ev_to_kcal)
            frames["F"].append(atoms.get_forces(apply_constraint=False) * ev_to_kcal)
            frames["md_step"].append(md_steps_done)
            frames["temperature_k"].append(atoms.get_temperature())
            boundary = _md_state(atoms, rng, md_steps_done, len(frames["E"]))
            bar.update(1)
            if len(frames["E"]) % checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()  # the last step boundary: an interrupted MD step or configuration is redone on resume
        LOG.warning(
            "%s: interrupted; %d configurations kept in %s, run again to resume",
            molecule,
            boundary["n_frames"],
            state_path,
        )
        raise
    finally:
        bar.close()
    checkpoint()
    end = time.perf_counter()
    wall_s = wall_before + end - start

    z = atoms.get_atomic_numbers().astype(np.int64)
    n_atoms = len(z)
    atomic_write_bytes(
        out_path,
        _npz_bytes(
            E=np.array(frames["E"][:n_configs]).reshape(-1, 1),
            F=np.array(frames["F"][:n_configs]).reshape(-1, n_atoms, 3),
            R=np.array(frames["R"][:n_configs]).reshape(-1, n_atoms, 3),
            z=z,
            md_step=np.array(frames["md_step"][:n_configs], dtype=np.int64),
            name=np.array(molecule),
            theory=np.array(f"{XTB_METHOD} (tblite), Langevin MD {temperature_k:g} K"),
            type=np.array("d"),
            r_unit=np.array("Ang"),
            e_unit=np.array("kcal/mol"),
        ),
    )
    new_configs = max(0, min(n_configs, len(frames["E"])) - resumed_from)
    atomic_write_json(
        out_path.with_suffix(".json"),
        {
            **settings,
            "n_configs": n_configs,
            "n_atoms": n_atoms,
            "md_steps": int(frames["md_step"][n_configs - 1]),
            "langevin": "ase.md.langevin.Langevin with ase.constraints.FixCom",
            "start_geometry": geometry_source,
            "resumed_from_configs": resumed_from,
            "resumed_at_configs": [k for k in resumed_at if k < n_configs],
            "bit_identical_to_an_uninterrupted_run": not any(k < n_configs for k in inexact_resumed_at),
            "resume_note": RESUME_NOTE,
            "wall_time_s": round(wall_s, 3),
            "configs_per_s_sampling": round(new_configs / max(end - sampling_start, 1e-9), 3),
            "mean_temperature_k": round(float(np.mean(frames["temperature_k"][:n_configs])), 1),
            "units": {"E": "kcal/mol", "F": "kcal/mol/Angstrom", "R": "Angstrom"},
            "ev_to_kcal_per_mol": ev_to_kcal,
            "software": _software_versions(),
            "openmp_threads": num_threads,
            "openblas_core": blas_core,
            "note": "GFN2-xTB data generated offline, not the DFT data of MD17: comparable across models "
            "here, not with the paper's absolute numbers",
        },
    )
    return out_path


def generate_md17_main(argv: Sequence[str] | None = None) -> int:
    """``dimezbl generate-md17``: GFN2-xTB MD17-style data sets, resumable, with progress bars."""
    parser = argparse.ArgumentParser(
        prog="dimezbl generate-md17",
        description="Generate MD17-style data (GFN2-xTB via tblite, Langevin MD at 500 K) in the sGDML npz layout.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--molecule", choices=MD17_MOLECULES)
    which.add_argument("--all", action="store_true", help="all 8 MD17 molecules of the paper")
    parser.add_argument("--n-configs", type=int, default=2000)
    parser.add_argument("--data-dir", default=None, help="default: $DIMEZBL_DATA_DIR or <repository>/data")
    parser.add_argument("--out", default=None, help="output npz (only with --molecule)")
    parser.add_argument("--temperature-k", type=float, default=MD17_TEMPERATURE_K)
    parser.add_argument("--timestep-fs", type=float, default=MD17_TIMESTEP_FS)
    parser.add_argument("--sample-every", type=int, default=MD17_SAMPLE_EVERY, help="MD steps between configurations")
    parser.add_argument("--equilibration-steps", type=int, default=MD17_EQUILIBRATION_STEPS)
    parser.add_argument("--friction-per-fs", type=float, default=LANGEVIN_FRICTION_PER_FS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OpenMP threads for tblite")
    parser.add_argument("--no-resume", action="store_true", help="ignore checkpoints and start over")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.out and args.all:
        parser.error("--out names one file; use it with --molecule, not --all")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for molecule in MD17_MOLECULES if args.all else (args.molecule,):
        path = generate_md17(
            molecule,
            args.n_configs,
            out_path=args.out,
            temperature_k=args.temperature_k,
            timestep_fs=args.timestep_fs,
            sample_every=args.sample_every,
            seed=args.seed,
            equilibration_steps=args.equilibration_steps,
            resume=not args.no_resume,
            progress=not args.no_progress,
            friction_per_fs=args.friction_per_fs,
            num_threads=args.threads,
            data_dir=args.data_dir,
        )
        print(f"{molecule}: {args.n_configs} configurations -> {path}")
    return 0
