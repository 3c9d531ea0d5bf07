"""Data tests: QM9 (size, split, methane's published values, units, atomization energies, cache), MD17 readers,
the GFN2-xTB generator (against direct tblite calls and finite differences), resume, and bad input."""

import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
import torch

import dimezbl as dz
import dimezbl_core as dc
from dimezbl import md17_generate
from dimezbl.data import LOG

HARTREE_TO_EV = 27.211386245988  # CODATA 2018, written out here so the test does not use the module's

# Methane, molecule 1 of QM9 (dsgdb9nsd_000001.xyz, Ramakrishnan et al., Sci. Data 1, 140022 (2014)), atomic units.
METHANE_PUBLISHED = {
    "mu": 0.0,
    "alpha": 13.21,
    "homo": -0.3877,
    "lumo": 0.1171,
    "gap": 0.5048,
    "r2": 35.3641,
    "zpve": 0.044749,
    "U0": -40.47893,
    "U": -40.476062,
    "H": -40.475117,
    "G": -40.498597,
    "cv": 6.469,
}
# QM9 atomref table (same paper), Hartree: U0, U, H, G of the free atoms H, C.
ATOMREF_H = {"U0": -0.500273, "U": -0.498857, "H": -0.497912, "G": -0.510927}
ATOMREF_C = {"U0": -37.846772, "U": -37.845355, "H": -37.844411, "G": -37.861317}


# --- QM9 ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qm9_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("qm9")


@pytest.fixture(scope="module")
def qm9(qm9_dir):
    return dz.load_qm9(qm9_dir)


def _qm9pack_csv(name):
    return dz.qm9_source_files()[name]


def test_qm9_has_130831_molecules_and_dimenet_split(qm9):
    assert len(qm9) == 130_831
    train, valid, test = dz.qm9_split()
    assert (len(train), len(valid), len(test)) == (110_000, 10_000, 10_831)
    assert (
        len(np.intersect1d(train, valid)) == len(np.intersect1d(train, test)) == len(np.intersect1d(valid, test)) == 0
    )
    assert np.array_equal(np.sort(np.concatenate([train, valid, test])), np.arange(130_831))
    assert np.array_equal(train[:5], np.random.RandomState(42).permutation(130_831)[:5])


def test_subset_split_takes_prefixes():
    split = dz.qm9_split()
    small = dz.subset_split(split, 100, 20, 30)
    for part, full, size in zip(small, split, (100, 20, 30)):
        assert np.array_equal(part, full[:size])
    assert len(dz.subset_split(split, None, None, None)[2]) == 10_831
    with pytest.raises(ValueError, match="n_test=20000"):
        dz.subset_split(split, 10, 10, 20_000)


def test_molecule_1_is_methane_with_published_values(qm9):
    methane = qm9[0]
    assert methane.z.tolist() == [6, 1, 1, 1, 1] and methane.z.dtype == torch.int64
    assert methane.pos.dtype == torch.float32 and methane.pos.shape == (5, 3)
    assert methane.y.shape == (1, 12) and methane.y.dtype == torch.float32
    assert int(methane.idx) == 0 and int(methane.gdb_id) == 1
    # the CSV's first atom (carbon), Angstrom
    assert torch.allclose(methane.pos[0], torch.tensor([-0.0126981359, 1.0858041578, 0.0080009958]), atol=1e-6)
    y = dict(zip(dz.QM9_TARGETS, methane.y[0].double().tolist()))
    assert y["mu"] == pytest.approx(0.0, abs=1e-6)
    assert y["alpha"] == pytest.approx(13.21, abs=1e-5)
    assert y["r2"] == pytest.approx(35.3641, abs=1e-4)
    assert y["cv"] == pytest.approx(6.469, abs=1e-5)
    for target in ("homo", "lumo", "gap", "zpve"):
        assert y[target] == pytest.approx(METHANE_PUBLISHED[target] * HARTREE_TO_EV, abs=2e-6)
    # HOMO of methane: -0.3877 Hartree = -10.5499 eV = -10549.9 meV
    assert y["homo"] == pytest.approx(-10.5499, abs=1e-4)
    assert dz.qm9_to_reporting_units(y["homo"], "homo") == pytest.approx(-10549.9, abs=0.1)
    # atomization energies: E(CH4) - E(C) - 4 E(H), Hartree -> eV (U0: -0.631066 Hartree = -17.1722 eV)
    for target in ("U0", "U", "H", "G"):
        expected = (METHANE_PUBLISHED[target] - ATOMREF_C[target] - 4 * ATOMREF_H[target]) * HARTREE_TO_EV
        assert y[target] == pytest.approx(expected, abs=1e-5), target
    assert y["U0"] == pytest.approx(-17.1722, abs=1e-4)


def test_methane_matches_the_raw_csv_row(qm9):
    row = pd.read_csv(_qm9pack_csv("qm9_part1.csv"), nrows=1).iloc[0]
    assert row["XYZ_file"] == "dsgdb9nsd_000001.xyz"
    for target, published in METHANE_PUBLISHED.items():
        column = dz.QM9_CSV_COLUMNS[target][0]
        assert row[column] == pytest.approx(published, abs=1e-9), column


def test_atomization_energies_of_the_first_2000_molecules(qm9):
    # independent of the module: python-level parsing of the raw CSV and the published atomrefs
    atomref = {
        "H": ATOMREF_H,
        "C": ATOMREF_C,
        "N": {"U0": -54.583861, "U": -54.582445, "H": -54.581501, "G": -54.598897},
        "O": {"U0": -75.064579, "U": -75.063163, "H": -75.062219, "G": -75.079532},
        "F": {"U0": -99.718730, "U": -99.717314, "H": -99.716370, "G": -99.733544},
    }
    rows = pd.read_csv(
        _qm9pack_csv("qm9_part1.csv"),
        nrows=2000,
        usecols=[
            "Elements",
            "InternalEnergy_0K_au",
            "InternalEnergy_298K_au",
            "Enthalphy_298K_au",
            "GibbsFreeEnergy_298K_au",
        ],
    )
    ours = qm9[np.arange(2000)].y.double().numpy()
    for target in ("U0", "U", "H", "G"):
        column = dz.QM9_CSV_COLUMNS[target][0]
        expected = [
            (energy - sum(atomref[s.strip("'")][target] for s in elements.strip("[]").split(","))) * HARTREE_TO_EV
            for elements, energy in zip(rows["Elements"], rows[column])
        ]
        np.testing.assert_allclose(ours[:, dz.QM9_TARGETS.index(target)], expected, atol=2e-5, err_msg=target)
    # sanity: QM9 U0 atomization energies are around -76 eV on average (DimeNet's data)
    assert -80 < qm9.y[:, dz.QM9_TARGETS.index("U0")].mean() < -70


def test_atomrefs_agree_with_pytorch_geometric():
    from torch_geometric.datasets.qm9 import atomrefs as pyg_atomrefs  # eV, targets 7..10 = U0, U, H, G

    for column, pyg_target in enumerate((7, 8, 9, 10)):
        ours = [dz.QM9_ATOMREF_HARTREE[z][column] * dc.HARTREE_TO_EV for z in (1, 6, 7, 8, 9)]
        np.testing.assert_allclose(ours, pyg_atomrefs[pyg_target], atol=1e-5)


def test_unit_conversions():
    assert dz.QM9_TARGETS == ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "cv")
    energy_like = {"homo", "lumo", "gap", "zpve", "U0", "U", "H", "G"}
    for target in dz.QM9_TARGETS:
        factor = 1000.0 if target in energy_like else 1.0
        assert dz.QM9_REPORTING_UNITS[target] == ("meV" if target in energy_like else dz.QM9_TRAINING_UNITS[target])
        assert dz.qm9_to_reporting_units(2.5, target) == pytest.approx(2.5 * factor)
        assert np.allclose(dz.qm9_to_reporting_units(np.array([1.0, -2.0]), target), [factor, -2 * factor])
        assert torch.allclose(dz.qm9_to_reporting_units(torch.tensor([0.5]), target), torch.tensor([0.5 * factor]))
    assert dz.QM9_TRAINING_UNITS["alpha"] == "bohr^3" and dz.QM9_TRAINING_UNITS["cv"] == "cal/(mol K)"
    assert dc.HARTREE_TO_EV == HARTREE_TO_EV
    with pytest.raises(ValueError, match="unknown QM9 target 'U_0'.*mu, alpha"):
        dz.qm9_to_reporting_units(1.0, "U_0")


def test_dataset_indexing(qm9):
    train, _, _ = dz.qm9_split()
    subset = qm9[train[:10]]
    assert len(subset) == 10 and int(subset[3].idx) == train[3]
    assert torch.equal(subset[3].y, qm9[int(train[3])].y)
    assert int(qm9[-1].gdb_id) == 133_885
    with pytest.raises(IndexError, match="130831"):
        qm9[130_831]
    mask = np.zeros(len(subset), dtype=bool)
    mask[[1, 4]] = True
    assert [int(item.idx) for item in (subset[mask][0], subset[mask][1])] == [train[1], train[4]]
    assert int(subset[2:5][0].idx) == train[2]
    from torch_geometric.loader import DataLoader

    batch = next(iter(DataLoader(subset, batch_size=4)))
    assert batch.y.shape == (4, 12) and batch.idx.tolist() == train[:4].tolist()
    assert batch.pos.shape[0] == sum(qm9[int(i)].z.numel() for i in train[:4])


def test_warm_load_reads_the_cache_without_parsing(qm9, qm9_dir, monkeypatch):
    def no_parsing(*args, **kwargs):
        raise AssertionError("the CSVs were parsed although a valid cache exists")

    monkeypatch.setattr(dz.data, "parse_qm9_csv", no_parsing)
    again = dz.load_qm9(qm9_dir)
    assert torch.equal(again.y, qm9.y)


def _corrupt_truncate(cache):
    payload = cache.read_bytes()
    cache.write_bytes(payload[: len(payload) // 2])


def _corrupt_garbage(cache):
    size = cache.stat().st_size
    cache.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def _corrupt_garbage_with_matching_sidecar(cache):
    # a payload whose recorded size and hash match but that is not a torch file: torch.load must reject it
    payload = b"not a torch file" * 1000
    cache.write_bytes(payload)
    sidecar = json.loads(cache.with_suffix(".json").read_text())
    sidecar.update(size_bytes=len(payload), sha256=dz.files.sha256_hex(payload))
    cache.with_suffix(".json").write_text(json.dumps(sidecar))


def _corrupt_stale_source(cache):
    sidecar = json.loads(cache.with_suffix(".json").read_text())
    sidecar["source_sizes_bytes"]["qm9_part1.csv"] += 1
    cache.with_suffix(".json").write_text(json.dumps(sidecar))


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_corrupt_truncate, "truncated"),
        (_corrupt_garbage, "sha256"),
        (_corrupt_garbage_with_matching_sidecar, "torch.load failed"),
        (_corrupt_stale_source, "CSV sizes changed"),
    ],
)
def test_bad_cache_is_rebuilt_with_a_message(qm9, qm9_dir, tmp_path, caplog, corrupt, reason):
    for name in (dz.QM9_CACHE_FILE, dz.QM9_CACHE_FILE.replace(".pt", ".json")):
        shutil.copy(qm9_dir / name, tmp_path / name)
    cache = tmp_path / dz.QM9_CACHE_FILE
    corrupt(cache)
    with caplog.at_level(logging.WARNING, logger="dimezbl.data"):
        rebuilt = dz.load_qm9(tmp_path)
    assert any("rebuilt" in record.getMessage() and reason in record.getMessage() for record in caplog.records)
    assert torch.equal(rebuilt.y, qm9.y) and rebuilt[0].z.tolist() == [6, 1, 1, 1, 1]
    assert cache.read_bytes() == (qm9_dir / dz.QM9_CACHE_FILE).read_bytes()  # a good cache again


def test_missing_qm9pack_gives_install_instructions(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "qm9pack" else real_find_spec(name, *args)
    )
    with pytest.raises(ModuleNotFoundError, match=r"make setup.*pip install qm9pack"):
        dz.load_qm9(tmp_path)


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("DIMEZBL_DATA_DIR", str(tmp_path / "env"))
    assert dz.data_dir_path() == tmp_path / "env"
    assert dz.data_dir_path(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DIMEZBL_DATA_DIR")
    assert dz.data_dir_path().name == "data" and (dz.data_dir_path().parent / "dimezbl_core.py").exists()


# --- MD17 readers ---------------------------------------------------------------------------------------------

ETHANOL_Z = np.array([6, 6, 8, 1, 1, 1, 1, 1, 1])


def _md17_arrays(n_frames=4, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "z": ETHANOL_Z,
        "R": rng.normal(size=(n_frames, 9, 3)),
        "E": rng.normal(-97000, 5, size=n_frames),
        "F": rng.normal(size=(n_frames, 9, 3)),
    }


@pytest.mark.parametrize("layout", ["sgdml_flat", "sgdml_column", "rmd17"])
def test_read_md17_npz_layouts(tmp_path, layout):
    a = _md17_arrays()
    path = tmp_path / f"{layout}.npz"
    if layout == "rmd17":
        np.savez(path, nuclear_charges=a["z"], coords=a["R"], energies=a["E"], forces=a["F"])
    else:
        energies = a["E"][:, None] if layout == "sgdml_column" else a["E"]
        np.savez(path, z=a["z"], R=a["R"], E=energies, F=a["F"], name=np.array("ethanol"))
    read = dz.read_md17_npz(path)
    assert read["layout"] == ("rmd17" if layout == "rmd17" else "sgdml")
    for key in ("z", "R", "E", "F"):
        np.testing.assert_array_equal(read[key], a[key])
    dataset = dz.load_md17("ethanol", source="npz", path=path)
    assert len(dataset) == 4
    item = dataset[2]
    assert item.z.tolist() == ETHANOL_Z.tolist() and item.pos.dtype == torch.float32
    assert item.energy.shape == (1,) and item.energy.dtype == torch.float64 and float(item.energy) == a["E"][2]
    assert item.forces.shape == (9, 3) and torch.allclose(item.forces, torch.tensor(a["F"][2], dtype=torch.float32))
    assert len(dataset[np.array([0, 3])]) == 2 and float(dataset[np.array([0, 3])][1].energy) == a["E"][3]


def test_md17_npz_with_missing_keys(tmp_path):
    a = _md17_arrays()
    path = tmp_path / "missing.npz"
    np.savez(path, z=a["z"], R=a["R"], E=a["E"])
    with pytest.raises(ValueError, match=r"missing keys \['F'\].*holds \['E', 'R', 'z'\]"):
        dz.read_md17_npz(path)


@pytest.mark.parametrize("field, value", [("E", np.nan), ("F", np.inf), ("R", -np.inf)])
def test_md17_npz_with_non_finite_values_names_file_key_and_configuration(tmp_path, field, value):
    a = _md17_arrays()
    a[field] = a[field].copy()
    a[field][2] = value  # every entry of configuration 2
    a[field].reshape(len(a[field]), -1)[3, 0] = value  # one entry of configuration 3 (a view)
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(ValueError, match=rf"bad.npz: {field} of configuration 2 is not finite .*2 configuration"):
        dz.read_md17_npz(path)


def test_truncated_md17_npz_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.npz"
    np.savez(path, **_md17_arrays())
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cut.npz is not a readable npz file.*re-download or regenerate"):
        dz.read_md17_npz(path)


@pytest.mark.parametrize(
    "field, bad, message",
    [
        ("F", lambda a: a["F"][:, :8], "forces have shape"),
        ("E", lambda a: a["E"][:3], "energies have shape"),
        ("R", lambda a: a["R"][:, :, :2], "positions have shape"),
        ("z", lambda a: a["z"][:5], "positions have shape"),
        ("z", lambda a: a["z"].astype(float), "atomic numbers must be positive integers"),
    ],
)
def test_md17_npz_with_inconsistent_shapes(tmp_path, field, bad, message):
    a = _md17_arrays()
    a[field] = bad(a)
    path = tmp_path / "bad.npz"
    np.savez(path, **a)
    with pytest.raises(ValueError, match=message):
        dz.read_md17_npz(path)


def test_md17_bad_files_and_names(tmp_path):
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    with pytest.raises(ValueError, match="not a readable npz"):
        dz.read_md17_npz(not_npz)
    single_array = tmp_path / "single.npz"
    with open(single_array, "wb") as handle:
        np.save(handle, np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        dz.read_md17_npz(single_array)
    with pytest.raises(FileNotFoundError, match="generate-md17 --molecule ethanol"):
        dz.load_md17("ethanol", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="quantum-machine.org"):
        dz.load_md17("ethanol", source="npz", data_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown MD17 molecule 'paracetamol'.*aspirin, benzene, ethanol"):
        dz.load_md17("paracetamol")
    with pytest.raises(ValueError, match="unknown MD17 molecule"):
        dz.generate_md17("caffeine", 3)
    with pytest.raises(ValueError, match="unknown MD17 source 'web'"):
        dz.load_md17("ethanol", source="web")
    assert dz.md17_molecule_name("Salicylic acid") == "salicylic_acid"
    a = _md17_arrays()
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, **a)
    with pytest.raises(ValueError, match="holds C2H6O, but benzene is C6H6"):
        dz.load_md17("benzene", source="npz", path=wrong)


def test_pyg_source_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known (simulated)")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError) as error:
        dz.load_md17("salicylic_acid", source="pyg", data_dir=tmp_path)
    message = str(error.value)
    assert "md17_salicylic.npz" in message and str(tmp_path / "md17" / "pyg" / "salicylic acid" / "raw") in message
    assert "generate-md17 --molecule salicylic_acid" in message and "source='npz'" in message
    assert error.value.__cause__ is None and error.value.__suppress_context__


def _network_reachable():
    try:
        socket.create_connection(("quantum-machine.org", 80), timeout=3).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(_network_reachable(), reason="the machine is online: the real download would run")
def test_pyg_source_fails_fast_when_really_offline(tmp_path):
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="could not download MD17 'ethanol'"):
        dz.load_md17("ethanol", source="pyg", data_dir=tmp_path)
    assert time.perf_counter() - start < 45  # at most the socket timeout, not a hang


def test_md17_split():
    train, valid, test = dz.md17_split(5000, n_train=1000, n_valid=1000, seed=1)
    assert (len(train), len(valid), len(test)) == (1000, 1000, 3000)
    assert len(np.unique(np.concatenate([train, valid, test]))) == 5000
    assert np.array_equal(train, dz.md17_split(5000, seed=1)[0])
    assert not np.array_equal(train, dz.md17_split(5000, seed=2)[0])
    with pytest.raises(ValueError, match="n_total=1500"):
        dz.md17_split(1500)
    assert [len(s) for s in dz.md17_split(10, n_train=5, n_valid=2)] == [5, 2, 3]


# --- MD17 generator -------------------------------------------------------------------------------------------

GENERATOR_SETTINGS = {"equilibration_steps": 20, "sample_every": 5, "seed": 7, "progress": False}


def _xtb_kcal(z, positions_a, accuracy=1.0):
    """Direct tblite call (no ASE): energy kcal/mol, forces kcal/mol/A, with ASE's unit constants."""
    from ase import units
    from tblite.interface import Calculator

    calc = Calculator("GFN2-xTB", z, positions_a / units.Bohr)
    calc.set("verbosity", 0)
    calc.set("accuracy", accuracy)
    result = calc.singlepoint()
    hartree_in_kcal = units.Hartree / (units.kcal / units.mol)
    return result.get("energy") * hartree_in_kcal, -result.get("gradient") * hartree_in_kcal / units.Bohr


@pytest.fixture(scope="module")
def ethanol_5(tmp_path_factory):
    out = tmp_path_factory.mktemp("md17") / "ethanol.npz"
    return dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)


def test_generated_ethanol_layout_and_sidecar(ethanol_5):
    with np.load(ethanol_5) as npz:
        assert npz["E"].shape == (5, 1) and npz["F"].shape == npz["R"].shape == (5, 9, 3)
        assert sorted(npz["z"].tolist()) == sorted(ETHANOL_Z.tolist())
        assert str(npz["name"]) == "ethanol" and "GFN2-xTB" in str(npz["theory"])
        assert npz["md_step"].tolist() == [25, 30, 35, 40, 45]
    meta = json.loads(ethanol_5.with_suffix(".json").read_text())
    assert meta["method"] == "GFN2-xTB" and meta["temperature_k"] == 500.0 and meta["timestep_fs"] == 0.5
    assert meta["seed"] == 7 and meta["n_configs"] == 5 and meta["sample_every"] == 5
    assert {"tblite", "ase", "numpy"} <= set(meta["software"]) and "not the DFT data" in meta["note"]
    dataset = dz.load_md17("ethanol", path=ethanol_5)
    assert len(dataset) == 5 and dataset[0].forces.shape == (9, 3)
    assert meta["openblas_core"] == md17_generate.openblas_core()  # the kernels the start geometry ran on


def test_the_blas_kernels_are_recorded_and_other_ones_warned_about(caplog):
    """Other OpenBLAS kernels give another trajectory: the generator names the kernels it ran on, and warns where
    they are not those of the committed sets, naming the setting that selects them."""
    core = md17_generate.openblas_core()
    if core is None:
        pytest.skip("numpy here bundles no OpenBLAS that names its kernels")
    forced = subprocess.run(
        [sys.executable, "-c", "from dimezbl.md17_generate import openblas_core; print(openblas_core())"],
        env={**os.environ, "OPENBLAS_CORETYPE": "Prescott"},  # SSE3 kernels: every x86-64 CPU runs them
        capture_output=True,
        text=True,
        check=True,
    )
    assert forced.stdout.strip() not in ("", "None", md17_generate.COMMITTED_SETS_BLAS_CORE)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        md17_generate._warn_about_other_blas_kernels(md17_generate.COMMITTED_SETS_BLAS_CORE)
        assert not caplog.records
        md17_generate._warn_about_other_blas_kernels("SkylakeX")
    assert "SkylakeX kernels" in caplog.text and "OPENBLAS_CORETYPE=Haswell" in caplog.text


def test_generated_energies_and_forces_match_direct_tblite(ethanol_5):
    data = dz.read_md17_npz(ethanol_5)
    for positions, energy, forces in zip(data["R"], data["E"], data["F"]):
        direct_energy, direct_forces = _xtb_kcal(data["z"], positions)
        assert energy == pytest.approx(direct_energy, abs=1e-5)  # kcal/mol
        # the MD reuses the previous wavefunction as SCF guess: forces agree to SCF convergence (~2e-3)
        np.testing.assert_allclose(forces, direct_forces, atol=1e-2)
    assert np.abs(data["F"]).max() > 1.0  # not a trivially zero force field


def test_generated_forces_are_minus_the_energy_gradient(ethanol_5):
    data = dz.read_md17_npz(ethanol_5)
    positions, step_a = data["R"][2], 1e-3
    numerical = np.zeros_like(positions)
    for atom in range(len(positions)):
        for axis in range(3):
            plus, minus = positions.copy(), positions.copy()
            plus[atom, axis] += step_a
            minus[atom, axis] -= step_a
            numerical[atom, axis] = -(_xtb_kcal(data["z"], plus, 1e-3)[0] - _xtb_kcal(data["z"], minus, 1e-3)[0]) / (
                2 * step_a
            )
    np.testing.assert_allclose(data["F"][2], numerical, atol=1e-2)  # kcal/mol/A; |F| up to ~30


def test_content_sha256_identifies_the_data(ethanol_5, tmp_path):
    """The digest recorded in provenance: equal for the same values from another file (and for a
    fresh generation with the same settings: the generator is deterministic), different when one
    value changes, and the whole set's for every view of it."""
    dataset = dz.load_md17("ethanol", path=ethanol_5)
    digest = dataset.content_sha256()
    assert len(digest) == 64 and dataset[1:3].content_sha256() == digest
    again = dz.generate_md17(
        "ethanol", 5, out_path=tmp_path / "again" / "ethanol.npz", resume=False, **GENERATOR_SETTINGS
    )
    assert dz.load_md17("ethanol", path=again).content_sha256() == digest
    arrays = dz.read_md17_npz(ethanol_5)
    arrays["E"] = arrays["E"].copy()
    arrays["E"][4] += 1e-9  # kcal/mol
    changed = tmp_path / "changed" / "ethanol.npz"
    changed.parent.mkdir()
    np.savez(changed, **arrays)
    assert dz.load_md17("ethanol", path=changed).content_sha256() != digest


def test_generator_resumes_instead_of_restarting(ethanol_5, tmp_path, caplog):
    out = tmp_path / "ethanol.npz"
    dz.generate_md17("ethanol", 3, out_path=out, **GENERATOR_SETTINGS)
    first = dz.read_md17_npz(out)
    straight = dz.read_md17_npz(ethanol_5)
    np.testing.assert_array_equal(first["R"], straight["R"][:3])  # same seed, same path
    # mark the checkpoint: a resumed run keeps it, a restarted one would recompute configuration 0
    state_path = out.with_name("ethanol.state.npz")
    with np.load(state_path) as npz:
        state = {key: npz[key] for key in npz.files}
    state["E"] = state["E"].copy()
    state["E"][0] = 12345.0
    np.savez(state_path, **state)
    with caplog.at_level(logging.INFO, logger="dimezbl.data"):
        dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)
    resumed = dz.read_md17_npz(out)
    assert resumed["E"][0] == 12345.0 and resumed["E"].shape == (5,)
    np.testing.assert_array_equal(resumed["R"][1:3], straight["R"][1:3])
    assert json.loads(out.with_suffix(".json").read_text())["resumed_from_configs"] == 3
    assert any("resuming from 3 configurations" in record.getMessage() for record in caplog.records)
    # the continued trajectory is the uninterrupted one, bit for bit (stored wavefunction and RNG state)
    for key in ("R", "E", "F"):
        np.testing.assert_array_equal(resumed[key][3:], straight[key][3:])
    np.testing.assert_array_equal(dz.read_md17_npz(out)["R"].shape, (5, 9, 3))
    # other settings or resume=False start over
    with caplog.at_level(logging.WARNING, logger="dimezbl.data"):
        dz.generate_md17("ethanol", 2, out_path=out, **{**GENERATOR_SETTINGS, "seed": 8})
    assert any("other settings (seed)" in record.getMessage() for record in caplog.records)
    dz.generate_md17("ethanol", 3, out_path=out, resume=False, **GENERATOR_SETTINGS)
    np.testing.assert_array_equal(dz.read_md17_npz(out)["E"], straight["E"][:3])


def test_interrupted_generation_keeps_its_configurations(ethanol_5, tmp_path, monkeypatch):
    from ase.md.langevin import Langevin

    real_run, calls = Langevin.run, []

    def run_then_interrupt(self, steps):
        calls.append(steps)
        if len(calls) == 4:  # equilibration + 2 sampled configurations, then Ctrl-C
            raise KeyboardInterrupt
        return real_run(self, steps)

    out = tmp_path / "ethanol.npz"
    monkeypatch.setattr(Langevin, "run", run_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)
    assert not out.exists()  # no final file from an interrupted run, only the checkpoint
    with np.load(out.with_name("ethanol.state.npz")) as state:
        assert state["E"].shape == (2,)
    monkeypatch.setattr(Langevin, "run", real_run)
    dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["resumed_from_configs"] == 2 and sidecar["resumed_at_configs"] == [2]
    assert sidecar["bit_identical_to_an_uninterrupted_run"] is True
    straight_sidecar = json.loads(ethanol_5.with_suffix(".json").read_text())
    assert straight_sidecar["resumed_at_configs"] == [] and straight_sidecar["bit_identical_to_an_uninterrupted_run"]
    # kill and resume gives the uninterrupted data set: same content sha256
    assert (
        dz.load_md17("ethanol", path=out).content_sha256() == dz.load_md17("ethanol", path=ethanol_5).content_sha256()
    )


def test_interrupt_inside_an_md_step_resumes_from_the_last_boundary(ethanol_5, tmp_path, monkeypatch):
    from ase.md.langevin import Langevin

    real_step, steps = Langevin.step, []

    def step_then_interrupt(self, forces=None):
        steps.append(1)
        result = real_step(self, forces)
        if len(steps) == GENERATOR_SETTINGS["equilibration_steps"] + 7:  # inside configuration 2's MD run
            raise KeyboardInterrupt
        return result

    out = tmp_path / "ethanol.npz"
    monkeypatch.setattr(Langevin, "step", step_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)
    monkeypatch.setattr(Langevin, "step", real_step)
    dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)
    resumed, straight = dz.read_md17_npz(out), dz.read_md17_npz(ethanol_5)
    for key in ("R", "E", "F"):
        np.testing.assert_array_equal(resumed[key], straight[key])


def test_checkpoint_with_a_corrupt_wavefunction_resumes_from_the_sad_guess(ethanol_5, tmp_path, caplog):
    out = tmp_path / "ethanol.npz"
    dz.generate_md17("ethanol", 2, out_path=out, **GENERATOR_SETTINGS)
    state_path = out.with_name("ethanol.state.npz")
    with np.load(state_path) as npz:
        state = {key: npz[key] for key in npz.files}
    state["wavefunction_npz"] = np.frombuffer(b"not a wavefunction", dtype=np.uint8)
    np.savez(state_path, **state)
    with caplog.at_level(logging.WARNING, logger="dimezbl.data"):
        dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)
    assert any("wavefunction does not load" in record.getMessage() for record in caplog.records)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["resumed_at_configs"] == [2] and sidecar["bit_identical_to_an_uninterrupted_run"] is False
    np.testing.assert_allclose(dz.read_md17_npz(out)["R"], dz.read_md17_npz(ethanol_5)["R"], atol=1e-5)


def test_checkpoint_without_wavefunction_resumes_and_says_so(ethanol_5, tmp_path):
    out = tmp_path / "ethanol.npz"
    dz.generate_md17("ethanol", 2, out_path=out, **GENERATOR_SETTINGS)
    state_path = out.with_name("ethanol.state.npz")
    with np.load(state_path) as npz:  # the layout of checkpoints written before the wavefunction was stored
        state = {
            key: npz[key]
            for key in npz.files
            if key == "resumed_at" or not key.startswith(("calc_", "wave", "inexact"))
        }
    np.savez(state_path, **state)
    dz.generate_md17("ethanol", 5, out_path=out, **GENERATOR_SETTINGS)
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["resumed_at_configs"] == [2] and sidecar["bit_identical_to_an_uninterrupted_run"] is False
    assert "SAD guess" in sidecar["resume_note"]
    resumed, straight = dz.read_md17_npz(out), dz.read_md17_npz(ethanol_5)
    np.testing.assert_array_equal(resumed["R"][:2], straight["R"][:2])
    np.testing.assert_allclose(resumed["R"], straight["R"], atol=1e-5)  # the same trajectory to ~1e-5 A


@pytest.mark.parametrize("molecule", dz.MD17_MOLECULES)
def test_start_geometries_have_the_right_bonds(molecule):
    atoms, source = dz.md17_start_geometry(molecule)
    rings = {
        "aspirin": 1,
        "benzene": 1,
        "ethanol": 0,
        "malonaldehyde": 0,
        "naphthalene": 2,
        "salicylic_acid": 1,
        "toluene": 1,
        "uracil": 1,
    }[molecule]
    bonds = dz.bond_graph(atoms)
    assert atoms.get_chemical_formula(mode="hill") == dz.MD17_FORMULAS[molecule]
    assert len(bonds) == len(atoms) - 1 + rings  # a connected molecule with that many rings
    reached, frontier = {0}, [0]
    while frontier:
        atom = frontier.pop()
        for i, j in bonds:
            for a, b in ((i, j), (j, i)):
                if a == atom and b not in reached:
                    reached.add(b)
                    frontier.append(b)
    assert reached == set(range(len(atoms)))
    assert ("ase.build" in source) == (molecule in ("benzene", "ethanol"))


@pytest.mark.parametrize("molecule", ["malonaldehyde", "uracil", "salicylic_acid"])
def test_hand_built_geometries_survive_gfn2_optimisation(molecule):
    atoms, _ = dz.optimise_md17_geometry(molecule)  # raises if the bonding changed
    assert np.abs(atoms.get_forces()).max() < 0.05


def test_generate_md17_command_line(tmp_path):
    assert (
        dz.generate_md17_main(
            [
                "--molecule",
                "ethanol",
                "--n-configs",
                "2",
                "--equilibration-steps",
                "4",
                "--sample-every",
                "2",
                "--data-dir",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    assert dz.read_md17_npz(tmp_path / "md17" / "generated" / "ethanol.npz")["E"].shape == (2,)
    with pytest.raises(SystemExit):
        dz.generate_md17_main(["--all", "--out", str(tmp_path / "x.npz")])


def test_without_qm9pack_a_verified_cache_is_used_and_a_corrupt_one_named(qm9, qm9_dir, tmp_path, monkeypatch, caplog):
    # a machine without qm9pack (a GPU node) uses a cache copied from elsewhere, verified as usual
    for name in (dz.QM9_CACHE_FILE, dz.QM9_CACHE_FILE.replace(".pt", ".json")):
        shutil.copy(qm9_dir / name, tmp_path / name)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "qm9pack" else real_find_spec(name, *args)
    )
    with caplog.at_level(logging.WARNING, logger="dimezbl.data"):
        copied = dz.load_qm9(tmp_path)
    assert torch.equal(copied.y, qm9.y) and len(copied) == dz.QM9_NUM_MOLECULES
    assert any("qm9pack is not installed" in record.getMessage() for record in caplog.records)
    _corrupt_truncate(tmp_path / dz.QM9_CACHE_FILE)
    with pytest.raises(ModuleNotFoundError, match=r"pip install qm9pack.*copy a QM9 cache.*truncated"):
        dz.load_qm9(tmp_path)
