"""Notebooks 01-05 end to end through papermill with tiny parameters (the `reproduce` driver),
and the tables they write: the paper's rows and columns, every "this run" cell traced to the
metrics.json of its run, every quoted cell equal to the paper. Also: notebooks are committed
without outputs; the change interval, atomic table writes and failure reports.

The paper's tables are parsed here, independently of dimezbl_core, from a verbatim copy of
their lines below, which is itself checked against ../shared/paper/dimezblnet-paper.md when that
file is there.
"""

import json
import math
import time
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

import dimezbl as dz
from dimezbl import fair

ROOT = Path(__file__).resolve().parents[1]
PAPER_FILE = ROOT.parent / "shared" / "paper" / "dimezblnet-paper.md"

# --- the paper's tables: its lines, copied verbatim (tabs included), and an independent parser ---

PAPER_TABLE1_LINES = """\
Target	Unit	PPGN	SchNet	PhysNet	Cormorant	DimeNet	DimezblNet
$\\mu$	D	0.017	0.033	0.0529	0.13	0.0286	0.0273
$\\alpha$	ao <sup>3</sup>	0.131	0.235	0.0615	0.092	0.0469	0.0452
$\\epsilon_{HOMO}$	meV	40.3	41	32.9	36	27.8	26.7
$\\epsilon_{LUMO}$	meV	32.7	34	24.7	36	19.7	18.9
$\\Delta\\epsilon$	meV	60	63	42.5	60	34.8	33.1
$R^2$	ao <sup>2</sup>	0.592	0.703	0.75	0.673	0.231	0.217
ZPVE	meV	3.12	1.7	1.395	1.98	1.29	1.23
$U^0$	meV	36.8	18	14	13	8.29	8.07
$U$	meV	36.8	19	14	–	7.89	7.63
$H$	meV	36.3	14	14	–	8.11	7.92
$G$	meV	36.4	14	14	–	8.98	8.71
$c_v$	(K*cal)/mol	0.055	0.033	0.028	0.031	0.0249	0.0237
"""
PAPER_TABLE2_LINES = """\
Molecule		SGDML	SchNet	DimeNet	DimezblNet
Aspirin	Energy	0.19	0.37	0.204	0.194
	Forces	0.68	1.35	0.499	0.473
Benzene	Energy	0.1	0.08	0.078	0.075
	Forces	0.06	0.31	0.187	0.181
Ethanol	Energy	0.07	0.08	0.064	0.062
	Forces	0.33	0.39	0.23	0.217
Malonaldehyde	Energy	0.10	0.13	0.104	0.098
	Forces	0.41	0.66	0.383	0.367
Naphthalene	Energy	0.12	0.16	0.122	0.117
	Forces	0.11	0.58	0.215	0.208
Salicylic acid	Energy	0.12	0.2	0.134	0.127
	Forces	0.28	0.85	0.374	0.361
Toluene	Energy	0.1	0.12	0.102	0.097
	Forces	0.14	0.57	0.216	0.207
Uracil	Energy	0.11	0.14	0.115	0.107
"""
TABLE1_ROWS = ["mu", "alpha", "HOMO", "LUMO", "gap", "R2", "ZPVE", "U0", "U", "H", "G", "Cv"]
TABLE1_UNITS = ["D", "bohr^3", "meV", "meV", "meV", "bohr^2", "meV", "meV", "meV", "meV", "meV", "cal/(mol K)"]
TABLE2_MOLECULES = [
    "Aspirin",
    "Benzene",
    "Ethanol",
    "Malonaldehyde",
    "Naphthalene",
    "Salicylic acid",
    "Toluene",
    "Uracil",
]


def parse_table1(lines: str):
    """{row: (unit, {column: cell or None})}; the paper's 12 rows in order, '-' cells as None."""
    header, *rows = [line.split("\t") for line in lines.strip("\n").splitlines()]
    assert header[:2] == ["Target", "Unit"] and len(rows) == 12
    parsed = {}
    for name, (_label, unit, *cells) in zip(TABLE1_ROWS, rows):
        unit = unit.replace(" <sup>", "^").replace("</sup>", "").replace("ao^", "a0^")
        parsed[name] = (unit, {c: (None if v.strip() == "–" else v.strip()) for c, v in zip(header[2:], cells)})
    return parsed


def parse_table2(lines: str):
    """{(molecule label, 'Energy'|'Forces'): {column: cell}} for the rows the paper prints."""
    header, *rows = [line.split("\t") for line in lines.strip("\n").splitlines()]
    columns = ["sGDML" if c == "SGDML" else c for c in header[2:]]
    parsed, molecule = {}, None
    for name, quantity, *cells in rows:
        molecule = name or molecule
        parsed[(molecule, quantity)] = dict(zip(columns, (c.strip() for c in cells)))
    return parsed


def _paper_section(text: str, start: str, end: str) -> str:
    body = text[text.index(start) : text.index(end)]
    return "\n".join(line for line in body.splitlines() if "\t" in line) + "\n"


def test_copied_lines_are_the_papers():
    """The verbatim copy above is the paper's (checked where ../shared/paper is present, as in CI)."""
    if not PAPER_FILE.exists():
        pytest.skip(f"{PAPER_FILE} is not there (a clone outside the workspace); the copy above is used")
    text = PAPER_FILE.read_text(encoding="utf-8")
    assert _paper_section(text, "Table 1:", "### 4.3") == PAPER_TABLE1_LINES
    assert _paper_section(text, "Table 2:", "## 5. Conclusion") == PAPER_TABLE2_LINES


def test_quoted_constants_equal_the_paper():
    table1 = parse_table1(PAPER_TABLE1_LINES)
    assert list(dz.PAPER_TABLE1_COLUMNS) == list(next(iter(table1.values()))[1])
    for target, (label, unit, cells) in dz.PAPER_TABLE1.items():
        paper_unit, paper_cells = table1[label]
        assert unit == paper_unit and list(cells) == list(paper_cells.values()), target
    assert [label for label, _, _ in dz.PAPER_TABLE1.values()] == TABLE1_ROWS
    assert list(dz.PAPER_TABLE1) == list(dz.QM9_TARGETS)

    table2 = parse_table2(PAPER_TABLE2_LINES)
    assert ("Uracil", "Forces") not in table2  # the paper stops before it
    for (molecule, quantity), cells in dz.PAPER_TABLE2.items():
        key = (dz.MD17_LABELS[molecule], quantity.capitalize())
        expected = table2.get(key, dict.fromkeys(dz.PAPER_TABLE2_COLUMNS, dz.NOT_REPORTED))
        assert list(cells) == [expected[c] for c in dz.PAPER_TABLE2_COLUMNS], key
    assert len(dz.PAPER_TABLE2) == 16
    assert dz.paper_value(1, "alpha", "DimezblNet") == 0.0452
    assert dz.paper_value(1, "U", "Cormorant") is None
    assert dz.paper_value(2, ("uracil", "forces"), "DimeNet") is None


def test_notebooks_are_committed_without_outputs():
    names = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert names == sorted(dz.NOTEBOOKS + (fair.FAIR_NOTEBOOK,))
    for name in names:
        notebook = nbformat.read(ROOT / "notebooks" / name, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{name} has outputs: clear them (nbstripout notebooks/*.ipynb)"
            )
        assert "parameters" in code[0].metadata.get("tags", []), f"{name}: first code cell not tagged"
        assert notebook.metadata["kernelspec"]["name"] == dz.KERNEL_NAME


# --- statistics and files, without training ---


def _fake_runs(values: dict) -> pd.DataFrame:
    """A collect_runs-like table: values {(target, model, seed): test MAE}."""
    rows = []
    for (target, model, seed), mae in values.items():
        row = dict.fromkeys(dz.RUN_COLUMNS)
        row.update(
            profile="cpu",
            dataset="qm9",
            target=target,
            model=model,
            seed=seed,
            test_energy_mae=mae,
            mean_predictor_energy_mae=100.0,
            run_dir=f"runs/cpu/qm9/{target}/{model}_seed{seed}",
        )
        rows.append(row)
    return pd.DataFrame(rows, columns=list(dz.RUN_COLUMNS))


def test_relative_change_is_a_paired_t_interval_over_seeds():
    from scipy.stats import t

    dimenet, dimezblnet = [10.0, 12.0, 11.0], [9.5, 11.0, 11.2]
    change = 100 * (np.array(dimezblnet) - dimenet) / dimenet
    half = t.ppf(0.975, 2) * change.std(ddof=1) / math.sqrt(3)
    assert dz.relative_change(dimenet, dimezblnet) == pytest.approx(
        (change.mean(), change.mean() - half, change.mean() + half), rel=1e-12
    )
    mean, low, high = dz.relative_change([10.0], [9.0])
    assert mean == pytest.approx(-10.0) and math.isnan(low) and math.isnan(high)

    runs = _fake_runs(
        {("U0", "dimenet", s): v for s, v in enumerate(dimenet)}
        | {("U0", "dimezblnet", s): v for s, v in enumerate(dimezblnet)}
    )
    table = dz.build_table1(runs, "cpu").set_index("Target")
    assert table.loc["U0", "DimeNet (this run)"] == pytest.approx(np.mean(dimenet))
    assert table.loc["U0", "DimeNet (this run) std"] == pytest.approx(np.std(dimenet, ddof=1))
    assert table.loc["U0", "Change 95% low (this run, %)"] == pytest.approx(change.mean() - half)
    assert math.isnan(table.loc["mu", "DimezblNet (this run)"])
    shown = dz.display_table(table.reset_index()).set_index("Target")
    assert shown.loc["U0", "DimeNet (this run)"] == f"{np.mean(dimenet):.4g} ± {np.std(dimenet, ddof=1):.2g}"
    assert shown.loc["mu", "DimeNet (this run)"] == "not run"
    assert shown.loc["U", "Cormorant (paper)"] == "–"
    # a target part-way through its seeds says so
    partial = dz.build_table1(pd.concat([runs, _fake_runs({("homo", "dimenet", 0): 30.0})]), "cpu")
    shown = dz.display_table(partial).set_index("Target")
    assert shown.loc["HOMO", "DimeNet (this run)"] == "30 (1 of 3 seeds)"
    assert shown.loc["U0", "DimeNet (this run)"] == f"{np.mean(dimenet):.4g} ± {np.std(dimenet, ddof=1):.2g}"
    assert shown.loc["HOMO", "DimezblNet (this run)"] == "not run"


def test_md17_data_text_needs_no_data_files(tmp_path):
    """Tables of runs committed without their generated data (data/ is not in the repository) still
    name the data set sizes (from the runs) and the sampling interval (from the profile)."""
    runs = _fake_runs({("benzene", "dimenet", 0): 1.0, ("ethanol", "dimenet", 0): 1.0})
    runs = runs.assign(
        profile="smoke",
        dataset="md17",
        md17_source="generated",
        data_dir=str(tmp_path),
        n_train=100,
        n_valid=25,
        n_test=[75, 50],
    )
    text = dz.tables._md17_data_text(runs)
    interval_fs = dz.PROFILE_MD17_GENERATION["smoke"]["sample_every"] * dz.MD17_TIMESTEP_FS
    assert f"one configuration every {interval_fs:g} fs (benzene 200, ethanol 175 configurations)" in text
    assert "NOT the DFT" in text


def test_write_table_never_leaves_half_written_tables(tmp_path, monkeypatch):
    table = dz.build_table1(_fake_runs({("U0", "dimenet", 0): 1.0, ("U0", "dimezblnet", 0): 0.9}), "cpu")
    paths = dz.write_table(table, ["Profile: cpu"], "table1_qm9", tmp_path)
    before = {suffix: path.read_text() for suffix, path in paths.items()}
    assert before["csv"].startswith("# Profile: cpu\n") and before["tex"].startswith("% Profile: cpu\n")

    def broken(_):
        raise RuntimeError("disk full while rendering LaTeX")

    monkeypatch.setattr(dz.tables, "latex_table", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        dz.write_table(table.assign(**{"DimeNet (this run)": 2.0}), ["Profile: other"], "table1_qm9", tmp_path)
    assert {suffix: path.read_text() for suffix, path in paths.items()} == before
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == [
        "table1_qm9.csv",
        "table1_qm9.md",
        "table1_qm9.tex",
    ]


def test_reproduce_rejects_unknown_parameters():
    assert dz.reproduce_main(["--set", 'target=["U0"]']) == 1  # 'targets', not 'target'


def test_reproduce_names_the_failing_notebook_and_cell(tmp_path):
    name = "01_basis_visualization.ipynb"
    cells = nbformat.read(ROOT / "notebooks" / name, as_version=4).cells
    failing = next(k for k, cell in enumerate(cells) if "plot_sbf_heatmap" in cell.source) + 1
    with pytest.raises(dz.NotebookFailed) as error:
        dz.reproduce("smoke", results_dir=tmp_path, parameters={"sbf_l": 99}, notebooks=[name], progress=False)
    assert error.value.notebook == name and error.value.cell == failing
    assert f"{name} failed in cell {failing}" in str(error.value) and "ValueError" in str(error.value)
    assert (tmp_path / "executed" / name).exists()


# --- all five notebooks, tiny budget ---

TINY_TRAINING = dict(
    model=dict(
        hidden_channels=8,
        num_blocks=1,
        num_bilinear=2,
        num_spherical=3,
        num_radial=3,
        num_output_layers=1,
        num_after_skip=1,
    ),
    batch_size=4,
    max_steps=4,
    eval_every=2,
    warmup_steps=2,
    n_train=16,
    n_valid=4,
    n_test=8,
)
QM9_TARGETS, MD17_MOLECULES = ["U0", "mu"], ["ethanol"]
PARAMETERS = dict(
    targets=QM9_TARGETS,
    molecules=MD17_MOLECULES,
    seeds=[0],
    train_overrides=TINY_TRAINING,
    md17_configs=32,
    compression_molecule="ethanol",
)
FIGURES = [
    "basis_radial_envelope",
    "basis_spherical",
    "basis_sbf_heatmap_l2_n1",
    "zbl_screening_function",
    "zbl_pair_energies",
    "compression_curves_md17_ethanol",
    "learning_curves_qm9_energy",
    "learning_curves_md17_energy",
    "learning_curves_md17_forces",
    "parity_md17_energy",
    "parity_md17_forces",
]


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """Run notebooks 01-05 once (profile smoke, tiny overrides) into a temporary results folder.
    MD17 data are generated into a temporary data folder; an existing QM9 cache is linked."""
    base = tmp_path_factory.mktemp("reproduce")
    data = base / "data"
    data.mkdir()
    for name in ("qm9_v1.pt", "qm9_v1.json"):
        if (dz.data_dir_path() / name).exists():
            (data / name).symlink_to(dz.data_dir_path() / name)
    start = time.perf_counter()
    dz.reproduce(
        "smoke", results_dir=base / "results", data_dir=data, device="cpu", parameters=PARAMETERS, progress=False
    )
    print(f"\nnotebooks 01-05 ran in {time.perf_counter() - start:.0f} s")
    return base / "results"


def _run_arguments(data_dir, results) -> dict:
    """run_models keywords of the tests that train (tiny) runs into a copy of the reproduced results."""
    return dict(data_dir=data_dir, results_dir=results, device="cpu", progress=False, md17_configs=32, **TINY_TRAINING)


def test_reproduce_writes_executed_notebooks_figures_and_tables(reproduced):
    for name in dz.NOTEBOOKS:
        executed = nbformat.read(reproduced / "executed" / name, as_version=4)
        assert any(cell.get("outputs") for cell in executed.cells if cell.cell_type == "code"), name
    for figure in FIGURES:
        assert (reproduced / "figures" / f"{figure}.png").stat().st_size > 10_000, figure
    for basename in ("table1_qm9", "table2_md17"):
        for suffix in ("csv", "md", "tex"):
            assert (reproduced / "tables" / f"{basename}.{suffix}").exists()
    assert (reproduced / "tables" / "summary.md").read_text().count("\n| QM9 ") >= 1
    assert not list((reproduced / "tables").glob(".*tmp*"))


def test_every_dimezblnet_run_records_what_its_zbl_term_adds(reproduced):
    """train() writes zbl_term.json for DimezblNet runs; notebooks 03 and 04 gather them into
    tables/zbl_term_{qm9,md17}.csv beside the test MAEs of the same runs (U0, MD17: fixed weight 1; mu: learned)."""
    text = (reproduced / "tables" / "zbl_term_qm9.csv").read_text()
    assert text.startswith("# ZBL term of each DimezblNet run (qm9)") and "\n# Git commit that computed" in text
    table = pd.read_csv(reproduced / "tables" / "zbl_term_qm9.csv", comment="#").set_index("target")
    assert sorted(table.index) == sorted(QM9_TARGETS)
    runs = dz.collect_runs("smoke", "qm9", reproduced).set_index(["target", "model"])
    for target in QM9_TARGETS:
        row = table.loc[target]
        term = json.loads((reproduced / row["run_dir"] / dz.ZBL_TERM_FILE).read_text())
        assert row["zbl_weight"] == pytest.approx(term["zbl_weight"])
        assert row["contribution_mean"] == pytest.approx(
            dz.qm9_to_reporting_units(term["zbl_weight"] * term["zbl_energy"]["mean"], target), rel=1e-9
        )
        assert term["n_molecules"] == TINY_TRAINING["n_test"] and term["zbl_energy"]["mean"] > 1.0  # eV
        assert row["zbl_term_commit"] == term["git"]["commit"]
        assert row["test_energy_mae"] == runs.loc[(target, "dimezblnet"), "test_energy_mae"]
        assert row["dimenet_test_energy_mae"] == runs.loc[(target, "dimenet"), "test_energy_mae"]
        assert row["mean_predictor_energy_mae"] == runs.loc[(target, "dimezblnet"), "mean_predictor_energy_mae"]
    assert table.loc["U0", "zbl_weight"] == 1.0 and table.loc["U0", "unit"] == "meV"
    assert table.loc["mu", "zbl_weight"] != 0.0  # learned from 0 in the 4 steps (Adam moves it at once)
    md17 = pd.read_csv(reproduced / "tables" / "zbl_term_md17.csv", comment="#")
    assert list(md17["target"]) == MD17_MOLECULES and (md17["zbl_weight"] == 1.0).all()
    assert (md17["unit"] == "kcal/mol").all() and (md17["zbl_energy_unit"] == "kcal/mol").all()
    assert (md17["contribution_mean"] == md17["zbl_energy_mean"]).all() and (md17["zbl_energy_std"] > 0).all()
    # `zbl-term` (for runs that finished before train() wrote the file) gives what train() wrote
    run_dir = reproduced / table.loc["mu", "run_dir"]
    at_finish = json.loads((run_dir / dz.ZBL_TERM_FILE).read_text())
    assert dz.main(["zbl-term", str(run_dir)]) == 0
    again = json.loads((run_dir / dz.ZBL_TERM_FILE).read_text())
    assert again["n_molecules"] == at_finish["n_molecules"] and again["zbl_weight"] == at_finish["zbl_weight"]
    for part in ("zbl_energy", "contribution"):
        assert again[part]["unit"] == at_finish[part]["unit"]
        for key in ("mean", "std"):
            assert again[part][key] == pytest.approx(at_finish[part][key], rel=1e-12)


def test_corrupt_run_files_are_errors_that_name_the_file_and_the_fix(reproduced, tmp_path):
    import shutil

    results = tmp_path / "results"
    shutil.copytree(reproduced / "runs", results / "runs")
    runs = dz.collect_runs("smoke", "qm9", results)
    run_dir = results / runs[runs["model"] == "dimezblnet"]["run_dir"].iloc[0]
    (run_dir / dz.ZBL_TERM_FILE).write_text('{"zbl_weight": 0.1, "zbl_ener')  # cut short
    with pytest.raises(ValueError, match=r"zbl_term\.json is corrupt .*dimezbl zbl-term"):
        dz.zbl_terms(runs, results)
    (run_dir / "metrics.json").write_bytes(b"\x00\xff\xfe")
    with pytest.raises(ValueError, match=r"metrics\.json is corrupt .*git checkout"):
        dz.collect_runs("smoke", "qm9", results)


def test_reuse_committed_counts_runs_without_checkpoints_as_finished(reproduced, tmp_path, capsys, monkeypatch):
    """Committed runs have metrics but no checkpoints: reuse_committed=True
    takes them as they are (no training, no data generation) and predict_runs leaves them out;
    by default they are trained again."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(reproduced, results)
    data_dir = str((reproduced.parent / "data").resolve())
    kept = results / "runs" / "smoke" / "md17" / "ethanol" / "dimenet_seed0"
    committed = results / "runs" / "smoke" / "md17" / "ethanol" / "dimezblnet_seed0"
    for checkpoint in committed.glob("*.pt"):
        checkpoint.unlink()
    metrics_before = (committed / "metrics.json").read_text()
    arguments = _run_arguments(data_dir, results)

    def no_generation(*args, **kwargs):
        raise AssertionError("nothing is trained, so no data set is needed")

    with monkeypatch.context() as patch:
        patch.setattr(dz.runner, "ensure_md17_data", no_generation)
        runs = dz.run_models("smoke", "md17", ["ethanol"], [0], reuse_committed=True, **arguments)
    printed = capsys.readouterr().out
    assert "trained" not in printed and "metrics only" in printed and len(runs) == 2
    assert (committed / "metrics.json").read_text() == metrics_before and not (
        committed / "checkpoint_best.pt"
    ).exists()
    predictions = dz.predict_runs(runs, "test", device="cpu", results_dir=results, data_dir=data_dir)
    assert list(predictions) == [("ethanol", "dimenet")] and (kept / "checkpoint_best.pt").exists()
    assert "left out of the predictions" in capsys.readouterr().out
    dz.run_models("smoke", "md17", ["ethanol"], [0], models=["dimezblnet"], **arguments)
    assert "trained" in capsys.readouterr().out and (committed / "checkpoint_best.pt").exists()


def test_a_best_checkpoint_of_another_training_is_not_used(reproduced, tmp_path, capsys, monkeypatch):
    """Checkpoints are ignored files: when git replaces a run's committed config.json/metrics.json
    (a pull bringing runs of a new budget), the old checkpoint_best.pt stays. It is recognised by
    its stored config and step, and neither reused as the run's model nor plotted."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(reproduced, results)
    data_dir = str((reproduced.parent / "data").resolve())
    run_dir = results / "runs" / "smoke" / "md17" / "ethanol" / "dimezblnet_seed0"
    kept = results / "runs" / "smoke" / "md17" / "ethanol" / "dimenet_seed0"
    assert dz.stale_best_checkpoint(run_dir) is None and dz.stale_best_checkpoint(kept) is None
    path = run_dir / "checkpoint_best.pt"
    original = dz.load_checkpoint(path)
    dz.atomic_torch_save({**original, "step": original["step"] + 1}, path)
    assert "best step is" in dz.stale_best_checkpoint(run_dir)
    older = {**original, "config": {**original["config"], "max_steps": original["config"]["max_steps"] * 2}}
    dz.atomic_torch_save(older, path)
    assert "another config (differs in max_steps)" in dz.stale_best_checkpoint(run_dir)
    files_before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    arguments = _run_arguments(data_dir, results)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run is not trained again")

    with monkeypatch.context() as patch:
        patch.setattr(dz.runner, "train", no_training)
        patch.setattr(dz.runner, "ensure_md17_data", no_training)
        with pytest.raises(ValueError, match=r"another config \(differs in max_steps\).*reuse_committed"):
            dz.run_models("smoke", "md17", ["ethanol"], [0], **arguments)
        capsys.readouterr()
        runs = dz.run_models("smoke", "md17", ["ethanol"], [0], reuse_committed=True, **arguments)
    printed = capsys.readouterr().out
    assert "metrics only" in printed and "not used" in printed and len(runs) == 2
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files_before
    predictions = dz.predict_runs(runs, "test", device="cpu", results_dir=results, data_dir=data_dir)
    assert list(predictions) == [("ethanol", "dimenet")]
    assert "left out of the predictions" in capsys.readouterr().out


def test_a_run_is_not_trained_on_other_data_than_its_finished_siblings(reproduced, tmp_path, capsys, monkeypatch):
    """The runs of one profile and molecule compare models on one data set: when the generated set found now
    differs from the one the finished runs beside it recorded (regenerated on another CPU, say), a missing run is
    not trained on it; the error names both hashes, and nothing is written."""
    import json
    import shutil

    results = tmp_path / "results"
    shutil.copytree(reproduced, results)
    data_dir = str((reproduced.parent / "data").resolve())
    cell = results / "runs" / "smoke" / "md17" / "ethanol"
    missing = cell / "dimezblnet_seed0"
    shutil.rmtree(missing)
    provenance_path = cell / "dimenet_seed0" / "provenance.json"
    provenance = json.loads(provenance_path.read_text())
    found = provenance["data"]["content_sha256"]
    provenance["data"]["content_sha256"] = "0" * 64
    provenance_path.write_text(json.dumps(provenance))
    arguments = _run_arguments(data_dir, results)

    def no_training(*args, **kwargs):
        raise AssertionError("nothing is trained on other data")

    with monkeypatch.context() as patch:
        patch.setattr(dz.runner, "train", no_training)
        message = (
            rf"have content sha256 {found[:16]}.*trained on 0000000000000000\.\.\. \(dimenet_seed0\).*dimezblnet_seed0"
        )
        with pytest.raises(ValueError, match=message):
            dz.run_models("smoke", "md17", ["ethanol"], [0], **arguments)
    assert not missing.exists()
    provenance["data"]["content_sha256"] = found  # the same data as its sibling: trained
    provenance_path.write_text(json.dumps(provenance))
    dz.run_models("smoke", "md17", ["ethanol"], [0], **arguments)
    assert "trained" in capsys.readouterr().out and (missing / "metrics.json").exists()


def test_no_training_collects_finished_runs_and_names_the_rest(reproduced, tmp_path, capsys, monkeypatch):
    """train_missing=False (run-models --no-training, notebooks' train_missing parameter) trains
    nothing, also not unfinished or absent runs: they are named and left out of the result."""
    import shutil

    results = tmp_path / "results"
    shutil.copytree(reproduced, results)
    unfinished = results / "runs" / "smoke" / "md17" / "ethanol" / "dimezblnet_seed0"
    (unfinished / "metrics.json").unlink()  # as if its training was interrupted
    data_dir = str((reproduced.parent / "data").resolve())
    files_before = sorted(path.name for path in unfinished.iterdir())

    def no_training(*args, **kwargs):
        raise AssertionError("train_missing=False must not train")

    with monkeypatch.context() as patch:
        patch.setattr(dz.runner, "train", no_training)
        patch.setattr(dz.runner, "ensure_md17_data", no_training)
        runs = dz.run_models(
            "smoke",
            "md17",
            ["ethanol"],
            [0, 1],
            results_dir=results,
            data_dir=data_dir,
            device="cpu",
            progress=False,
            train_missing=False,
            **TINY_TRAINING,
        )
        printed = capsys.readouterr().out
        assert runs[["model", "seed"]].values.tolist() == [["dimenet", 0]]
        assert "not training 3 unfinished run(s)" in printed
        for name in ("dimezblnet_seed0", "dimenet_seed1", "dimezblnet_seed1"):
            assert f"ethanol/{name}" in printed
        assert sorted(path.name for path in unfinished.iterdir()) == files_before
        assert not (unfinished.parent / "dimenet_seed1").exists()
        arguments = [
            "--profile",
            "smoke",
            "--dataset",
            "md17",
            "--targets",
            "ethanol",
            "--seeds",
            "0",
            "--results-dir",
            str(results),
            "--data-dir",
            data_dir,
            "--no-training",
        ]
        arguments += [f"--set={key}={json.dumps(value)}" for key, value in TINY_TRAINING.items()]
        assert dz.run_models_main(arguments) == 0
        assert "not training 1 unfinished run(s)" in capsys.readouterr().out


def test_reproduce_runs_the_notebooks_named_on_the_command_line(tmp_path):
    with pytest.raises(SystemExit):
        dz.reproduce_main(["--notebooks", "07", "--results-dir", str(tmp_path)])
    assert dz.reproduce_main(["--notebooks", "01", "--results-dir", str(tmp_path)]) == 0
    assert [path.name for path in (tmp_path / "executed").iterdir()] == ["01_basis_visualization.ipynb"]


def _read_csv(path):
    return pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)


def test_tables_have_the_papers_rows_columns_and_header(reproduced):
    table1 = _read_csv(reproduced / "tables" / "table1_qm9.csv")
    assert table1["Target"].tolist() == TABLE1_ROWS and table1["Unit"].tolist() == TABLE1_UNITS
    table2 = _read_csv(reproduced / "tables" / "table2_md17.csv")
    assert list(zip(table2["Molecule"], table2["Quantity"])) == [
        (m, q) for m in TABLE2_MOLECULES for q in ("Energy", "Forces")
    ]
    assert set(table2["Unit"]) == {"kcal/mol", "kcal/mol/A"}
    added = ["DimeNet (this run)", "DimezblNet (this run)", "Change (this run, %)"]
    for table, columns in ((table1, dz.PAPER_TABLE1_COLUMNS), (table2, dz.PAPER_TABLE2_COLUMNS)):
        assert all(f"{c} (paper)" in table for c in columns) and all(c in table for c in added)
    for basename, data in (("table1_qm9", "QM9 from qm9pack (B3LYP/6-31G(2df,p))"), ("table2_md17", "GFN2-xTB")):
        for suffix, prefix in (("csv", "# "), ("md", "- "), ("tex", "% ")):
            text = (reproduced / "tables" / f"{basename}.{suffix}").read_text()
            header = [line for line in text.splitlines() if line.startswith(prefix)]
            for needle in (
                "Profile: smoke",
                "Budget: train 16, validation 4, test 8",
                "4 steps of batch 4",
                data,
                "Seeds: 0",
                "Git commit of the runs:",
                "Hardware:",
            ):
                assert any(needle in line for line in header), (basename, suffix, needle)
    markdown = (reproduced / "tables" / "table1_qm9.md").read_text()
    assert "| Target | Unit | PPGN (paper) |" in markdown


def test_every_this_run_cell_comes_from_the_metrics_of_its_run(reproduced):
    checked = 0
    for basename, dataset, _key_columns, trained in (
        ("table1_qm9", "qm9", ["Target"], {"U0", "mu"}),
        ("table2_md17", "md17", ["Molecule", "Quantity"], {"ethanol"}),
    ):
        table = _read_csv(reproduced / "tables" / f"{basename}.csv")
        markdown = (reproduced / "tables" / f"{basename}.md").read_text()
        for row in table.to_dict("records"):
            if dataset == "qm9":
                target = {label: t for t, (label, _, _) in dz.PAPER_TABLE1.items()}[row["Target"]]
                metric = "energy_mae"
            else:
                target = {label: m for m, label in dz.MD17_LABELS.items()}[row["Molecule"]]
                metric = f"{row['Quantity'].lower()}_mae"
            for model, label in (("dimenet", "DimeNet"), ("dimezblnet", "DimezblNet")):
                cell, runs = row[f"{label} (this run)"], row[f"{label} (this run) runs"]
                if target not in trained:
                    assert cell == "" and runs == "", (basename, target, model)
                    continue
                run_dirs = [reproduced / run for run in runs.split("; ")]
                assert [d.name for d in run_dirs] == [f"{model}_seed0"]
                values = []
                for run_dir in run_dirs:
                    assert run_dir.parent == reproduced / "runs" / "smoke" / dataset / target
                    config = json.loads((run_dir / "config.json").read_text())
                    assert (config["zbl"], config["target"]) == (model == "dimezblnet", target)
                    values.append(json.loads((run_dir / "metrics.json").read_text())["test"][metric])
                assert float(cell) == pytest.approx(np.mean(values), rel=1e-12, abs=0.0)
                assert f" {float(cell):.4g} |" in markdown
                checked += 1
            if target in trained:
                expected = 100 * (float(row["DimezblNet (this run)"]) / float(row["DimeNet (this run)"]) - 1)
                assert float(row["Change (this run, %)"]) == pytest.approx(expected, rel=1e-9)
    assert checked == 2 * 2 + 2 * 2  # (U0, mu) x 2 models + ethanol (energy, forces) x 2 models


def test_quoted_cells_of_the_tables_equal_the_paper(reproduced):
    table1 = _read_csv(reproduced / "tables" / "table1_qm9.csv").set_index("Target")
    for label, (_, cells) in parse_table1(PAPER_TABLE1_LINES).items():
        for column, cell in cells.items():
            assert table1.loc[label, f"{column} (paper)"] == (cell or ""), (label, column)
    table2 = _read_csv(reproduced / "tables" / "table2_md17.csv").set_index(["Molecule", "Quantity"])
    paper2 = parse_table2(PAPER_TABLE2_LINES)
    for key in table2.index:
        for column in dz.PAPER_TABLE2_COLUMNS:
            expected = paper2[key][column] if key in paper2 else "not reported"
            assert table2.loc[key, f"{column} (paper)"] == expected, (key, column)
    markdown = (reproduced / "tables" / "table2_md17.md").read_text()
    assert "| Uracil | Energy | kcal/mol | 0.11 | 0.14 | 0.115 | 0.107 |" in markdown
    assert "|  | Forces | kcal/mol/A | not reported | not reported | not reported | not reported |" in markdown


def _committed_file(relative: str):
    """The text of `relative` at git HEAD, or None where the repository is not a git checkout."""
    import subprocess

    try:
        return subprocess.run(
            ["git", "show", f"HEAD:{relative}"], cwd=dz.REPOSITORY_ROOT, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


@pytest.mark.parametrize("document", ["README.md", "docs/results.md"])
def test_documents_show_the_committed_tables(document, tmp_path):
    """The tables embedded in README.md (the fair headline, the cpu summary) and docs/results.md (smoke
    Tables 1 and 2) are the committed tables, row for row, so that no document shows numbers that no run
    produced (`dimezbl readme-tables` copies them after a rebuild). A `make reproduce` on another machine
    rewrites the smoke tables with its own numbers and leaves the documents as committed: then the committed
    documents are checked against the committed tables (git HEAD)."""
    names = dz.DOCUMENT_TABLES[document]
    text = (dz.REPOSITORY_ROOT / document).read_text()
    if dz.readme_with_tables(text, names=names) != text:
        committed = {relative: _committed_file(relative) for relative in [dz.README_TABLES[n] for n in names]}
        assert _committed_file(document) == text and None not in committed.values(), (
            f"{document}'s tables are stale: run dimezbl readme-tables"
        )
        for relative, content in committed.items():
            (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / relative).write_text(content)
        assert dz.readme_with_tables(text, root=tmp_path, names=names) == text, (
            f"{document}'s tables are stale: run dimezbl readme-tables"
        )
    for name in names:
        block = text.split(f"<!-- {name}:begin -->")[1].split(f"<!-- {name}:end -->")[0]
        assert len([line for line in block.splitlines() if line.startswith("|")]) > (
            2 if name == "fair_headline" else 7
        ), name
    assert sorted(n for names in dz.DOCUMENT_TABLES.values() for n in names) == sorted(dz.README_TABLES)


def test_readme_with_tables_replaces_blocks_and_names_what_is_missing(tmp_path):
    for name, relative in dz.README_TABLES.items():
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_text(f"- header\n\n| {name} |\n|---|\n| new |\n")
    readme = "".join(f"text\n<!-- {n}:begin -->\n| old |\n<!-- {n}:end -->\n" for n in dz.README_TABLES)
    updated = dz.readme_with_tables(readme, root=tmp_path)
    assert "| old |" not in updated and "- header" not in updated
    for name in dz.README_TABLES:
        assert f"<!-- {name}:begin -->\n| {name} |\n|---|\n| new |\n<!-- {name}:end -->" in updated
    assert dz.readme_with_tables(updated, root=tmp_path) == updated
    with pytest.raises(ValueError, match="cpu_summary:begin"):
        dz.readme_with_tables(readme.replace("<!-- cpu_summary:begin -->", ""), root=tmp_path)
    (tmp_path / dz.README_TABLES["cpu_summary"]).unlink()
    with pytest.raises(ValueError, match="summary.md is missing"):
        dz.readme_with_tables(readme, root=tmp_path)


def test_summary_markdown_has_a_row_per_target_with_both_models():
    values = {("mu", "dimenet", s): v for s, v in enumerate([0.30, 0.32, 0.31])}
    values.update({("mu", "dimezblnet", s): v for s, v in enumerate([0.29, 0.33, 0.30])})
    values[("homo", "dimenet", 0)] = 0.1  # one model only: no row
    table1 = dz.build_table1(_fake_runs(values), "cpu")
    table2 = dz.build_table2(_fake_runs({}), "cpu")
    rows = dz.summary_markdown(table1, table2).splitlines()
    assert len(rows) == 3 and rows[0].startswith("| test MAE | unit | seeds |")
    change = dz.relative_change([0.30, 0.32, 0.31], [0.29, 0.33, 0.30])
    assert rows[2] == (
        f"| QM9 mu | D | 0 1 2 | 0.31 ± 0.01 | {np.mean([0.29, 0.33, 0.30]):.4g} ± "
        f"{np.std([0.29, 0.33, 0.30], ddof=1):.2g} | {change[0]:+.1f}% [{change[1]:+.1f}, "
        f"{change[2]:+.1f}] | -4.5% |"
    )


def test_readme_cpu_summary_comes_from_the_committed_cpu_tables():
    """results/cpu/tables/summary.md (which README.md shows) is the summary of the committed cpu
    tables, and the README's run count is the tables' (runs committed since the last rebuild of
    the tables are not counted until the tables are rebuilt)."""
    import re

    readme = (dz.REPOSITORY_ROOT / "README.md").read_text()
    section = readme.split("## Results (cpu profile")[1].split("\n## ")[0]
    tables = dz.REPOSITORY_ROOT / "results" / "cpu" / "tables"
    qm9 = pd.read_csv(
        tables / "table1_qm9.csv",
        comment="#",
        dtype={"DimeNet (this run) seeds": str, "DimezblNet (this run) seeds": str},
    )
    md17 = pd.read_csv(
        tables / "table2_md17.csv",
        comment="#",
        dtype={"DimeNet (this run) seeds": str, "DimezblNet (this run) seeds": str},
    )
    rows = [line for line in (tables / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert rows == dz.summary_markdown(qm9, md17).splitlines() and len(rows) >= 12
    # the run count of the tables' headers ("Seeds: 0 1 2; 24 runs"), which count what they were built from
    in_tables = sum(
        int(re.search(r"; (\d+) runs", (tables / f"{name}.md").read_text()).group(1))
        for name in ("table1_qm9", "table2_md17")
    )
    claimed = re.search(r"(\d+) of the 120 runs", section)
    assert claimed and int(claimed.group(1)) == in_tables, (
        f"README says {claimed and claimed.group(0)}, the tables {in_tables}"
    )


def test_table_header_marks_each_commit_by_how_its_runs_were_trained():
    """Uncommitted changes and declared commits (a copy without git) are named per commit, not
    appended to the whole list, so that a clean commit is never shown as dirty."""
    runs = _fake_runs(
        {
            ("U0", "dimenet", 0): 1.0,
            ("U0", "dimenet", 1): 1.0,
            ("U0", "dimezblnet", 0): 1.0,
            ("U0", "dimezblnet", 1): 1.0,
        }
    )
    runs["git_commit"] = ["bbb", "aaa", "aaa", "ccc"]
    runs["git_dirty"] = [True, False, False, None]
    assert dz.tables._commits_text(runs) == (
        "aaa, bbb (uncommitted changes), ccc (declared, no git repository where it ran)"
    )
    runs["hardware"] = ["cpu (x86_64), 2 CPU cores, 2 torch threads"] * 3 + [
        "cuda (NVIDIA H200), 16 CPU cores, 1 torch threads"
    ]
    runs["train_wall_time_s"] = [800.0, 810.0, 820.0, 360.0]
    header = "\n".join(dz.table_header(runs, 1, "cpu"))
    assert (
        "Git commit of the runs: aaa, bbb (uncommitted changes), ccc (declared, no git repository "
        "where it ran); tables written at"
    ) in header
    assert (
        "Hardware: cpu (x86_64), 2 CPU cores, 2 torch threads; cuda (NVIDIA H200), 16 CPU cores, "
        "1 torch threads; training wall time per model 360-820 s"
    ) in header


def test_table1_shows_dimenets_own_values_beside_the_papers_and_flags_where_they_differ():
    """The paper's quoted DimeNet column differs from DimeNet's own Table 1 for U0 and R2 only; Table 1 shows both
    and recomputes the paper's change against DimeNet's own values."""
    table = dz.display_table(dz.build_table1(_fake_runs({("mu", "dimenet", 0): 1.0}), "cpu"))
    flagged = table[table[dz.DIMENET_OWN_COLUMN].str.endswith("*")]
    assert list(flagged["Target"]) == ["R2", "U0"]
    u0 = table[table["Target"] == "U0"].iloc[0]
    assert u0[dz.DIMENET_OWN_COLUMN] == "8.02 *" and u0["DimeNet (paper)"] == "8.29"
    assert u0["Change, paper"] == "-2.7%" and u0["Change, paper vs DimeNet's own"] == "+0.6%"
    same = table[table["Target"] == "HOMO"].iloc[0]
    assert same["Change, paper"] == same["Change, paper vs DimeNet's own"]
