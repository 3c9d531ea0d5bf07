"""The fair test's pieces: per-element offsets, matched start, compressed schedule, recipe (c)'s switch,
the paired statistics."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.data import Data

import dimezbl as dz
import dimezbl_core as dc
from dimezbl import fair

# --- per-element offset -------------------------------------------------------------------------------------


def test_per_element_least_squares_recovers_known_energies():
    """Energies built as sum_i e_Z(i) (+ 1 meV noise) of random H/C/N/O/F compositions give back e_Z."""
    rng = np.random.default_rng(0)
    reference = {1: -13.6, 6: -1029.9, 7: -1485.3, 8: -2042.6, 9: -2713.5}  # eV, QM9-like magnitudes
    samples, energies = [], []
    for _ in range(200):
        z = rng.choice(list(reference), size=rng.integers(3, 20))
        samples.append(Data(z=torch.as_tensor(z)))
        energies.append(sum(reference[int(v)] for v in z) + rng.normal(0, 1e-3))
    table = dz.per_element_least_squares(samples, torch.tensor(energies, dtype=torch.float64))
    assert table.shape == (dc.MAX_ATOMIC_NUMBER + 1,)
    for z, value in reference.items():
        assert table[z] == pytest.approx(value, abs=1e-3)
    assert np.count_nonzero(table) == len(reference)  # elements that never occur get 0


def test_per_element_offset_is_subtracted_per_atom():
    offset = dz.target_offset(
        [
            Data(z=torch.tensor([1, 1, 8]), energy=torch.tensor([-3.0])),
            Data(z=torch.tensor([1, 8, 8]), energy=torch.tensor([-5.0])),
        ],
        None,
        "per_element",
    )
    # 2 e_H + e_O = -3, e_H + 2 e_O = -5
    assert offset[2][1] == pytest.approx(-1 / 3) and offset[2][8] == pytest.approx(-7 / 3)
    energies = dz.offset_energies(offset, torch.tensor([1, 8, 6]), torch.tensor([0, 0, 1]), 2)
    assert energies.tolist() == pytest.approx([-8 / 3, 0.0])
    assert dz.resolve_offset_kind("per_element", dz.QM9_TARGETS.index("homo")) == "mean"  # intensive target
    assert dz.resolve_offset_kind("per_element", dz.QM9_TARGETS.index("U0")) == "per_element"


def _start_residual(config):
    """Validation MAE of a freshly built model (its network part is zero at step 0)."""
    torch.manual_seed(0)
    model = dz.build_model(config)
    data = dz.RunData(config, model.zbl)
    return dz.evaluate(model, data, data.valid, torch.device("cpu"))


@pytest.mark.parametrize("dataset,target", [("qm9", "U0"), ("md17", "ethanol")])
def test_models_start_at_residuals_of_the_same_size(dataset, target, ethanol_smoke_data):
    """Recipes (b) and (c) start within 10% of DimeNet's residual; the literal term (a) cannot: its
    geometry-dependent part (std ~26-47 kcal/mol over MD17 configurations) is beyond any linear offset."""
    sizes = dict(n_train=2000, n_valid=500, n_test=100) if dataset == "qm9" else dict(n_train=200, n_valid=50)
    extra = dict(data_dir=str(ethanol_smoke_data / "data")) if dataset == "md17" else {}
    residual = {}
    for name in fair.FAIR_MODELS:
        config = dz.profile_config(
            "fair", dataset, target, **{**dz.MODEL_RECIPES[name], **sizes, **extra, "model": dz.SMOKE_MODEL}
        )
        residual[name] = _start_residual(config)["energy_mae"]
    for name in ("dimezblnet_switched", "dimezblnet_interpolated"):
        assert residual[name] == pytest.approx(residual["dimenet"], rel=0.10)
    assert residual["dimezblnet"] > 1.5 * residual["dimenet"]


# --- schedule -----------------------------------------------------------------------------------------------


def test_fair_schedule_reaches_its_final_rate_at_max_steps():
    for profile in ("fair", "fair_long"):
        config = (
            dz.profile_config("fair", "md17", "ethanol")
            if profile == "fair"
            else dz.profile_config(profile, "md17", "ethanol")
        )
        final = config.learning_rate * config.decay_rate
        assert dz.learning_rate_at(config.max_steps, config) == pytest.approx(final, rel=1e-12)
        assert dz.learning_rate_at(config.warmup_steps, config) > 10 * final
    paper = dz.profile_config("paper", "qm9", "U0")  # DimeNet's own schedule is untouched
    assert paper.decay_steps == 4_000_000 and paper.warmup_steps == 3000 and paper.max_steps == 3_000_000


def test_smoke_run_records_offset_method_and_final_learning_rate(ethanol_smoke_run):
    config, metrics = ethanol_smoke_run
    assert metrics["final_learning_rate"] == pytest.approx(dz.learning_rate_at(config.max_steps - 1, config))
    assert metrics["offset_method"].startswith("per-element least squares")
    assert set(metrics["target_offset"]["per_element"]) == {"C", "H", "O"}


# --- recipe (c): DeePMD-kit's interpolation -----------------------------------------------------------------


def _models():
    """(interpolated DimezblNet, the same network without ZBL), float64, with a non-zero output layer."""
    torch.manual_seed(3)
    kwargs = dict(**dz.SMOKE_MODEL, output_initializer="glorot_orthogonal")
    blended = dc.DimezblNet(zbl=True, zbl_unit="kcal/mol", zbl_combine="interpolate", **kwargs).double()
    plain = dc.DimezblNet(zbl=False, **kwargs).double()
    plain.load_state_dict({k: v for k, v in blended.state_dict().items() if not k.startswith("zbl.")})
    return blended, plain


def _dimer_scan(model, distances):
    """Energies and the force on atom 1 (along the bond) of an O-H dimer at each distance (Angstrom)."""
    z = torch.tensor([8, 1])
    energies, forces = [], []
    for r in distances:
        pos = torch.tensor([[0.0, 0.0, 0.0], [float(r), 0.0, 0.0]], dtype=torch.float64)
        energy, force = model.energy_and_forces(z, pos)
        energies.append(float(energy.detach()))
        forces.append(float(force[1, 0]))
    return np.array(energies), np.array(forces)


def test_interpolation_is_pure_zbl_inside_and_the_network_outside():
    blended, plain = _models()
    inside = torch.tensor([0.2, 0.3, 0.39], dtype=torch.float64)
    zbl = dc.zbl_pair_energy(8, 1, inside, unit="kcal/mol") * dc.envelope_polynomial(inside / 5.0)
    assert _dimer_scan(blended, inside)[0] == pytest.approx(zbl.numpy(), rel=1e-12)
    outside = [0.71, 0.9, 1.5]
    assert _dimer_scan(blended, outside)[0] == pytest.approx(_dimer_scan(plain, outside)[0], rel=1e-12, abs=1e-12)
    # in between it blends: neither of the two
    between = _dimer_scan(blended, [0.55])[0][0]
    assert between != pytest.approx(_dimer_scan(plain, [0.55])[0][0]) and between != pytest.approx(
        float(dc.zbl_pair_energy(8, 1, torch.tensor(0.55, dtype=torch.float64), "kcal/mol"))
    )


@pytest.mark.parametrize("radius", [0.4, 0.7])
def test_interpolation_is_smooth_at_its_radii(radius):
    """Energy, force and the force's slope have no jump across the inner and outer radius: one-sided
    finite-difference slopes agree (a kink in w would show in the force's slope as an O(1) jump)."""
    blended, _ = _models()
    h = 1e-5
    energies, forces = _dimer_scan(blended, radius + h * np.arange(-3, 4))
    # the force is -dE/dr on both sides and across the radius (no step in the energy)
    assert forces[1:-1] == pytest.approx(-(energies[2:] - energies[:-2]) / (2 * h), rel=1e-5)

    def slope_jump(h):  # the force's one-sided slopes on each side of the radius: (left - right, slope)
        forces = _dimer_scan(blended, radius + h * np.arange(-3, 4))[1]
        left, right = (forces[3] - forces[0]) / (3 * h), (forces[6] - forces[3]) / (3 * h)
        return abs(left - right), abs(left)

    # a kink (a jump in the force's slope) would leave an O(1) difference as h -> 0; a C2 switch leaves O(h)
    coarse, slope = slope_jump(1e-5)
    fine, _ = slope_jump(1e-6)
    assert fine < 0.2 * coarse + 1e-6 * slope and fine < 1e-2 * slope


def test_interpolation_weights_ignore_lone_atoms_and_use_the_nearest_neighbour():
    dist = torch.tensor([0.3, 2.0, 0.3, 1.2], dtype=torch.float64)
    target = torch.tensor([0, 0, 1, 2])
    w = dc.zbl_interpolation_weights(dist, target, 4, 0.4, 0.7)
    assert w[0] == pytest.approx(1.0, abs=1e-12) and w[1] == 1.0 and w[2] == 0.0 and w[3] == 0.0  # atom 3: none
    with pytest.raises(ValueError, match="zbl_switch_inner_a < zbl_switch_outer_a"):
        dc.DimezblNet(zbl=True, zbl_combine="interpolate", zbl_switch_inner_a=0.8, zbl_switch_outer_a=0.5)


def test_exported_interpolated_model_matches(tmp_path):
    blended, _ = _models()
    dz.export_model(blended, tmp_path / "model.pt", dtype=torch.float64)
    exported = torch.jit.load(str(tmp_path / "model.pt"))
    z = torch.tensor([8, 1, 1])
    pos = torch.tensor([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [0.0, 0.95, 0.1]], dtype=torch.float64)
    energy, forces = exported(z, pos, torch.zeros(3, dtype=torch.long))
    expected_energy, expected_forces = blended.energy_and_forces(z, pos)
    assert energy.item() == pytest.approx(expected_energy.item(), rel=1e-10)
    assert torch.allclose(forces, expected_forces, rtol=1e-8, atol=1e-8)


# --- statistics ---------------------------------------------------------------------------------------------


def test_paired_change_against_hand_computed_values():
    baseline, model = [1.0, 2.0, 4.0], [1.1, 1.8, 4.4]
    d = [math.log(1.1), math.log(0.9), math.log(1.1)]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, 2 degrees of freedom)
    change = fair.paired_change(baseline, model)
    assert change["pairs"] == 3 and not change["identical"]
    assert change["change_pct"] == pytest.approx(100 * math.expm1(mean))
    assert change["low_pct"] == pytest.approx(100 * math.expm1(mean - half))
    assert change["high_pct"] == pytest.approx(100 * math.expm1(mean + half))
    assert change["resolution_pct"] == pytest.approx(100 * math.expm1(half))
    assert change["ratio_of_means_pct"] == pytest.approx(100 * (7.3 / 7.0 - 1))
    assert fair.verdict(change) == "no difference resolved" and not fair.resolves_claim(change)
    worse = fair.paired_change([1.0, 1.0, 1.0, 1.0], [2.0, 2.01, 1.99, 2.0])
    assert fair.verdict(worse) == "higher error" and fair.resolves_claim(worse)
    better = fair.paired_change([2.0, 2.1, 1.9, 2.0], [1.0, 1.0, 1.0, 1.0])
    assert fair.verdict(better) == "lower error"
    assert fair.verdict(fair.paired_change([1.0], [1.0])) == "identical to DimeNet"
    assert fair.verdict(fair.paired_change([1.0], [1.2])) == "too few seeds"
    with pytest.raises(ValueError, match="positive"):
        fair.paired_change([1.0, 0.0], [1.0, 1.0])


def test_summary_pairs_by_seed_and_refuses_mixed_data():
    import pandas as pd

    rows = []
    for model, maes in (("dimenet", [1.0, 2.0]), ("dimezblnet", [1.5, 3.0])):
        for seed, mae in enumerate(maes):
            rows.append(
                dict(
                    profile="fair",
                    dataset="qm9",
                    target="U0",
                    model=model,
                    seed=seed,
                    test_energy_mae=mae,
                    energy_unit="meV",
                    data_sha256="abc",
                )
            )
    runs = pd.DataFrame(rows)
    summary = fair.fair_summary(runs, [fair.Cell("qm9", "U0")])
    row = summary[summary["model"] == "dimezblnet"].iloc[0]
    assert row["seeds"] == 2 and row["change_pct"] == pytest.approx(50.0) and row["verdict"] == "higher error"
    assert row["paper_change_pct"] == pytest.approx(100 * (8.07 / 8.29 - 1))  # the paper's own Table 1 cells
    # every segment's commit of a resumed run is listed in the provenance line
    runs["git_commit"] = ["a" * 40, "b" * 40 + " + " + "c" * 40, "a" * 40, "a" * 40]
    runs["hardware"], runs["offset_method"], runs["final_learning_rate"] = "cpu", "per-element", 1e-5
    assert "Commits: aaaaaaa, bbbbbbb, ccccccc." in fair.summary_markdown(summary, runs)
    runs.loc[0, "data_sha256"] = "other"
    mixed = fair.fair_summary(runs, [fair.Cell("qm9", "U0")])
    assert (mixed["verdict"] == "data differ").all()


# --- the driver end to end: tiny runs, report, notebook 06 -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_fair_results(ethanol_smoke_data, tmp_path_factory):
    """Two seeds of the fair ethanol cell at 4 steps on the smoke data (recipes (b), (c): the first seed)."""
    results = tmp_path_factory.mktemp("fair")
    npz = ethanol_smoke_data / "data" / "md17" / "generated" / "ethanol.npz"
    runs = fair.train_fair(
        [fair.Cell("md17", "ethanol")],
        seeds=[0, 1],
        results_dir=results,
        progress=False,
        md17_source="npz",
        md17_path=str(npz),
        max_steps=4,
        eval_every=2,
        n_train=32,
        n_valid=16,
        n_test=16,
        model=dz.SMOKE_MODEL,
    )
    return results, runs


def test_fair_driver_trains_each_recipe_and_reports(tiny_fair_results):
    results, runs = tiny_fair_results
    counts = runs.groupby("model").size().to_dict()
    assert counts == {"dimenet": 2, "dimezblnet": 2, "dimezblnet_switched": 1, "dimezblnet_interpolated": 1}
    assert runs["data_sha256"].nunique() == 1 and runs["offset_method"].notna().all()
    assert (runs["final_learning_rate"] < 1e-3).all()
    by_model = runs[runs["seed"] == 0].set_index("model")
    for recipe in fair.ONE_SEED_MODELS:  # zero on these data: DimeNet's numbers exactly
        assert by_model.loc[recipe, "test_forces_mae"] == by_model.loc["dimenet", "test_forces_mae"]
    paths = fair.write_fair_report(results)
    assert all(p.exists() for p in paths) and any(p.suffix == ".png" for p in paths)
    summary = (results / "tables" / "summary.md").read_text()
    assert "identical to DimeNet" in summary and "(a) literal ZBL" in summary
    table = pd.read_csv(results / "tables" / "summary.csv")
    literal = table[(table["model"] == "dimezblnet") & (table["quantity"] == "forces")].iloc[0]
    mae = runs.set_index(["model", "seed"])["test_forces_mae"]
    expected = 100 * math.expm1(np.mean([math.log(mae["dimezblnet", s] / mae["dimenet", s]) for s in (0, 1)]))
    assert literal["seeds"] == 2 and literal["change_pct"] == pytest.approx(expected)
    listed = pd.read_csv(results / "tables" / "runs.csv")["run_dir"]
    assert all((dz.results_path(results, d, "metrics.json")).exists() for d in listed)  # every cell traceable


def test_fair_notebook_runs_headless(tiny_fair_results, tmp_path):
    import papermill

    results, _ = tiny_fair_results
    notebooks = dz.REPOSITORY_ROOT / "notebooks"
    papermill.execute_notebook(
        str(notebooks / fair.FAIR_NOTEBOOK),
        str(tmp_path / fair.FAIR_NOTEBOOK),
        parameters={"results_dir": str(results)},
        kernel_name=dz.KERNEL_NAME,
        cwd=str(notebooks),
        progress_bar=False,
    )
    executed = json.loads((tmp_path / fair.FAIR_NOTEBOOK).read_text())
    images = [
        o
        for c in executed["cells"]
        if c["cell_type"] == "code"
        for o in c.get("outputs", [])
        if "image/png" in o.get("data", {})
    ]
    assert len(images) == 2  # the forest plot and the convergence figure, inline


def test_fair_shortrange_compares_every_recipe(tiny_fair_results):
    results, _ = tiny_fair_results
    with pytest.raises(FileNotFoundError, match="fair train --cells md17/ethanol/fair_long --seeds 0"):
        fair.fair_shortrange_checkpoints(results, "ethanol")  # ethanol's default: the 8,000-step cell
    out = fair.fair_shortrange(
        results,
        "ethanol",
        seed=0,
        profile="fair",
        progress=False,
        n_steps=20,
        seeds=(0,),
        temperatures_k=(1000.0,),
        compression_step_a=0.5,
        reference=False,
    )
    labels = {dz.MODEL_LABELS[m] for m in fair.FAIR_MODELS}
    assert set(out["md_summary"]["model"]) == labels
    columns = set(out["curves"][0].columns)
    assert labels <= columns and "GFN2-xTB" in columns
    summary = out["compression_summary"]
    assert {f"{label} E(0.5 A)" for label in labels} <= set(summary.columns)
    # compressed to 0.5 A, recipes (b) and (c) act (unlike at the data's distances): not DimeNet's curve
    c_h = summary[summary["bond"] == "C-H"].iloc[0]
    for label in ("DimezblNet (switched)", "DimezblNet (interpolated)"):
        assert c_h[f"{label} E(0.5 A)"] > c_h["DimeNet E(0.5 A)"] + 100.0  # kcal/mol: the ZBL wall
    assert (results / "shortrange" / "ethanol" / "md_stability.md").exists()
    assert (results / "figures" / "shortrange_md_stability_ethanol.png").exists()
    assert fair.fair_shortrange_molecules(results) == ["ethanol"]
    assert [p.name for p in fair.shortrange_figures(results)] == [
        "shortrange_compression_ethanol.png",
        "shortrange_md_stability_ethanol.png",
    ]
    shown = fair.shortrange_markdown(results)  # what notebook 06 shows
    assert "### Bond compression" in shown and "### MD stability" in shown and "DimezblNet (switched)" in shown


def test_fair_shortrange_report_names_its_command_when_missing(tmp_path):
    assert "run `make fair-shortrange`" in fair.shortrange_markdown(tmp_path)


def test_a_cell_on_other_data_is_skipped_and_the_other_cells_train(monkeypatch, capsys):
    """`dimezbl fair train` goes through every cell: one whose data here differ from its finished runs' is named
    and skipped (runner.OtherDataError), the cells after it still train, and the driver ends with the error."""
    trained = []

    def run_models(profile, dataset, targets, seeds, **kwargs):
        if targets == ["ethanol"]:
            raise dz.OtherDataError("the data of ethanol have content sha256 09cf97...")
        trained.append((profile, targets[0], seeds[0]))
        return pd.DataFrame()

    monkeypatch.setattr(dz.runner, "run_models", run_models)
    monkeypatch.setattr(fair, "fair_runs", lambda results_dir: pd.DataFrame())
    cells = [fair.Cell("md17", "ethanol", "fair_long"), fair.Cell("qm9", "alpha")]
    with pytest.raises(dz.OtherDataError, match=r"not trained.*\nMD17 ethanol, 8,000 steps: the data of ethanol"):
        fair.train_fair(cells, seeds=[0, 1])
    assert trained == [("fair", "alpha", 0), ("fair", "alpha", 1)]
    assert "skipping MD17 ethanol, 8,000 steps" in capsys.readouterr().out
