"""Your own data: training and evaluating on an extended-XYZ file or an ASE database, and its clear errors."""

import json

import numpy as np
import pytest
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write

import dimezbl as dz


def _frames(ethanol_smoke_data, n=60):
    """GFN2-xTB ethanol configurations of the shared fixture as ASE Atoms: REF_energy in info, REF_forces in arrays
    (kcal/mol and kcal/mol/A, as generated)."""
    arrays = dz.read_md17_npz(ethanol_smoke_data / "data" / "md17" / "generated" / "ethanol.npz")
    frames = []
    for k in range(n):
        atoms = Atoms(numbers=arrays["z"], positions=arrays["R"][k])
        atoms.info["REF_energy"] = float(arrays["E"][k])
        atoms.arrays["REF_forces"] = arrays["F"][k].astype(np.float64)
        frames.append(atoms)
    return frames


def _tiny(tmp_path, **fields):
    values = dict(max_steps=6, eval_every=3, batch_size=8, device="cpu", out_dir=str(tmp_path / "runs"))
    return {**values, **fields}


def test_own_extxyz_round_trip_train_evaluate_calculator(ethanol_smoke_data, tmp_path, capsys):
    path = tmp_path / "ethanol_xtb.extxyz"
    write(path, _frames(ethanol_smoke_data))
    dataset = dz.load_structures(path, "kcal/mol", "REF_energy", "REF_forces")
    assert len(dataset) == 60 and dataset.has_forces and dataset.unit == "kcal/mol"
    argv = ["train", "--dataset", "file", "--data-file", str(path), "--energy-unit", "kcal/mol",
            "--energy-key", "REF_energy", "--forces-key", "REF_forces", "--profile", "smoke", "--no-progress",
            "--set", 'model={"hidden_channels": 16, "num_blocks": 1, "num_bilinear": 2, "num_spherical": 3, '
            '"num_radial": 3}']  # fmt: skip
    for key, value in _tiny(tmp_path).items():
        argv += ["--set", f"{key}={json.dumps(value)}"]
    assert dz.cli.main(argv) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "smoke" / "file" / "ethanol_xtb" / "dimezblnet_seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["n_train"], metrics["n_valid"], metrics["n_test"]) == (48, 6, 6)
    assert metrics["units"] == {"energy": "kcal/mol", "forces": "kcal/mol/A"} and "forces_mae" in metrics["test"]
    provenance = json.loads((run_dir / "provenance.json").read_text())
    assert provenance["data"]["content_sha256"] == dataset.content_sha256()
    evaluated = dz.evaluate_checkpoint(run_dir / "checkpoint_best.pt", device="cpu")
    assert evaluated["metrics"]["energy_mae"] == pytest.approx(metrics["test"]["energy_mae"], rel=1e-6)
    calc = dz.DimezblCalculator.from_checkpoint(run_dir / "checkpoint_best.pt")
    atoms = _frames(ethanol_smoke_data, 1)[0]
    atoms.calc = calc
    energy_kcal = atoms.get_potential_energy() / dz.energy_unit_in_ev("kcal/mol")
    # a 6-step model: within its own error scale of the reference, not exact
    assert abs(energy_kcal - atoms.info["REF_energy"]) < 20 * metrics["test_mean_predictor"]["energy_mae"]
    assert atoms.get_forces().shape == (9, 3)


def test_an_ase_database_reads_as_the_same_data(ethanol_smoke_data, tmp_path):
    import ase.db

    frames = _frames(ethanol_smoke_data, 20)
    xyz, db = tmp_path / "a.extxyz", tmp_path / "a.db"
    write(xyz, frames)
    with ase.db.connect(str(db)) as database:
        for atoms in frames:
            database.write(atoms, REF_energy=atoms.info["REF_energy"], data={"REF_forces": atoms.arrays["REF_forces"]})
    from_xyz = dz.load_structures(xyz, "kcal/mol", "REF_energy", "REF_forces")
    from_db = dz.load_structures(db, "kcal/mol", "REF_energy")
    assert not from_db.has_forces  # REF_forces is not the default key "forces": energies only unless named
    named = dz.load_structures(db, "kcal/mol", "REF_energy", "REF_forces")
    assert len(named) == len(from_xyz) == 20 and named.has_forces
    for k in range(20):  # extended XYZ is text (8 decimals), the database binary
        a, b = named[k], from_xyz[k]
        assert a.z.tolist() == b.z.tolist()
        np.testing.assert_allclose(a.pos, b.pos, atol=1e-6)
        np.testing.assert_allclose(a.energy, b.energy, rtol=1e-9)
        np.testing.assert_allclose(a.forces, b.forces, atol=1e-5)


def test_mixed_molecules_with_energies_only_train(tmp_path):
    """Water and methane frames of different sizes, energies only (eV from a calculator's results): the loss is the
    energy MAE alone."""
    rng = np.random.default_rng(0)
    frames = []
    for k in range(40):
        water = k % 2 == 0
        water_xyz = [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]]
        methane_xyz = [[0, 0, 0], [1.09, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.51, 0.89], [-0.36, -0.51, -0.89]]
        base = water_xyz if water else methane_xyz
        atoms = Atoms("H2O" if water else "CH4", positions=np.array(base) + rng.normal(0, 0.03, (len(base), 3)))
        if water:
            atoms.numbers = [8, 1, 1]
        atoms.calc = SinglePointCalculator(atoms, energy=float(-14.2 if water else -24.0) + rng.normal(0, 0.05))
        frames.append(atoms)
    path = tmp_path / "mixed.xyz"
    write(path, frames)
    dataset = dz.load_structures(path, "eV")
    assert not dataset.has_forces and len(dataset) == 40
    config = dz.profile_config("smoke", "file", "mixed", data_file=str(path), energy_unit="eV",
                               model=dict(hidden_channels=16, num_blocks=1, num_bilinear=2, num_spherical=3,
                                          num_radial=3), **_tiny(tmp_path))  # fmt: skip
    metrics = dz.train(config, progress=False)
    assert set(metrics["test"]) == {"energy_mae", "energy_rmse"} and metrics["units"]["energy"] == "eV"


def test_a_split_file_chooses_the_frames(ethanol_smoke_data, tmp_path):
    path = tmp_path / "e.extxyz"
    write(path, _frames(ethanol_smoke_data, 30))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": list(range(0, 20)), "valid": [20, 21, 22], "test": [25, 26]}))
    train, valid, test = dz.structure_split(30, split_file=split)
    assert list(valid) == [20, 21, 22] and list(test) == [25, 26]
    split.write_text(json.dumps({"train": [0, 1], "valid": [1], "test": []}))
    with pytest.raises(ValueError, match="names a frame in more than one subset"):
        dz.structure_split(30, split_file=split)
    split.write_text(json.dumps({"train": [0, 31], "valid": [1], "test": []}))
    with pytest.raises(ValueError, match=r"names frames outside 0\.\.29"):
        dz.structure_split(30, split_file=split)
    with pytest.raises(ValueError, match="must be three fractions"):
        dz.structure_split(30, fractions=[0.9, 0.2, 0.0])


def test_bad_own_data_are_clear_errors(ethanol_smoke_data, tmp_path):
    frames = _frames(ethanol_smoke_data, 6)
    good = tmp_path / "good.extxyz"
    write(good, frames)
    with pytest.raises(KeyError, match=r"frame 0 of .*good\.extxyz has no energy 'energy' \(its info keys: "
                       r"\['REF_energy'\].*name the key with energy_key"):  # fmt: skip
        dz.load_structures(good, "kcal/mol")
    with pytest.raises(KeyError, match=r"has no forces 'F_dft' .*REF_forces"):
        dz.load_structures(good, "kcal/mol", "REF_energy", "F_dft")
    with pytest.raises(ValueError, match=r"unknown energy unit 'kcal'"):
        dz.load_structures(good, "kcal", "REF_energy")
    with pytest.raises(ValueError, match=r"state the energy unit"):
        dz.load_structures(good, None, "REF_energy")
    with pytest.raises(ValueError, match=r"config field energy_unit=None is invalid: state the unit"):
        dz.profile_config("smoke", "file", "good", data_file=str(good))
    nan = [atoms.copy() for atoms in frames]
    nan[3].info["REF_energy"] = float("nan")
    write(tmp_path / "nan.extxyz", nan)
    with pytest.raises(ValueError, match=r"frame 3 of .*nan\.extxyz: energy 'REF_energy' is nan \(not finite\)"):
        dz.load_structures(tmp_path / "nan.extxyz", "kcal/mol", "REF_energy", "REF_forces")
    mixed = []
    for k, atoms in enumerate(frames):  # energies and forces as calculator results, frame 2 without forces
        copy = Atoms(numbers=atoms.numbers, positions=atoms.positions)
        results = {"energy": atoms.info["REF_energy"]}
        if k != 2:
            results["forces"] = atoms.arrays["REF_forces"]
        copy.calc = SinglePointCalculator(copy, **results)
        mixed.append(copy)
    write(tmp_path / "mixed.extxyz", mixed)
    with pytest.raises(ValueError, match=r"1 of 6 frames have no forces \(first: frame 2\) while the others have them"):
        dz.load_structures(tmp_path / "mixed.extxyz", "kcal/mol")
    periodic = [atoms.copy() for atoms in frames]
    periodic[1].set_cell([10, 10, 10])
    periodic[1].pbc = True
    write(tmp_path / "pbc.extxyz", periodic)
    with pytest.raises(ValueError, match=r"frame 1 of .*pbc\.extxyz is periodic"):
        dz.load_structures(tmp_path / "pbc.extxyz", "kcal/mol", "REF_energy")
    with pytest.raises(FileNotFoundError, match=r"data file .*missing\.xyz does not exist"):
        dz.load_structures(tmp_path / "missing.xyz", "eV")
    (tmp_path / "garbage.xyz").write_text("not an xyz file\n")
    with pytest.raises(ValueError, match=r"could not read .*garbage\.xyz"):
        dz.load_structures(tmp_path / "garbage.xyz", "eV")
