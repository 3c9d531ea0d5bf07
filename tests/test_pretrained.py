"""Shipped potentials (weights-only files with metadata, loaded by name, sha256 checked) and the seed committee."""

import json
import shutil

import numpy as np
import pytest
import torch
from ase.build import molecule

import dimezbl as dz
import dimezbl_core as dc

SHIPPED = [(name, seed) for row in dz.list_pretrained() for name, seed in ((row["name"], s) for s in row["seeds"])]


@pytest.mark.parametrize("name, seed", SHIPPED)
def test_every_shipped_potential_loads_matches_its_sha256_and_its_recorded_sample_mae(name, seed):
    check = dz.check_pretrained(name, seed)
    for key, value in check["recorded"].items():
        assert check["recomputed"][key] == pytest.approx(value, rel=1e-8)
    meta = dz.pretrained(name, seed).metadata
    assert meta["weights_dtype"] == "float32" and meta["sample_dtype"] == "float64" and meta["data"]["content_sha256"]
    assert set(meta["test_mae"]) >= {"energy_mae"} and meta["trained_at_commit"]


def test_the_shipped_files_stay_small():
    sizes = [path.stat().st_size for path in dz.POTENTIALS_DIR.rglob("*") if path.is_file()]
    assert sum(sizes) < 45e6, f"{sum(sizes) / 1e6:.1f} MB shipped"


@pytest.fixture(scope="module")
def shipped_smoke(ethanol_smoke_run, tmp_path_factory):
    """The smoke ethanol model of the shared fixture, shipped into a folder of its own."""
    config, _ = ethanol_smoke_run
    root = tmp_path_factory.mktemp("potentials")
    meta_path = dz.ship_potential(config.run_dir, root=root)
    return root, meta_path, config


def test_a_shipped_smoke_model_round_trips(shipped_smoke):
    root, meta_path, config = shipped_smoke
    meta = json.loads(meta_path.read_text())
    assert meta_path == root / "md17" / "ethanol" / "dimenet" / "seed0.json"
    assert meta["name"] == "md17/ethanol/dimenet" and meta["energy_unit"] == "kcal/mol"
    assert meta["offset_method"].startswith("per-element least squares") and meta["elements"] == [1, 6, 8]
    rows = dz.list_pretrained(root)
    assert [(r["name"], r["seeds"]) for r in rows] == [("md17/ethanol/dimenet", [0])]
    assert rows[0]["test_energy_mae"] == pytest.approx(meta["test_mae"]["energy_mae"])
    assert rows[0]["training_steps"] == config.max_steps and rows[0]["profile"] == config.profile
    potential = dz.pretrained("md17/ethanol/dimenet", seed=0, root=root)
    assert next(potential.model.parameters()).dtype == torch.float32
    check = dz.check_pretrained("md17/ethanol/dimenet", 0, root=root)
    assert check["recomputed"]["forces_mae"] == pytest.approx(check["recorded"]["forces_mae"], rel=1e-6)
    # the calculator of the shipped model equals the calculator of the run's checkpoint
    atoms, _ = dz.md17_start_geometry("ethanol")
    atoms.calc = potential.calculator()
    shipped_energy, shipped_forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = dz.DimezblCalculator.from_checkpoint(config.run_dir / "checkpoint_best.pt")
    assert shipped_energy == pytest.approx(atoms.get_potential_energy(), abs=1e-4)
    np.testing.assert_allclose(shipped_forces, atoms.get_forces(), atol=1e-4)


def test_bad_names_seeds_and_files_are_clear_errors(shipped_smoke, tmp_path):
    root, meta_path, _ = shipped_smoke
    with pytest.raises(
        KeyError, match=r"no shipped potential named 'md17/ethanol/dimezbl'; shipped: md17/ethanol/dimenet"
    ):
        dz.pretrained("md17/ethanol/dimezbl", root=root)
    with pytest.raises(KeyError, match=r"has no seed 3; shipped seeds: \[0\]"):
        dz.pretrained("md17/ethanol/dimenet", seed=3, root=root)
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    weights = copy / "md17" / "ethanol" / "dimenet" / "seed0.pt"
    payload = bytearray(weights.read_bytes())
    payload[-10] ^= 0xFF
    weights.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match=r"seed0\.pt has sha256 .* the file is corrupt or was changed; restore it"):
        dz.pretrained("md17/ethanol/dimenet", root=copy)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=r"seed0\.pt is missing: restore it from git"):
        dz.pretrained("md17/ethanol/dimenet", root=copy)


def _member(seed):
    torch.manual_seed(seed)
    model = dc.DimezblNet(hidden_channels=16, num_blocks=1, num_bilinear=2, num_spherical=3, num_radial=3,
                          output_initializer="glorot_orthogonal", zbl=True, zbl_unit="kcal/mol")  # fmt: skip
    return dz.DimezblCalculator(model, offset=(0.0, -100.0))


def test_a_committee_of_identical_members_has_zero_spread_and_their_energy():
    atoms = molecule("CH3CH2OH")
    single = _member(0)
    atoms.calc = single
    energy, forces = atoms.get_potential_energy(), atoms.get_forces()
    atoms.calc = dz.DimezblCommittee([_member(0), _member(0), _member(0)])
    assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-9)
    np.testing.assert_allclose(atoms.get_forces(), forces, atol=1e-9)
    results = atoms.calc.results
    assert results["energy_std"] < 1e-12 and np.all(results["forces_std"] < 1e-12)  # zero up to rounding
    assert results["max_force_deviation"] < 1e-12 and results["force_deviation"].shape == (9,)


def test_a_committee_of_different_seeds_reports_its_spread_as_deepmd_model_devi():
    atoms = molecule("CH3CH2OH")
    members = [_member(seed) for seed in (0, 1, 2)]
    per_member = []
    for member in members:
        atoms.calc = member
        per_member.append((atoms.get_potential_energy(), atoms.get_forces()))
    atoms.calc = dz.DimezblCommittee(members)
    atoms.get_potential_energy()
    results = atoms.calc.results
    energies = np.array([e for e, _ in per_member])
    forces = np.array([f for _, f in per_member])
    assert results["energy"] == pytest.approx(energies.mean()) and results["energy_std"] == pytest.approx(
        energies.std()
    )
    assert results["energy_std"] > 0 and results["max_force_deviation"] > 0
    deviation = np.sqrt(((forces - forces.mean(0)) ** 2).sum(-1).mean(0))  # DeePMD's model_devi per atom
    np.testing.assert_allclose(results["force_deviation"], deviation, rtol=1e-10)
    assert results["max_force_deviation"] == pytest.approx(deviation.max())
    np.testing.assert_allclose(results["forces_std"], forces.std(0), rtol=1e-10)


def test_a_committee_needs_calculators():
    with pytest.raises(ValueError, match="at least 2 members"):
        dz.DimezblCommittee([_member(0)])
    with pytest.raises(TypeError, match="DimezblCalculator instances"):
        dz.DimezblCommittee([_member(0), "model.pt"])


def test_models_command_lists_what_is_shipped(capsys):
    assert dz.cli.main(["models", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == dz.list_pretrained()
    assert dz.cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(dz.list_pretrained()) and all(" steps " in line for line in lines)
    # each MAE carries its own unit: energies in the energy unit, forces per Angstrom
    md17 = [line for line in lines if line.startswith("md17/")]
    assert md17 and all("kcal/mol, forces " in line and line.endswith(" kcal/mol/A") for line in md17)


def test_the_readmes_first_code_block_runs_as_written(tmp_path, monkeypatch):
    """The five-line MD snippet of the README's quick start, with a shipped potential, as written."""
    readme = (dz.REPOSITORY_ROOT / "README.md").read_text()
    block = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(block.strip().splitlines()) == 5 and "pretrained_calculator" in block
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)
    atoms = namespace["atoms"]
    assert np.isfinite(atoms.get_potential_energy()) and atoms.get_forces().shape == (9, 3)


def test_notebook_02_draws_the_shipped_potentials_by_default(tmp_path):
    """In JupyterLab after `make setup` notebook 02 needs no training: its learned-vs-ZBL section uses the shipped
    potentials (use_shipped=True is the default; make reproduce sets it to False)."""
    import papermill

    executed = tmp_path / "02.ipynb"
    papermill.execute_notebook(
        str(dz.REPOSITORY_ROOT / "notebooks" / "02_zbl_curves.ipynb"),
        str(executed),
        parameters={"results_dir": str(tmp_path / "results"), "progress_bars": False},
        kernel_name="python3",
        cwd=str(dz.REPOSITORY_ROOT / "notebooks"),
        progress_bar=False,
    )
    assert (tmp_path / "results" / "figures" / "compression_curves_md17_malonaldehyde.png").stat().st_size > 10_000
    assert not (tmp_path / "results" / "runs").exists()  # nothing was trained


def test_a_shipped_weights_file_loads_as_the_checkpoint_it_came_from(shipped_smoke, tmp_path):
    """load_checkpoint reads a shipped weights file (sha256 checked) as the run's best checkpoint, so every tool
    that takes a checkpoint (calculator, compression curve, short-range MD) takes a shipped potential too."""
    root, meta_path, config = shipped_smoke
    weights = meta_path.with_suffix(".pt")
    shipped = dz.load_checkpoint(weights)
    original = dz.load_checkpoint(config.run_dir / "checkpoint_best.pt")
    assert shipped["config"] == original["config"] and list(shipped["offset"]) == list(original["offset"])
    for key, value in original["model"].items():
        torch.testing.assert_close(shipped["model"][key], value.float() if value.is_floating_point() else value)
    corrupt = tmp_path / "seed0.pt"
    shutil.copy(meta_path, corrupt.with_suffix(".json"))
    corrupt.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="corrupt or was changed"):
        dz.load_checkpoint(corrupt)


def test_a_run_without_its_checkpoint_falls_back_to_its_shipped_weights(shipped_smoke, tmp_path):
    root, meta_path, config = shipped_smoke
    run_dir = config.run_dir
    assert dz.shipped_weights_of_run(run_dir, root=root) == meta_path.with_suffix(".pt")
    other = tmp_path / run_dir.name
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps({"test": {"energy_mae": 1.0}}))
    assert dz.shipped_weights_of_run(other, root=root) is None  # another run: no shipped stand-in
    table = dz.shipped_checkpoints("ethanol", root=root)
    assert table[["molecule", "model", "seed"]].values.tolist() == [["ethanol", "dimenet", 0]]
    assert table["checkpoint"].iloc[0] == str(meta_path.with_suffix(".pt"))
    with pytest.raises(KeyError, match="shipped molecules: \\['ethanol'\\]"):
        dz.shipped_checkpoints("benzene", root=root)


def test_the_shipped_fair_models_give_compression_curves_of_every_recipe():
    table = dz.shipped_checkpoints("malonaldehyde")
    assert {"dimenet", "dimezblnet", "dimezblnet_switched", "dimezblnet_interpolated"} <= set(table["model"])
    (curve,) = dz.checkpoint_compression_curves(table, [("C", "H")])
    assert {"DimeNet", "DimezblNet (switched)", "DimezblNet (interpolated)"} <= set(curve.columns)
    assert np.isfinite(curve.select_dtypes("number").to_numpy()).all()


def test_a_sample_mae_recorded_in_float32_is_not_checked_against_float64(tmp_path):
    """float32 rounding of the literal-ZBL models' cancelling terms differs between CPUs by ~1e-4 of the MAE:
    a potential whose sample MAE was recorded in float32 is refused by the check, and recording it again fixes it."""
    root = tmp_path / "potentials"
    shutil.copytree(dz.POTENTIALS_DIR / "qm9" / "U0", root / "qm9" / "U0")
    meta_path = root / "qm9" / "U0" / "dimenet" / "seed0.json"
    meta = json.loads(meta_path.read_text())
    del meta["sample_dtype"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="records its sample MAE in float32, not float64.*record_sample_mae"):
        dz.check_pretrained("qm9/U0/dimenet", 0, root=root)
    assert dz.record_sample_mae("qm9/U0/dimenet", 0, root=root) == pytest.approx(meta["sample_mae"], rel=1e-12)
    assert dz.check_pretrained("qm9/U0/dimenet", 0, root=root)["recomputed"] == pytest.approx(meta["sample_mae"])


def test_a_recipe_that_trained_bit_identically_ships_from_its_dimenet_twin(tmp_path):
    """Recipes (b) and (c) train exactly as DimeNet on data where their term is zero: where both checkpoints
    were shipped from their own runs the weights are equal; a recipe run whose checkpoint is gone ships from
    its twin's weights after the checks that make them its own, and a run that differs (the literal term) is
    refused."""
    for target in ("md17/malonaldehyde", "qm9/U0"):
        twin = torch.load(dz.POTENTIALS_DIR / target / "dimenet" / "seed0.pt", weights_only=True)
        for recipe in ("dimezblnet_switched", "dimezblnet_interpolated"):
            weights = torch.load(dz.POTENTIALS_DIR / target / recipe / "seed0.pt", weights_only=True)
            assert set(weights) - set(twin) == {"zbl.scale"} and set(twin) <= set(weights)
            assert all(torch.equal(weights[key], twin[key]) for key in twin)
    root = tmp_path / "potentials"
    cell = "md17/malonaldehyde"
    (root / cell).mkdir(parents=True)
    shutil.copytree(dz.POTENTIALS_DIR / cell / "dimenet", root / cell / "dimenet")
    shutil.copy(dz.POTENTIALS_DIR / cell / "test_sample.npz", root / cell)
    runs = dz.repository_path("results/fair/runs/fair/md17/malonaldehyde")
    meta_path = dz.ship_bit_identical_recipe(runs / "dimezblnet_switched_seed0", f"{cell}/dimenet", root=root)
    meta = json.loads(meta_path.read_text())
    assert meta["weights_from"]["name"] == f"{cell}/dimenet" and meta["config"]["model"]["zbl_reach"]
    assert dz.check_pretrained(f"{cell}/dimezblnet_switched", 0, root=root)
    assert dz.pretrained(f"{cell}/dimezblnet_switched", 0, root=root).model.zbl is not None
    with pytest.raises(ValueError, match=r"did not train bit-identically .*differs in offsets, test MAEs"):
        dz.ship_bit_identical_recipe(runs / "dimezblnet_seed0", f"{cell}/dimenet", root=root)
