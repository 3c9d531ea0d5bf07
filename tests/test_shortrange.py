"""The short-range experiment: the unphysical-state detector on hand-made geometries, the GFN2-xTB
column of the compression curve against direct tblite single points, MD stability tables with
their provenance header, and the error when the checkpoints of `make reproduce` are missing."""

import numpy as np
import pandas as pd
import pytest
import torch
from ase import units

import dimezbl as dz


@pytest.fixture(scope="module")
def ethanol():
    return dz.md17_start_geometry("ethanol")[0]


@pytest.fixture(scope="module")
def ethanol_checkpoints(ethanol_smoke_run, tmp_path_factory):
    """The smoke-trained ethanol DimeNet, and a DimezblNet made from it by adding the ZBL term
    (the same network weights; ZBL scale 1): a checkpoints table as `shortrange_checkpoints` gives."""
    config, _ = ethanol_smoke_run
    dimenet = config.run_dir / "checkpoint_best.pt"
    checkpoint = torch.load(dimenet, weights_only=True)
    checkpoint["config"] = {**checkpoint["config"], "zbl": True}
    for key in ("model", "ema"):
        if key in checkpoint:
            checkpoint[key] = {**checkpoint[key], "zbl.scale": torch.ones(())}
    dimezblnet = tmp_path_factory.mktemp("dimezblnet") / "checkpoint_best.pt"
    dz.atomic_torch_save(checkpoint, dimezblnet)
    return pd.DataFrame(
        [
            {
                "molecule": "ethanol",
                "model": "dimenet",
                "checkpoint": str(dimenet),
                "run_dir": str(config.run_dir),
                "profile": "smoke",
                "git_commit": "abc123",
            },
            {
                "molecule": "ethanol",
                "model": "dimezblnet",
                "checkpoint": str(dimezblnet),
                "run_dir": str(dimezblnet.parent),
                "profile": "smoke",
                "git_commit": "abc123",
            },
        ]
    )


def moved(atoms, index, new_position):
    positions = atoms.get_positions()
    positions[index] = new_position
    return positions


def test_unphysical_state_on_hand_made_geometries(ethanol):
    symbols = ethanol.get_chemical_symbols()
    c, h = symbols.index("C"), symbols.index("H")
    bonds = dz.bond_graph(ethanol)
    bonded_h = next(j for i, j in sorted(bonds) if i == c and symbols[j] == "H")
    positions = ethanol.get_positions()
    assert dz.unphysical_state(positions, ethanol) is None  # the start itself
    rattled = positions + np.random.default_rng(0).normal(scale=0.05, size=positions.shape)
    assert dz.unphysical_state(rattled, ethanol) is None  # thermal-size displacements
    # an atom 0.4 A from another
    direction = positions[h] - positions[c]
    close = moved(ethanol, h, positions[c] + 0.4 * direction / np.linalg.norm(direction))
    assert dz.unphysical_state(close, ethanol).startswith("close contact")
    # a C-H bond stretched to 2.1x its length (the H far from everything else)
    stretch = positions[bonded_h] - positions[c]
    far = moved(ethanol, bonded_h, positions[c] + 2.1 * stretch)
    reason = dz.unphysical_state(far, ethanol)
    assert reason.startswith("bond broken") and f"{c}-{bonded_h}" in reason
    within = moved(ethanol, bonded_h, positions[c] + 1.9 * stretch)
    assert not (dz.unphysical_state(within, ethanol) or "").startswith("bond broken")
    # two hydrogens of one carbon at 0.6 A: a new H-H bond (not a close contact)
    other_h = next(j for i, j in sorted(bonds) if i == c and symbols[j] == "H" and j != bonded_h)
    toward = positions[other_h] - positions[bonded_h]
    new_bond = moved(ethanol, other_h, positions[bonded_h] + 0.6 * toward / np.linalg.norm(toward))
    assert dz.unphysical_state(new_bond, ethanol).startswith("new bond")
    assert dz.unphysical_state(np.full_like(positions, np.nan), ethanol).startswith("not finite")


def test_element_pair_bonds_one_per_pair_with_hydrogen_moving():
    uracil = dz.md17_start_geometry("uracil")[0]
    symbols = uracil.get_chemical_symbols()
    bonds = dz.element_pair_bonds(uracil)
    pairs = ["-".join(sorted((symbols[i], symbols[j]))) for i, j in bonds]
    assert pairs == sorted(set(pairs)) and {"C-H", "C-C", "C-N", "C-O", "H-N"} <= set(pairs)
    assert all(symbols[j] == "H" for i, j in bonds if "H" in (symbols[i], symbols[j]))
    assert all(tuple(sorted(b)) in dz.bond_graph(uracil) for b in bonds)


def test_xtb_column_equals_direct_tblite_single_points(ethanol_checkpoints, ethanol):
    from tblite.ase import TBLite

    dimezblnet = ethanol_checkpoints["checkpoint"].iloc[1]
    distances = np.array([0.6, 1.0, 1.5])
    curve = dz.compression_curve_with_reference(
        dimezblnet, ("C", "H"), ethanol, distances, dimenet_checkpoint=ethanol_checkpoints["checkpoint"].iloc[0]
    )
    assert curve.attrs["unit"] == "kcal/mol"
    assert {"distance_a", "DimezblNet", "DimeNet", "GFN2-xTB"} <= set(curve.columns)
    i, j = dz.compression._bond_atoms(ethanol, ("C", "H"))
    unit_vector = (ethanol.positions[j] - ethanol.positions[i]) / ethanol.get_distance(i, j)

    def direct_ev(r):
        atoms = ethanol.copy()
        atoms.positions[j] = atoms.positions[i] + r * unit_vector
        atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
        return atoms.get_potential_energy()

    r0_ev = direct_ev(ethanol.get_distance(i, j))
    for k in (0, 2):
        expected = (direct_ev(distances[k]) - r0_ev) / (units.kcal / units.mol)
        assert curve["GFN2-xTB"].iloc[k] == pytest.approx(expected, rel=1e-8, abs=1e-6)
    assert curve["GFN2-xTB"].iloc[0] > 50.0  # kcal/mol: compressing C-H to 0.6 A costs a lot


def test_md_stability_tables_and_figures(ethanol_checkpoints, tmp_path):
    """1 molecule x 1 temperature x 2 models (+ the GFN2-xTB reference) x 2 ensembles, 20 steps."""
    result = dz.shortrange_experiment(
        "smoke",
        ["ethanol"],
        checkpoints=ethanol_checkpoints,
        seeds=[0],
        n_steps=20,
        temperatures_k=[500.0],
        compression=False,
        results_dir=tmp_path,
        progress=False,
    )
    trajectories = result["trajectories"]
    assert len(trajectories) == 6 and set(trajectories["model"]) == {"dimenet", "dimezblnet", "gfn2-xtb"}
    summary = pd.read_csv(tmp_path / "shortrange" / "md_stability.csv", comment="#")
    assert list(summary.columns) == [
        "model",
        "ensemble",
        "temperature_k",
        "molecules",
        "trajectories",
        "unphysical",
        "unphysical_percent",
        "median_failure_time_fs",
        "reasons",
        "median_abs_drift_ev_atom_ps",
        "max_energy_error_ev_atom",
        "simulated_time_fs",
    ]
    assert len(summary) == 6 and (summary["trajectories"] == 1).all() and (summary["simulated_time_fs"] == 10).all()
    # 10 fs of NVE at 500 K from the xTB minimum: GFN2-xTB conserves energy
    xtb_nve = trajectories[(trajectories["model"] == "gfn2-xtb") & (trajectories["ensemble"] == "nve")].iloc[0]
    assert not xtb_nve["unphysical"] and xtb_nve["max_energy_error_ev_atom"] < 1e-3
    header = [
        line for line in (tmp_path / "shortrange" / "md_stability.md").read_text().splitlines() if line.startswith("- ")
    ]
    for field in ("Checkpoints:", "Budget:", "Reference:", "Unphysical state:", "Hardware:", "Written at git commit"):
        assert any(line.startswith(f"- {field}") for line in header), field
    budget = next(line for line in header if line.startswith("- Budget:"))
    assert "seeds 0" in budget and "steps 20" in budget and "500 K" in budget
    assert "profile smoke" in header[1] and "abc123" in header[1]
    per_trajectory = pd.read_csv(tmp_path / "shortrange" / "md_trajectories.csv", comment="#")
    assert len(per_trajectory) == 6 and "reason" in per_trajectory
    assert (tmp_path / "figures" / "shortrange_md_stability.png").stat().st_size > 10_000


def test_md_trajectory_flags_a_molecule_torn_apart(ethanol_checkpoints):
    """At 100,000 K bonds break within a few fs; the trajectory stops and says why."""
    calculator = dz.DimezblCalculator.from_checkpoint(ethanol_checkpoints["checkpoint"].iloc[0])
    atoms = dz.md17_start_geometry("ethanol")[0]
    result = dz.md_trajectory(atoms, calculator, "nve", temperature_k=1e5, seed=0, n_steps=200, check_every=5)
    assert result["unphysical"] and result["steps"] < 200
    assert result["reason"].split(":")[0] in ("bond broken", "close contact", "new bond", "calculator error")
    assert result["failure_time_fs"] == result["steps"] * 0.5


def test_missing_checkpoints_name_make_reproduce(tmp_path):
    with pytest.raises(FileNotFoundError, match="make reproduce PROFILE=smoke"):
        dz.shortrange_checkpoints("smoke", ["ethanol"], results_dir=tmp_path)
    assert (
        dz.shortrange_main(
            ["--profile", "smoke", "--molecules", "ethanol", "--results-dir", str(tmp_path), "--no-progress"]
        )
        == 2
    )


def test_the_seed_committee_records_its_spread_and_whether_it_warned_before_the_failure(ethanol_checkpoints):
    """The committee watches the driving model's trajectory: identical members never warn, differing ones (here
    the DimeNet and the DimezblNet made from it) warn as soon as their spread exceeds the threshold."""
    paths = list(ethanol_checkpoints["checkpoint"])
    driver = dz.DimezblCalculator.from_checkpoint(paths[0])
    atoms = dz.md17_start_geometry("ethanol")[0]
    same = dz.DimezblCommittee.from_checkpoints([paths[0], paths[0]])
    quiet = dz.md_trajectory(
        atoms, driver, "nve", temperature_k=1e5, seed=0, n_steps=200, check_every=5, committee=same
    )
    assert quiet["unphysical"] and quiet["max_force_deviation_ev_a"] < 1e-9
    assert np.isnan(quiet["first_warning_time_fs"]) and quiet["warned_before_failure"] is False
    differing = dz.DimezblCommittee.from_checkpoints(paths)
    loud = dz.md_trajectory(atoms, driver, "nve", temperature_k=1e5, seed=0, n_steps=200, check_every=5,
                            committee=differing, warning_ev_a=1e-6)  # fmt: skip
    assert loud["max_force_deviation_ev_a"] > 1e-6 and loud["first_warning_time_fs"] == 0.0
    assert loud["warned_before_failure"] is True and loud["steps"] == quiet["steps"]  # the committee only watches
    calm = dz.md_trajectory(atoms, driver, "nve", temperature_k=300.0, seed=0, n_steps=10, check_every=5,
                            committee=differing, warning_ev_a=1e6)  # fmt: skip
    assert not calm["unphysical"] and np.isnan(calm["warned_before_failure"])


def test_md_stability_summarises_the_committee(ethanol_checkpoints):
    paths = list(ethanol_checkpoints["checkpoint"])
    trajectories = dz.md_stability(ethanol_checkpoints, ["ethanol"], temperatures_k=[1e5], ensembles=["nve"],
                                   seeds=[0], n_steps=100, reference=False, progress=False,
                                   committees={("ethanol", "dimenet"): paths}, warning_ev_a=1e-6)  # fmt: skip
    dimenet = trajectories[trajectories["model"] == "dimenet"].iloc[0]
    assert dimenet["warned_before_failure"] is True or dimenet["warned_before_failure"] == True  # noqa: E712
    assert np.isnan(trajectories[trajectories["model"] == "dimezblnet"].iloc[0]["max_force_deviation_ev_a"])
    summary = dz.summarize_md_stability(trajectories)
    row = summary[summary["model"] == "DimeNet"].iloc[0]
    assert row["committee_warned_before_failure"] == "1 of 1" and row["committee_false_warnings"] == 0
