"""Tables 1 and 2: the paper's values quoted, this project's runs beside them (Markdown, LaTeX, CSV)."""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pandas as pd

from .checkpoints import git_state
from .config import PROFILE_MD17_GENERATION
from .data import QM9_REPORTING_UNITS
from .files import REPOSITORY_ROOT, atomic_write_bytes, results_path
from .md17_generate import MD17_SAMPLE_EVERY, MD17_TEMPERATURE_K, MD17_TIMESTEP_FS
from .runner import _MD17_GENERATION_DEFAULTS, MODEL_LABELS, RUN_COLUMNS, collect_runs, generated_md17_path

# Cells are the strings printed in ../shared/paper/dimezblnet-paper.md (so "0.10" stays "0.10");
# None is the paper's "-" (no value). `paper_value` gives them as floats.

PAPER_TABLE1_COLUMNS = ("PPGN", "SchNet", "PhysNet", "Cormorant", "DimeNet", "DimezblNet")
PAPER_TABLE1 = {
    # QM9 target: (row label, unit as printed ("ao" read as a0), cells in PAPER_TABLE1_COLUMNS order)
    "mu": ("mu", "D", ("0.017", "0.033", "0.0529", "0.13", "0.0286", "0.0273")),
    "alpha": ("alpha", "a0^3", ("0.131", "0.235", "0.0615", "0.092", "0.0469", "0.0452")),
    "homo": ("HOMO", "meV", ("40.3", "41", "32.9", "36", "27.8", "26.7")),
    "lumo": ("LUMO", "meV", ("32.7", "34", "24.7", "36", "19.7", "18.9")),
    "gap": ("gap", "meV", ("60", "63", "42.5", "60", "34.8", "33.1")),
    "r2": ("R2", "a0^2", ("0.592", "0.703", "0.75", "0.673", "0.231", "0.217")),
    "zpve": ("ZPVE", "meV", ("3.12", "1.7", "1.395", "1.98", "1.29", "1.23")),
    "U0": ("U0", "meV", ("36.8", "18", "14", "13", "8.29", "8.07")),
    "U": ("U", "meV", ("36.8", "19", "14", None, "7.89", "7.63")),
    "H": ("H", "meV", ("36.3", "14", "14", None, "8.11", "7.92")),
    "G": ("G", "meV", ("36.4", "14", "14", None, "8.98", "8.71")),
    "cv": ("Cv", "(K*cal)/mol", ("0.055", "0.033", "0.028", "0.031", "0.0249", "0.0237")),
}
# The paper's units next to ours (QM9_REPORTING_UNITS): a0 is the bohr; "(K*cal)/mol" is how
# the paper prints QM9's cal/(mol K) for Cv (DimeNet's table, which it copies, has cal/(mol K)).
# DimeNet's own QM9 test MAEs (Gasteiger, Gross & Guennemann 2020, arXiv:2003.03123, Table 1; read here as quoted
# in dmlc/dgl's examples/pytorch/dimenet/README.md), in Table 1's units. The paper's DimeNet column differs from
# them for U0 (8.29 vs 8.02 meV) and R2 (0.231 vs 0.331 bohr^2); Table 1 shows both.
DIMENET_OWN_TABLE1 = {
    "mu": "0.0286", "alpha": "0.0469", "homo": "27.8", "lumo": "19.7", "gap": "34.8", "r2": "0.331",
    "zpve": "1.29", "U0": "8.02", "U": "7.89", "H": "8.11", "G": "8.98", "cv": "0.0249",
}  # fmt: skip
DIMENET_OWN_SOURCE = (
    "DimeNet's own Table 1 (Gasteiger, Gross & Guennemann 2020, arXiv:2003.03123; as quoted in dmlc/dgl "
    "examples/pytorch/dimenet/README.md)"
)
DIMENET_OWN_COLUMN = "DimeNet (its own paper)"
OWN_CHANGE_COLUMN = "Change (paper vs DimeNet's own, %)"

PAPER_TABLE1_UNIT_NOTE = (
    "units: a0^3 and a0^2 of the paper are bohr^3 and bohr^2; Cv is in cal/(mol K), printed '(K*cal)/mol' in the paper"
)

NOT_REPORTED = "not reported"  # the paper's Table 2 ends before uracil's forces row
PAPER_TABLE2_COLUMNS = ("sGDML", "SchNet", "DimeNet", "DimezblNet")  # printed "SGDML"
PAPER_TABLE2 = {
    # (MD17 molecule, quantity): cells in PAPER_TABLE2_COLUMNS order; energy kcal/mol, forces kcal/mol/A
    ("aspirin", "energy"): ("0.19", "0.37", "0.204", "0.194"),
    ("aspirin", "forces"): ("0.68", "1.35", "0.499", "0.473"),
    ("benzene", "energy"): ("0.1", "0.08", "0.078", "0.075"),
    ("benzene", "forces"): ("0.06", "0.31", "0.187", "0.181"),
    ("ethanol", "energy"): ("0.07", "0.08", "0.064", "0.062"),
    ("ethanol", "forces"): ("0.33", "0.39", "0.23", "0.217"),
    ("malonaldehyde", "energy"): ("0.10", "0.13", "0.104", "0.098"),
    ("malonaldehyde", "forces"): ("0.41", "0.66", "0.383", "0.367"),
    ("naphthalene", "energy"): ("0.12", "0.16", "0.122", "0.117"),
    ("naphthalene", "forces"): ("0.11", "0.58", "0.215", "0.208"),
    ("salicylic_acid", "energy"): ("0.12", "0.2", "0.134", "0.127"),
    ("salicylic_acid", "forces"): ("0.28", "0.85", "0.374", "0.361"),
    ("toluene", "energy"): ("0.1", "0.12", "0.102", "0.097"),
    ("toluene", "forces"): ("0.14", "0.57", "0.216", "0.207"),
    ("uracil", "energy"): ("0.11", "0.14", "0.115", "0.107"),
    ("uracil", "forces"): (NOT_REPORTED,) * 4,
}
MD17_LABELS = {
    "aspirin": "Aspirin",
    "benzene": "Benzene",
    "ethanol": "Ethanol",
    "malonaldehyde": "Malonaldehyde",
    "naphthalene": "Naphthalene",
    "salicylic_acid": "Salicylic acid",
    "toluene": "Toluene",
    "uracil": "Uracil",
}
MD17_QUANTITIES = ("energy", "forces")
MD17_UNITS = {"energy": "kcal/mol", "forces": "kcal/mol/A"}


def paper_value(table: int, row, column: str) -> Optional[float]:
    """A quoted cell of the paper's Table `table` (1 or 2) as a float; None where the paper has
    none ("-" in Table 1, uracil's forces in Table 2). `row` is a QM9 target (Table 1) or a
    (molecule, quantity) pair (Table 2)."""
    if table == 1:
        cells, columns = PAPER_TABLE1[row][2], PAPER_TABLE1_COLUMNS
    elif table == 2:
        cells, columns = PAPER_TABLE2[tuple(row)], PAPER_TABLE2_COLUMNS
    else:
        raise ValueError(f"the paper has Tables 1 and 2, not {table!r}")
    if column not in columns:
        raise ValueError(f"Table {table} has no column {column!r}: use one of {columns}")
    cell = cells[columns.index(column)]
    return None if cell in (None, NOT_REPORTED) else float(cell)


# --- Tables 1 and 2 (quoted columns beside this run's) ---------------------------------------------------

CHANGE_METHOD = (
    "relative change = 100 (DimezblNet - DimeNet) / DimeNet of the test MAE per seed "
    "(same seed, data, split and budget), negative = DimezblNet better; the mean over "
    "seeds, with a 95% paired Student-t interval (n - 1 degrees of freedom) where there "
    "are at least 2 seeds"
)


def _quoted_column(name: str) -> str:
    return f"{name} (paper)"


def _this_run_column(model: str) -> str:
    return f"{MODEL_LABELS[model]} (this run)"


def relative_change(dimenet: Sequence[float], dimezblnet: Sequence[float]) -> tuple:
    """(mean, low, high) of 100 (b - a) / a over paired seeds (percent); low/high: the 95%
    Student-t interval of the mean, NaN with fewer than 2 pairs; all NaN with none."""
    a, b = np.asarray(dimenet, dtype=np.float64), np.asarray(dimezblnet, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values needed: {a.size} DimeNet and {b.size} DimezblNet seeds")
    if a.size == 0:
        return math.nan, math.nan, math.nan
    change = 100.0 * (b - a) / a
    mean = float(change.mean())
    if change.size < 2:
        return mean, math.nan, math.nan
    from scipy.stats import t

    half = float(t.ppf(0.975, change.size - 1) * change.std(ddof=1) / math.sqrt(change.size))
    return mean, mean - half, mean + half


def _this_run_cells(runs: pd.DataFrame, dataset: str, target: str, quantity: str, models) -> dict:
    """Mean, sample std, seeds and run directories of each model, and the paired change."""
    metric = f"test_{quantity}_mae"
    cells, by_seed = {}, {}
    for model in models:
        rows = runs[(runs["dataset"] == dataset) & (runs["target"] == target) & (runs["model"] == model)]
        rows = rows.sort_values("seed")
        values = rows[metric].to_numpy(dtype=np.float64)
        column = _this_run_column(model)
        cells[column] = float(values.mean()) if values.size else math.nan
        cells[f"{column} std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
        cells[f"{column} seeds"] = " ".join(str(s) for s in rows["seed"])
        cells[f"{column} runs"] = "; ".join(rows["run_dir"])
        by_seed[model] = dict(zip(rows["seed"], values))
        if model == "dimenet":
            cells["Mean predictor (this run)"] = (
                float(rows[f"mean_predictor_{quantity}_mae"].iloc[0]) if values.size else math.nan
            )
    if set(models) >= {"dimenet", "dimezblnet"}:
        seeds = sorted(set(by_seed["dimenet"]) & set(by_seed["dimezblnet"]))
        change = relative_change([by_seed["dimenet"][s] for s in seeds], [by_seed["dimezblnet"][s] for s in seeds])
        cells.update(
            {
                "Change (this run, %)": change[0],
                "Change 95% low (this run, %)": change[1],
                "Change 95% high (this run, %)": change[2],
            }
        )
    return cells


def _paper_change(cells: Sequence[Optional[str]], columns: Sequence[str]) -> float:
    """100 (DimezblNet - DimeNet) / DimeNet from the paper's quoted cells (NaN where missing)."""
    values = dict(zip(columns, cells))
    try:
        dimenet, dimezblnet = float(values["DimeNet"]), float(values["DimezblNet"])
    except (TypeError, ValueError):
        return math.nan
    return 100.0 * (dimezblnet - dimenet) / dimenet


def build_table1(
    runs: pd.DataFrame, profile: Optional[str] = None, models: Sequence[str] = ("dimenet", "dimezblnet")
) -> pd.DataFrame:
    """Table 1 (QM9 test MAE) in the paper's layout: one row per target in the paper's order,
    Target, Unit (Table 1's units), the paper's six columns quoted ("<name> (paper)", strings as
    printed, None = "-"), the paper's own relative change, then for each model we train
    "<Model> (this run)" = mean test MAE over seeds (with std, seeds and run directories) and the
    paired relative change (CHANGE_METHOD). Targets without runs get NaN ("not run")."""
    runs = _select_runs(runs, "qm9", profile)
    rows = []
    for target, (label, _, cells) in PAPER_TABLE1.items():
        row = {"Target": label, "Unit": QM9_REPORTING_UNITS[target]}
        row.update({_quoted_column(c): cell for c, cell in zip(PAPER_TABLE1_COLUMNS, cells)})
        row["Change (paper, %)"] = _paper_change(cells, PAPER_TABLE1_COLUMNS)
        own = DIMENET_OWN_TABLE1[target]
        row[DIMENET_OWN_COLUMN] = own
        row[OWN_CHANGE_COLUMN] = _paper_change(
            [own if c == "DimeNet" else cell for c, cell in zip(PAPER_TABLE1_COLUMNS, cells)], PAPER_TABLE1_COLUMNS
        )
        row.update(_this_run_cells(runs, "qm9", target, "energy", models))
        rows.append(row)
    return pd.DataFrame(rows)


def build_table2(
    runs: pd.DataFrame, profile: Optional[str] = None, models: Sequence[str] = ("dimenet", "dimezblnet")
) -> pd.DataFrame:
    """Table 2 (MD17 test MAE of energies and forces) in the paper's layout: two rows (Energy,
    Forces) per molecule in the paper's order, the paper's four columns quoted (uracil's forces:
    NOT_REPORTED), then the "this run" columns as in `build_table1`."""
    runs = _select_runs(runs, "md17", profile)
    rows = []
    for (molecule, quantity), cells in PAPER_TABLE2.items():
        row = {"Molecule": MD17_LABELS[molecule], "Quantity": quantity.capitalize(), "Unit": MD17_UNITS[quantity]}
        row.update({_quoted_column(c): cell for c, cell in zip(PAPER_TABLE2_COLUMNS, cells)})
        row["Change (paper, %)"] = _paper_change(cells, PAPER_TABLE2_COLUMNS)
        row.update(_this_run_cells(runs, "md17", molecule, quantity, models))
        rows.append(row)
    return pd.DataFrame(rows)


def _select_runs(runs: pd.DataFrame, dataset: str, profile: Optional[str]) -> pd.DataFrame:
    missing = set(RUN_COLUMNS) - set(runs.columns)
    if missing:
        raise ValueError(f"runs table lacks columns {sorted(missing)}: build it with collect_runs or run_models")
    selected = runs[runs["dataset"] == dataset]
    if profile is not None:
        selected = selected[selected["profile"] == profile]
    profiles = sorted(set(selected["profile"]))
    if len(profiles) > 1:
        raise ValueError(f"runs of several profiles {profiles}: pass profile= to build one table per profile")
    return selected


# --- display (Markdown, LaTeX) and files ---


def _format_mae(mean: float, std: float, seeds: int = 0, expected_seeds: int = 0) -> str:
    """mean ± std; "(n of N seeds)" when a cell has fewer seeds than the table's fullest cell."""
    if not np.isfinite(mean):
        return "not run"
    text = f"{mean:.4g}" if not np.isfinite(std) else f"{mean:.4g} ± {std:.2g}"
    return text + (f" ({seeds} of {expected_seeds} seeds)" if 0 < seeds < expected_seeds else "")


def _seed_counts(column: pd.Series) -> List[int]:
    return [len(str(seeds).split()) if isinstance(seeds, str) else 0 for seeds in column]


def _format_change(mean: float, low: float = math.nan, high: float = math.nan) -> str:
    if not np.isfinite(mean):
        return "–"
    text = f"{mean:+.1f}%"
    return text + (f" [{low:+.1f}, {high:+.1f}]" if np.isfinite(low) else "")


def display_table(table: pd.DataFrame) -> pd.DataFrame:
    """The human-readable table (strings): quoted cells as printed ("–" where the paper has none),
    "this run" cells as mean ± std (with "(n of N seeds)" where a cell has fewer seeds than the
    table's fullest one, e.g. while a profile is part-way through), changes in percent with their 95% interval.
    The machine columns (std, seeds, run directories, interval bounds) stay in the CSV only."""
    shown = {}
    seed_columns = [c for c in table.columns if c.endswith("(this run) seeds")]
    expected_seeds = max((n for c in seed_columns for n in _seed_counts(table[c])), default=0)
    for column in table.columns:
        if (
            column.startswith("Change 95%")
            or column.endswith((" std", " seeds", " runs"))
            or column.startswith("Mean predictor")
        ):
            continue
        if column == "Change (this run, %)":
            shown["Change, this run"] = [
                _format_change(m, lo, hi)
                for m, lo, hi in zip(
                    table[column], table["Change 95% low (this run, %)"], table["Change 95% high (this run, %)"]
                )
            ]
        elif column == "Change (paper, %)":
            shown["Change, paper"] = [_format_change(v) for v in table[column]]
        elif column == OWN_CHANGE_COLUMN:
            shown["Change, paper vs DimeNet's own"] = [_format_change(v) for v in table[column]]
        elif column == DIMENET_OWN_COLUMN:  # "*": the paper quotes another DimeNet value
            quoted = table[_quoted_column("DimeNet")]
            shown[column] = [f"{own} *" if str(own) != str(q) else str(own) for own, q in zip(table[column], quoted)]
        elif column.endswith("(this run)"):
            counts = _seed_counts(table[f"{column} seeds"]) if f"{column} seeds" in table.columns else [0] * len(table)
            shown[column] = [
                _format_mae(m, s, n, expected_seeds) for m, s, n in zip(table[column], table[f"{column} std"], counts)
            ]
        elif column.endswith("(paper)"):
            shown[column] = [
                "–" if cell is None or (isinstance(cell, float) and math.isnan(cell)) else str(cell)
                for cell in table[column]
            ]
        elif column == "Molecule":  # the paper names each molecule once, on its energy row
            shown[column] = [
                name if k == 0 or name != table[column].iloc[k - 1] else "" for k, name in enumerate(table[column])
            ]
        else:
            shown[column] = [str(v) for v in table[column]]
    last = [c for c in ("Change, paper", "Change, paper vs DimeNet's own") if c in shown]
    order = [c for c in shown if c not in last] + last
    return pd.DataFrame(shown)[order]


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `display_table(table)`."""
    shown = display_table(table)
    lines = [_markdown_row(shown.columns), _markdown_row(["---"] * len(shown.columns))]
    lines += [_markdown_row(row) for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _markdown_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\^{}",
    "±": r"$\pm$",
    "–": "--",
}


def _latex_escape(text) -> str:
    return "".join(_LATEX_ESCAPES.get(char, char) for char in str(text))


def latex_table(table: pd.DataFrame) -> str:
    """A booktabs tabular of `display_table(table)` (needs \\usepackage{booktabs})."""
    shown = display_table(table)
    text_columns = sum(c in ("Target", "Molecule", "Quantity", "Unit") for c in shown.columns)
    spec = "l" * text_columns + "r" * (len(shown.columns) - text_columns)
    lines = [
        rf"\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in shown.columns) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _range_text(values) -> str:
    values = sorted({v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})
    if not values:
        return "?"
    if len(values) == 1:
        return f"{values[0]:,}" if isinstance(values[0], (int, np.integer)) else str(values[0])
    return (
        f"{values[0]:,}-{values[-1]:,}"
        if all(isinstance(v, (int, np.integer)) for v in values)
        else ", ".join(map(str, values))
    )


def _commits_text(runs: pd.DataFrame) -> str:
    """The commits that trained these runs, each marked where some of its runs ran with
    uncommitted changes, or on a copy without git whose commit was declared (dirty unknown)."""
    texts = []
    for commit, group in runs.groupby(runs["git_commit"].fillna("?"), sort=True):
        flags = list(group["git_dirty"])
        notes = [
            note
            for note, present in (
                ("uncommitted changes", any(flag is True for flag in flags)),
                (
                    "declared, no git repository where it ran",
                    commit != "?" and any(flag is None or flag != flag for flag in flags),
                ),
            )
            if present
        ]
        texts.append(f"{commit} ({'; '.join(notes)})" if notes else str(commit))
    return ", ".join(texts) or "?"


def _md17_data_text(runs: pd.DataFrame) -> str:
    """Where the MD17 data of these runs came from, in words."""
    sources = sorted(set(runs["md17_source"].dropna()))
    if sources != ["generated"]:
        return f"MD17 from {', '.join(sources) or '?'} (sGDML/rMD17 npz files; DFT, PBE+vdW-TS, the data of the paper)"
    details, spacing_fs = [], set()
    for (molecule, profile, data_dir), rows in runs.groupby(
        [runs["target"], runs["profile"], runs["data_dir"].fillna("")], sort=True
    ):
        # the size of the data set the splits were taken from, from the runs themselves (the data
        # file need not be here: committed runs come without their data)
        sizes = sorted(set((rows["n_train"] + rows["n_valid"] + rows["n_test"]).astype(int)))
        details.append(f"{molecule} {'/'.join(str(n) for n in sizes)}")
        sidecar = generated_md17_path(molecule, profile, data_dir or None).with_suffix(".json")
        # the generator's settings: from the data set's sidecar, else the ones the profile uses
        info = (
            json.loads(sidecar.read_text())
            if sidecar.exists()
            else {**_MD17_GENERATION_DEFAULTS, **PROFILE_MD17_GENERATION.get(profile, {})}
        )
        spacing_fs.add(info.get("sample_every", MD17_SAMPLE_EVERY) * info.get("timestep_fs", MD17_TIMESTEP_FS))
    counts = f" ({', '.join(details)} configurations)" if details else ""
    spacing = ", ".join(f"{s:g}" for s in sorted(spacing_fs)) or f"{MD17_SAMPLE_EVERY * MD17_TIMESTEP_FS:g}"
    return (
        "MD17-style data generated here with GFN2-xTB (semi-empirical tight binding, tblite), "
        f"Langevin MD at {MD17_TEMPERATURE_K:g} K, one configuration every "
        f"{spacing} fs{counts}. This is NOT the DFT "
        "(PBE+vdW-TS) data of MD17 that the paper used: only the two 'this run' columns are "
        "comparable with each other, not with the paper's columns"
    )


def table_header(runs: pd.DataFrame, table: int, profile: str) -> list:
    """The provenance block of a table: profile, budget (sizes, steps), data source and level of
    theory, seeds, git commits, hardware and how the change is computed."""
    dataset = {1: "qm9", 2: "md17"}[table]
    runs = _select_runs(runs, dataset, profile)
    if table == 1:
        lines = [
            "Table 1: MAE of the QM9 targets on the test set (Tao & Wan), regenerated",
            f"Data: QM9 from qm9pack (B3LYP/6-31G(2df,p)), DimeNet's split (RandomState(42)), {PAPER_TABLE1_UNIT_NOTE}",
        ]
    else:
        lines = [
            "Table 2: MAE of MD17 energies (kcal/mol) and forces (kcal/mol/A) on the test set (Tao & Wan), regenerated",
            f"Data: {_md17_data_text(runs) if not runs.empty else 'no MD17 runs'}",
        ]
    paper_columns = PAPER_TABLE1_COLUMNS if table == 1 else PAPER_TABLE2_COLUMNS
    lines.append(
        f"Columns '(paper)': {', '.join(paper_columns)} quoted verbatim from the paper's Table "
        f"{table} (not re-run here); 'Change, paper' is computed from those quoted numbers"
    )
    if table == 1:
        lines.append(
            f"Column '{DIMENET_OWN_COLUMN}': {DIMENET_OWN_SOURCE}; '*' where the paper's quoted DimeNet value "
            "differs (U0: 8.29 in the paper vs 8.02 meV, R2: 0.231 vs 0.331 bohr^2); 'Change, paper vs DimeNet's "
            "own' is the paper's DimezblNet against those values"
        )
    else:
        lines.append(
            "The paper's DimeNet column is quoted as printed; DimeNet's own MD17 table (arXiv:2003.03123, Table 2) "
            "was not available as readable text here to check it against (the aspirin and benzene force MAEs, "
            "0.499 and 0.187 kcal/mol/A, agree with listings of it)"
        )
    lines.append(
        "Columns '(this run)': test MAE of the models trained here, mean ± sample std over seeds; " + CHANGE_METHOD
    )
    lines.append(f"Profile: {profile}")
    if runs.empty:
        lines.append("No runs of this profile were found: the 'this run' columns are empty")
    else:
        wall = runs["train_wall_time_s"].dropna()
        hardware = "; ".join(sorted(set(runs["hardware"].dropna()))) or "?"  # each text has commas
        lines += [
            f"Budget: train {_range_text(runs['n_train'])}, validation {_range_text(runs['n_valid'])}, "
            f"test {_range_text(runs['n_test'])} molecules/configurations; {_range_text(runs['steps'])} "
            f"steps of batch {_range_text(runs['batch_size'])} (stopped by {_range_text(runs['stop_reason'])}); "
            f"model overrides {_range_text(runs['model_overrides'])} ({{}} = DimeNet's architecture); "
            f"parameters {_range_text(runs['num_parameters'].dropna().astype(int))}",
            f"Seeds: {' '.join(str(s) for s in sorted(set(runs['seed'])))}; {len(runs)} runs "
            f"({runs['target'].nunique()} {'targets' if table == 1 else 'molecules'} with runs)",
            f"Git commit of the runs: {_commits_text(runs)}; tables written at {git_state().get('commit')}",
            f"Hardware: {hardware}; training wall time per model {_range_text([int(round(w)) for w in wall])} s"
            if len(wall)
            else f"Hardware: {hardware}",
        ]
    lines.append(f"Written: {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {platform.node() or '?'}")
    return lines


def write_table(table: pd.DataFrame, header_lines: Sequence[str], basename: str, results_dir=None) -> dict:
    """Write <results_dir>/tables/<basename>.{csv,md,tex}, each opening with the header block
    (CSV: '# ' lines, read back with pandas.read_csv(path, comment='#'); Markdown: a list; LaTeX:
    '% ' comments). The CSV holds every column (machine-readable: means, std, seeds, run
    directories); Markdown and LaTeX hold `display_table`. All three are written to temporary
    names first and renamed only when all are complete, so a failure leaves the old tables."""
    folder = results_path(results_dir, "tables")
    folder.mkdir(parents=True, exist_ok=True)
    header = [str(line).replace("\n", " ") for line in header_lines]
    contents = {
        "csv": "".join(f"# {line}\n" for line in header) + table.to_csv(index=False),
        "md": "".join(f"- {line}\n" for line in header) + "\n" + markdown_table(table),
        "tex": "".join(f"% {line}\n" for line in header) + latex_table(table),
    }
    paths, temporary = {}, []
    try:
        for suffix, text in contents.items():
            path = folder / f"{basename}.{suffix}"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmp.write_text(text, encoding="utf-8")
            temporary.append(tmp)
            paths[suffix] = path
        for tmp, path in zip(temporary, paths.values()):
            os.replace(tmp, path)
    finally:
        for tmp in temporary:
            tmp.unlink(missing_ok=True)
    return paths


def summary_markdown(table1: pd.DataFrame, table2: pd.DataFrame) -> str:
    """The compact comparison of both tables: one Markdown row per QM9 target and MD17
    (molecule, quantity) where both models have runs, in the tables' order, with the unit, the
    seeds, both models' mean ± std, the paired change with its 95% interval, and the paper's
    change (from its quoted numbers). Every cell is formatted as in `markdown_table`."""
    header = [
        "test MAE",
        "unit",
        "seeds",
        "DimeNet (this run)",
        "DimezblNet (this run)",
        "change, this run",
        "change, paper",
    ]
    lines = [_markdown_row(header), _markdown_row(["---"] * len(header))]
    for table, label in (
        (table1, lambda row: f"QM9 {row['Target']}"),
        (table2, lambda row: f"{row['Molecule']} {row['Quantity'].lower()}"),
    ):
        for _, row in table.iterrows():
            if not (np.isfinite(row["DimeNet (this run)"]) and np.isfinite(row["DimezblNet (this run)"])):
                continue
            seeds = row["DimeNet (this run) seeds"]
            if seeds != row["DimezblNet (this run) seeds"]:
                seeds = f"{seeds} / {row['DimezblNet (this run) seeds']}"
            cells = [
                label(row),
                row["Unit"],
                seeds,
                _format_mae(row["DimeNet (this run)"], row["DimeNet (this run) std"]),
                _format_mae(row["DimezblNet (this run)"], row["DimezblNet (this run) std"]),
                _format_change(
                    row["Change (this run, %)"],
                    row["Change 95% low (this run, %)"],
                    row["Change 95% high (this run, %)"],
                ),
                _format_change(row["Change (paper, %)"]),
            ]
            lines.append(_markdown_row(cells))
    return "\n".join(lines) + "\n"


# README.md shows these committed tables between <!-- name:begin --> and <!-- name:end -->
README_TABLES = {
    "table1_qm9": "results/tables/table1_qm9.md",
    "table2_md17": "results/tables/table2_md17.md",
    "cpu_summary": "results/cpu/tables/summary.md",
    "fair_headline": "results/fair/tables/headline.md",
}
# which document shows which of them (relative to the repository root)
DOCUMENT_TABLES = {"README.md": ("fair_headline", "cpu_summary"), "docs/results.md": ("table1_qm9", "table2_md17")}


def readme_with_tables(readme: str, root=None, names=None) -> str:
    """`readme` (a document's text, README.md by default) with each block of `names` (README_TABLES keys;
    default: all) replaced by the table rows (the lines starting with "|") of its committed file under `root`
    (the repository by default). Raises ValueError naming a block whose markers are missing or a file that is
    missing."""
    root = Path(root) if root is not None else REPOSITORY_ROOT
    for name in README_TABLES if names is None else names:
        relative = README_TABLES[name]
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if readme.count(begin) != 1 or readme.count(end) != 1 or readme.index(begin) > readme.index(end):
            raise ValueError(
                f"README lacks one '{begin}' ... '{end}' block: add the two markers where {relative} should be shown"
            )
        path = root / relative
        if not path.exists():
            raise ValueError(f"{path} is missing: write it with the notebooks (make reproduce, notebook 05)")
        rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
        head, rest = readme.split(begin)
        tail = rest.split(end)[1]
        readme = head + begin + "\n" + "".join(f"{row}\n" for row in rows) + end + tail
    return readme


def read_table(path) -> pd.DataFrame:
    """A table CSV written by `write_table` (header lines skipped; "–" cells stay strings)."""
    return pd.read_csv(path, comment="#", dtype=str, keep_default_na=False)


def make_tables(profile: str, results_dir=None) -> dict:
    """Build Tables 1 and 2 from the runs of `profile` on disk and write them
    (results/tables/table1_qm9.* and table2_md17.*), and their compact comparison
    (results/tables/summary.md, `summary_markdown`). Returns {"table1": df, "table2": df}."""
    runs = collect_runs(profile, results_dir=results_dir)
    table1, table2 = build_table1(runs, profile), build_table2(runs, profile)
    write_table(table1, table_header(runs, 1, profile), "table1_qm9", results_dir)
    write_table(table2, table_header(runs, 2, profile), "table2_md17", results_dir)
    summary = (
        f"<!-- written by make_tables for profile {profile!r} from table1_qm9.csv and table2_md17.csv "
        "(their headers give the provenance); negative change = DimezblNet better -->\n\n"
        + summary_markdown(table1, table2)
    )
    atomic_write_bytes(results_path(results_dir, "tables", "summary.md"), summary.encode("utf-8"))
    return {"table1": table1, "table2": table2}
