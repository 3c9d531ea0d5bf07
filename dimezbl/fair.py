"""The fair test of the paper's claim: DimeNet against three ZBL recipes, matched start, converging schedule.

Every model of a cell trains on the same data and split with the same per-element offset method, DimeNet's
warm-up and exponential decay compressed to the run (the `fair` and `fair_long` profiles of dimezbl.config), and
four seeds. The statistics compare each recipe with DimeNet seed by seed (`paired_change`). docs/fair.md
describes the experiment; `dimezbl fair train` trains (resumable), `dimezbl fair report`
writes results/fair/tables and results/fair/figures from the finished runs without training.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from . import config, figures, files, runner, shortrange, tables

FAIR_RESULTS_DIR = "results/fair"  # relative to the repository root (files.results_path)
FAIR_NOTEBOOK = "06_fair.ipynb"  # shows the tables and figures; not part of `make reproduce` (it trains nothing)
FAIR_MODELS = ("dimenet", "dimezblnet", "dimezblnet_switched", "dimezblnet_interpolated")
RECIPE_LABELS = {
    "dimenet": "DimeNet",
    "dimezblnet": "(a) literal ZBL",
    "dimezblnet_switched": "(b) switched ZBL",
    "dimezblnet_interpolated": "(c) interpolated ZBL",
}
# Models trained with the first seed of a cell only: recipes (b) and (c) are zero on data whose pairs all
# lie beyond their reach (0.75 x the covalent radii sum; 0.7 A), as every pair of QM9 and the generated MD17
# sets does, and then train exactly as DimeNet; the first seed checks that equality (`verdict`).
ONE_SEED_MODELS = ("dimezblnet_switched", "dimezblnet_interpolated")
PAPER_CLAIM_PERCENT = (-5.3, -3.6)  # the paper's abstract: 3.6-5.3% lower errors than DimeNet
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Cell:
    """One comparison: a data set and target trained by every model of FAIR_MODELS under `profile`."""

    dataset: str  # "qm9" or "md17"
    target: str  # QM9 target or MD17 molecule
    profile: str = "fair"  # "fair" (2,000 steps) or "fair_long" (8,000 steps)

    @property
    def max_steps(self) -> int:
        return int(config.PROFILES[self.profile]["max_steps"])

    @property
    def quantities(self) -> tuple:
        return ("energy", "forces") if self.dataset == "md17" else ("energy",)

    @property
    def label(self) -> str:
        return f"{'MD17' if self.dataset == 'md17' else 'QM9'} {self.target}, {self.max_steps:,} steps"


# In training order: the energy cells at 2,000 steps, then ethanol at 8,000 steps (where the gap goes as
# training converges), then QM9 alpha.
FAIR_CELLS = (
    Cell("md17", "ethanol"),
    Cell("md17", "malonaldehyde"),
    Cell("qm9", "U0"),
    Cell("md17", "ethanol", "fair_long"),
    Cell("qm9", "alpha"),
)


def train_fair(
    cells: Sequence[Cell] = FAIR_CELLS,
    seeds: Optional[Sequence[int]] = None,
    models: Sequence[str] = FAIR_MODELS,
    results_dir=FAIR_RESULTS_DIR,
    progress: bool = True,
    **overrides,
) -> pd.DataFrame:
    """Train (or resume, or reuse) every run of `cells`, seed by seed with all models of a seed together
    (ONE_SEED_MODELS with the first seed only: it checks that they equal DimeNet on these data, more would
    repeat it); returns the finished runs (`runner.collect_runs` rows of both profiles). overrides: TrainConfig
    fields."""
    skipped = []  # cells whose data here differ from their finished runs': the other cells still train
    for cell in cells:
        cell_seeds = list(runner.profile_seeds(cell.profile) if seeds is None else seeds)
        try:
            for k, seed in enumerate(cell_seeds):
                cell_models = [m for m in models if k == 0 or m not in ONE_SEED_MODELS]
                runner.run_models(
                    cell.profile,
                    cell.dataset,
                    [cell.target],
                    seeds=[seed],
                    models=cell_models,
                    results_dir=results_dir,
                    progress=progress,
                    reuse_committed=True,
                    **overrides,
                )
        except runner.OtherDataError as error:
            print(f"skipping {cell.label}: {error}", flush=True)
            skipped.append(f"{cell.label}: {error}")
    if skipped:
        raise runner.OtherDataError("not trained, the other cells were:\n" + "\n".join(skipped))
    return fair_runs(results_dir)


def fair_runs(results_dir=FAIR_RESULTS_DIR) -> pd.DataFrame:
    """Every finished run of the fair profiles, with the data sha256, offset method and last learning rate
    its files record (columns data_sha256, offset_method, final_learning_rate, profile)."""
    frames = [runner.collect_runs(profile, results_dir=results_dir) for profile in ("fair", "fair_long")]
    runs = (
        pd.concat([f for f in frames if not f.empty], ignore_index=True)
        if any(not f.empty for f in frames)
        else pd.DataFrame(columns=list(runner.RUN_COLUMNS))
    )
    extra = []
    for run_dir in runs["run_dir"]:
        path = files.results_path(results_dir, run_dir)
        fix = runner._retrain_hint(path)
        metrics = runner._read_run_file(path / "metrics.json", fix)
        provenance_path = path / "provenance.json"
        provenance = runner._read_run_file(provenance_path, fix) if provenance_path.exists() else {}
        extra.append(
            {
                "data_sha256": provenance.get("data", {}).get("content_sha256"),
                "offset_method": metrics.get("offset_method"),
                "final_learning_rate": metrics.get("final_learning_rate"),
            }
        )
    return pd.concat([runs, pd.DataFrame(extra, index=runs.index)], axis=1)


# --- statistics that do not inflate -----------------------------------------------------------------


def _percent(log_ratio: float) -> float:
    return 100.0 * math.expm1(log_ratio)


def paired_change(baseline: Sequence[float], model: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """The change of `model`'s errors against `baseline`'s, seed by seed (the same seed's pair in each entry).

    d_s = ln(model_s / baseline_s); change = mean of d_s with its Student-t interval at `confidence`, shown as
    percent 100 (e^x - 1). ratio_of_means_pct = 100 (mean model / mean baseline - 1). resolution_pct is the
    interval's half-width as percent, 100 (e^h - 1): the smallest change this many seeds at this spread could
    tell from none. Fewer than two pairs give NaN intervals."""
    from scipy import stats

    baseline, model = np.asarray(baseline, dtype=float), np.asarray(model, dtype=float)
    if baseline.shape != model.shape or baseline.ndim != 1 or baseline.size == 0:
        raise ValueError(
            f"paired_change needs two equally long, non-empty sequences, got {baseline.shape} and {model.shape}"
        )
    if (baseline <= 0).any() or (model <= 0).any():
        raise ValueError("errors must be positive for log-ratios")
    d = np.log(model / baseline)
    n, mean = d.size, float(d.mean())
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return {
        "pairs": n,
        "identical": bool((model == baseline).all()),
        "change_pct": _percent(mean),
        "low_pct": _percent(mean - half),
        "high_pct": _percent(mean + half),
        "resolution_pct": _percent(half),
        "ratio_of_means_pct": 100.0 * (model.mean() / baseline.mean() - 1.0),
    }


def verdict(change: dict) -> str:
    """What a `paired_change` says: lower/higher error than DimeNet where the interval excludes 0."""
    if change.get("pairs", 0) >= 1 and change.get("identical", False):
        return "identical to DimeNet"
    if change.get("pairs", 0) < 2 or math.isnan(change.get("low_pct", math.nan)):
        return "too few seeds"
    if change["high_pct"] < 0:
        return "lower error"
    if change["low_pct"] > 0:
        return "higher error"
    return "no difference resolved"


def resolves_claim(change: dict) -> bool:
    """True when the cell could tell the paper's smallest claimed gain (3.6%) from no change."""
    return change.get("resolution_pct", math.nan) < -PAPER_CLAIM_PERCENT[1]


def _paper_change(cell: Cell, quantity: str) -> float:
    table, row = (1, cell.target) if cell.dataset == "qm9" else (2, (cell.target, quantity))
    dimenet, dimezblnet = tables.paper_value(table, row, "DimeNet"), tables.paper_value(table, row, "DimezblNet")
    return math.nan if dimenet is None or dimezblnet is None else 100.0 * (dimezblnet / dimenet - 1.0)


def fair_summary(runs: pd.DataFrame, cells: Sequence[Cell] = FAIR_CELLS) -> pd.DataFrame:
    """One row per (cell, quantity, recipe): DimeNet's and the recipe's test MAE (mean, std over seeds), the
    paired change (`paired_change`) over the seeds both have, its verdict, whether it resolves the paper's
    claim, and the paper's own change for that target. A cell whose runs record different data (content
    sha256) is not compared (verdict "data differ")."""
    rows = []
    for cell in cells:
        selected = runs[
            (runs["profile"] == cell.profile) & (runs["dataset"] == cell.dataset) & (runs["target"] == cell.target)
        ]
        if selected.empty:
            continue
        same_data = selected["data_sha256"].nunique(dropna=False) == 1
        for quantity in cell.quantities:
            column = f"test_{quantity}_mae"
            base = selected[selected["model"] == "dimenet"].set_index("seed")[column]
            unit = selected[f"{quantity}_unit"].iloc[0]
            for model in FAIR_MODELS[1:]:
                other = selected[selected["model"] == model].set_index("seed")[column]
                seeds = sorted(set(base.index) & set(other.index))
                change = paired_change(base[seeds], other[seeds]) if seeds and same_data else {}
                rows.append({
                    "cell": cell.label, "dataset": cell.dataset, "target": cell.target, "steps": cell.max_steps,
                    "quantity": quantity, "unit": unit, "model": model, "recipe": RECIPE_LABELS[model],
                    "seeds": len(seeds), "dimenet_mean": base[seeds].mean() if seeds else math.nan,
                    "dimenet_std": base[seeds].std(ddof=1) if len(seeds) > 1 else math.nan,
                    "model_mean": other[seeds].mean() if seeds else math.nan,
                    "model_std": other[seeds].std(ddof=1) if len(seeds) > 1 else math.nan,
                    **{k: change.get(k, math.nan) for k in ("change_pct", "low_pct", "high_pct", "resolution_pct",
                                                            "ratio_of_means_pct")},
                    "verdict": verdict(change) if same_data else "data differ",
                    "resolves_paper_claim": resolves_claim(change) if change else False,
                    "paper_change_pct": _paper_change(cell, quantity),
                })  # fmt: skip
    return pd.DataFrame(rows)


# --- tables and figures ---------------------------------------------------------------------------------


def _quantity_label(row) -> str:
    """What a row's MAE measures: the QM9 target (U0, alpha, ...) or MD17 energy / forces."""
    return str(row["target"]) if row["dataset"] == "qm9" else str(row["quantity"])


def _mean_std(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.4g} ± {std:.2g}" if not math.isnan(std) else f"{mean:.4g}"


def _change_text(row) -> str:
    if math.isnan(row["change_pct"]):
        return "-"
    if row["verdict"] == "identical to DimeNet":
        return "0 (bit-identical)"
    if math.isnan(row["low_pct"]):
        return f"{row['change_pct']:+.1f}% (one seed)"
    return f"{row['change_pct']:+.1f}% [{row['low_pct']:+.1f}, {row['high_pct']:+.1f}]"


def summary_markdown(summary: pd.DataFrame, runs: pd.DataFrame) -> str:
    """results/fair/tables/summary.md: provenance, then one row per (cell, quantity, recipe)."""
    # a resumed run records the commit of each of its training segments; each is listed
    commits = sorted({part[:7] for c in runs["git_commit"].dropna() for part in runner.segment_texts(c)})
    lines = [
        "# The fair test: DimeNet against three ZBL recipes",
        "",
        f"Runs: {len(runs)} finished (profiles fair and fair_long, results/fair/runs/; each row of runs.csv names"
        " its run directory and metrics.json). Same architecture (64 channels, 4 blocks), per-element"
        " least-squares offsets, warm-up then exponential decay of the learning rate by 100x over the run,"
        " EMA 0.99, batch 32; test MAE of the best validation checkpoint.",
        f"Commits: {', '.join(commits) or '-'}. Hardware: "
        f"{'; '.join(sorted(runs['hardware'].dropna().unique())) or '-'}.",
        f"Offset methods: {'; '.join(sorted(runs['offset_method'].dropna().unique())) or '-'}. Final learning rates: "
        + (
            f"{runs['final_learning_rate'].min():.3g} to {runs['final_learning_rate'].max():.3g}."
            if runs["final_learning_rate"].notna().any()
            else "-."
        ),
        "Change: mean over seeds of ln(recipe MAE / DimeNet MAE) of the same seed, as percent, with its 95%"
        " t-interval; ratio of means: mean recipe MAE / mean DimeNet MAE - 1; resolution: the interval's"
        " half-width, the smallest change the cell can tell from none. The paper's change is its own"
        " (DimezblNet - DimeNet) / DimeNet from its Tables 1 and 2, quoted.",
        "",
        "| cell | quantity | recipe | seeds | DimeNet MAE | recipe MAE | change [95% CI] | ratio of means |"
        " resolution | verdict | resolves 3.6%? | paper's change |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in summary.iterrows():
        lines.append(
            f"| {row['cell']} | {_quantity_label(row)} ({row['unit']}) | {row['recipe']} | {row['seeds']} | "
            f"{_mean_std(row['dimenet_mean'], row['dimenet_std'])} | "
            f"{_mean_std(row['model_mean'], row['model_std'])} | "
            f"{_change_text(row)} | "
            + ("-" if math.isnan(row["ratio_of_means_pct"]) else f"{row['ratio_of_means_pct']:+.1f}%")
            + " | "
            + ("-" if math.isnan(row["resolution_pct"]) else f"±{row['resolution_pct']:.1f}%")
            + f" | {row['verdict']} | {'yes' if row['resolves_paper_claim'] else 'no'} | "
            + ("-" if math.isnan(row["paper_change_pct"]) else f"{row['paper_change_pct']:+.1f}%")
            + " |"
        )
    for cell in FAIR_CELLS:
        shas = runs[(runs["profile"] == cell.profile) & (runs["target"] == cell.target)]["data_sha256"].dropna()
        if not shas.empty:
            lines.append(f"\nData of {cell.label}: content sha256 " + ", ".join(sorted(s[:16] for s in shas.unique())))
    return "\n".join(lines) + "\n"


def headline_markdown(summary: pd.DataFrame) -> str:
    """tables/headline.md (shown in the README): one row per cell and quantity, DimeNet's test MAE and each
    recipe's paired change against it."""
    lines = [
        "| cell | quantity | DimeNet MAE (seeds) | "
        + " | ".join(RECIPE_LABELS[m] for m in FAIR_MODELS[1:])
        + " | paper's change |",
        "|---|---|---|" + "---|" * len(FAIR_MODELS),
    ]
    for (cell, _), rows in summary.groupby(["cell", "quantity"], sort=False):
        rows = rows.set_index("model")
        literal = rows.loc["dimezblnet"] if "dimezblnet" in rows.index else rows.iloc[0]
        cells = [_change_text(rows.loc[m]) if m in rows.index else "-" for m in FAIR_MODELS[1:]]
        paper = literal["paper_change_pct"]
        lines.append(
            f"| {cell} | {_quantity_label(literal)} ({literal['unit']}) | "
            f"{_mean_std(literal['dimenet_mean'], literal['dimenet_std'])} ({literal['seeds']}) | "
            + " | ".join(cells)
            + " | "
            + ("-" if math.isnan(paper) else f"{paper:+.1f}%")
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot_paired_change(summary: pd.DataFrame, results_dir=FAIR_RESULTS_DIR, name: str = "fair_paired_change"):
    """Forest plot: each recipe's paired change against DimeNet per cell and quantity, 95% intervals, with the
    paper's claimed band shaded. PNG in <results_dir>/figures/."""
    groups = summary.drop_duplicates(["cell", "quantity"])
    fig, axes = figures._figure(width=7.0, height=0.45 * max(4, len(groups) * 3))
    ax = axes[0, 0]
    keys = list(zip(groups["cell"], groups["quantity"]))
    colors = figures.MODEL_COLORS
    for k, (cell, quantity) in enumerate(keys):
        for m, model in enumerate(FAIR_MODELS[1:]):
            row = summary[(summary["cell"] == cell) & (summary["quantity"] == quantity) & (summary["model"] == model)]
            if row.empty or math.isnan(row["change_pct"].iloc[0]):
                continue
            row = row.iloc[0]
            y = -(k * 4 + m)
            ax.errorbar(
                row["change_pct"],
                y,
                xerr=[[row["change_pct"] - row["low_pct"]], [row["high_pct"] - row["change_pct"]]],
                fmt="o",
                color=colors[model],
                label=RECIPE_LABELS[model] if k == 0 else None,
                capsize=3,
            )
    ax.axvspan(*PAPER_CLAIM_PERCENT, color="tab:blue", alpha=0.15, label="paper's claim (-5.3 to -3.6%)")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_xscale("symlog", linthresh=10.0)
    labels = [f"{row['cell']}\n{_quantity_label(row)}" for _, row in groups.iterrows()]
    ax.set_yticks([-(k * 4 + 1) for k in range(len(keys))], labels, fontsize=7)
    ax.set_xlabel("test MAE change against DimeNet, % (paired over seeds, 95% CI)")
    ax.legend(fontsize=7, loc="lower right")
    return figures.save_figure(fig, name, results_dir)


def plot_convergence(
    runs: pd.DataFrame, target: str = "ethanol", results_dir=FAIR_RESULTS_DIR, name: str = "fair_ethanol_convergence"
):
    """Validation force MAE (mean over seeds) against step for each model at 2,000 and 8,000 steps."""
    fig, axes = figures._figure(width=6.0, height=4.0)
    ax = axes[0, 0]
    colors = figures.MODEL_COLORS
    for profile, style in (("fair", "--"), ("fair_long", "-")):
        for model in FAIR_MODELS:
            selected = runs[(runs["profile"] == profile) & (runs["target"] == target) & (runs["model"] == model)]
            curves = [
                pd.read_csv(files.results_path(results_dir, d, "learning_curve.csv")).set_index("step")
                for d in selected["run_dir"]
            ]
            if not curves:
                continue
            mean = pd.concat([c["valid_forces_mae"] for c in curves], axis=1).mean(axis=1)
            steps = int(config.PROFILES[profile]["max_steps"])
            ax.plot(
                mean.index,
                mean.values,
                style,
                color=colors[model],
                label=f"{RECIPE_LABELS[model]}, {steps:,} steps ({len(curves)} seed{'s' if len(curves) != 1 else ''})",
            )
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"validation force MAE, {target} (kcal/mol/A)")
    ax.legend(fontsize=6)
    return figures.save_figure(fig, name, results_dir)


def write_fair_report(results_dir=FAIR_RESULTS_DIR) -> list:
    """Write tables/summary.md, tables/summary.csv, tables/runs.csv and the figures from the finished runs
    (no training); returns the paths written."""
    results_dir = files.results_path(results_dir)
    runs = fair_runs(results_dir)
    if runs.empty:
        raise FileNotFoundError(
            f"no finished fair runs under {results_dir}/runs: train them first (dimezbl fair train)"
        )
    summary = fair_summary(runs)
    table_dir = results_dir / "tables"
    table_dir.mkdir(parents=True, exist_ok=True)
    paths = [table_dir / name for name in ("summary.md", "summary.csv", "runs.csv", "headline.md")]
    files.atomic_write_bytes(paths[0], summary_markdown(summary, runs).encode())
    files.atomic_write_bytes(paths[3], headline_markdown(summary).encode())
    files.atomic_write_bytes(paths[1], summary.to_csv(index=False).encode())
    files.atomic_write_bytes(paths[2], runs.to_csv(index=False).encode())
    if not summary.empty:
        plot_paired_change(summary, results_dir)
        paths.append(results_dir / "figures" / "fair_paired_change.png")
    if (runs["target"] == "ethanol").any():
        plot_convergence(runs, "ethanol", results_dir)
        paths.append(results_dir / "figures" / "fair_ethanol_convergence.png")
    return paths


# --- short range -----------------------------------------------------------------------------------------

FAIR_SHORTRANGE_BUDGET = dict(
    n_steps=2000, seeds=(0, 1, 2), compression_step_a=0.025, temperatures_k=(1000.0, 1500.0)
)  # 1 ps per trajectory at 0.5 fs


FAIR_SHORTRANGE_PROFILES = {"malonaldehyde": "fair", "ethanol": "fair_long"}  # whose models, per molecule


def _shortrange_profile(molecule: str, profile: Optional[str]) -> str:
    """The fair profile whose models the short range of `molecule` uses: given, else FAIR_SHORTRANGE_PROFILES
    (ethanol: the 8,000-step cell, trained on the generated set at hand), else "fair"."""
    return profile or FAIR_SHORTRANGE_PROFILES.get(molecule, "fair")


def fair_shortrange_checkpoints(
    results_dir=FAIR_RESULTS_DIR, molecule: str = "malonaldehyde", seed: int = 0, profile: Optional[str] = None
) -> pd.DataFrame:
    """The best checkpoints of every fair model of `molecule` (training seed `seed`, the cell of `profile`,
    `_shortrange_profile`) as the table `shortrange.shortrange_experiment` takes. Checkpoints are not committed
    (they exist where the runs trained); a run's shipped potential stands in for its missing checkpoint
    (`runner.checkpoint_path`)."""
    profile = _shortrange_profile(molecule, profile)
    runs = fair_runs(results_dir)
    runs = runs[(runs["profile"] == profile) & (runs["dataset"] == "md17")]
    rows = []
    for model in FAIR_MODELS:
        selected = runs[(runs["target"] == molecule) & (runs["model"] == model) & (runs["seed"] == seed)]
        if selected.empty:
            raise FileNotFoundError(
                f"no finished {profile} run of {model} for {molecule} with seed {seed} in "
                f"{files.portable_path(files.results_path(results_dir, 'runs'))}: train it with `dimezbl fair "
                f"train --cells md17/{molecule}/{profile} --seeds {seed}` (make fair)"
            )
        path = runner.checkpoint_path(selected, molecule, model, seed, results_dir)
        row = selected.iloc[0]
        rows.append(
            {
                "molecule": molecule,
                "model": model,
                "seed": seed,
                "checkpoint": str(path),
                "run_dir": row["run_dir"],
                "profile": profile,
                "git_commit": row["git_commit"],
            }
        )
    return pd.DataFrame(rows)


def fair_shortrange(
    results_dir=FAIR_RESULTS_DIR,
    molecule: str = "malonaldehyde",
    seed: int = 0,
    progress: bool = True,
    profile: Optional[str] = None,
    **budget,
) -> dict:
    """Bond compression against GFN2-xTB and MD stability (Langevin and NVE at 1000 and 1500 K, several MD
    seeds) of DimeNet and each ZBL recipe (`fair_shortrange_checkpoints`), with `shortrange.shortrange_experiment`:
    tables in <results_dir>/shortrange/<molecule>/, figures in <results_dir>/figures/ (shortrange_*_<molecule>.png).
    budget overrides FAIR_SHORTRANGE_BUDGET (and takes shortrange_experiment's other keywords, e.g.
    reference=False)."""
    budget = {**FAIR_SHORTRANGE_BUDGET, **budget}
    profile = _shortrange_profile(molecule, profile)
    checkpoints = fair_shortrange_checkpoints(results_dir, molecule, seed, profile)
    return shortrange.shortrange_experiment(
        "cpu",
        [molecule],
        checkpoints=checkpoints,
        results_dir=files.results_path(results_dir),
        progress=progress,
        committees=fair_committees(results_dir, molecule, profile),
        tables_folder=f"shortrange/{molecule}",
        md_figure=f"shortrange_md_stability_{molecule}",
        **budget,
    )


def fair_shortrange_molecules(results_dir=FAIR_RESULTS_DIR) -> list:
    """The molecules with committed fair short-range tables (<results_dir>/shortrange/<molecule>/)."""
    folder = files.results_path(results_dir, "shortrange")
    return sorted(p.parent.name for p in folder.glob("*/md_stability.md")) if folder.is_dir() else []


def shortrange_markdown(results_dir=FAIR_RESULTS_DIR, molecule: Optional[str] = None) -> str:
    """The fair models' short-range tables (bond compression summary, MD stability) of `molecule` (default:
    every molecule that has them) as written by `fair_shortrange`, as Markdown; where there are none, the command
    that makes them."""
    molecules = fair_shortrange_molecules(results_dir) if molecule is None else [molecule]
    parts = []
    for name in molecules:
        folder = files.results_path(results_dir, "shortrange", name)
        for basename, title in (("compression_summary", "Bond compression"), ("md_stability", "MD stability")):
            path = folder / f"{basename}.md"
            if path.exists():
                parts.append(f"### {title}, {name} (`{files.portable_path(path)}`)\n\n{path.read_text()}")
    if not parts:
        return (
            f"No short-range results in {files.portable_path(files.results_path(results_dir, 'shortrange'))}: "
            "run `make fair-shortrange`."
        )
    return "\n".join(parts)


def shortrange_figures(results_dir=FAIR_RESULTS_DIR) -> list:
    """The fair short-range figures that exist (compression and MD stability per molecule), for notebook 06."""
    paths = []
    for molecule in fair_shortrange_molecules(results_dir):
        for name in (f"shortrange_compression_{molecule}", f"shortrange_md_stability_{molecule}"):
            path = files.results_path(results_dir, "figures", f"{name}.png")
            if path.exists():
                paths.append(path)
    return paths


def fair_committees(
    results_dir=FAIR_RESULTS_DIR, molecule: str = "malonaldehyde", profile: Optional[str] = None
) -> dict:
    """{(molecule, model): best checkpoints of every training seed of the model that has one here (the cell of
    `profile`, `_shortrange_profile`)}: the seed committee that watches each model's MD trajectories
    (`shortrange.md_trajectory`'s committee)."""
    profile = _shortrange_profile(molecule, profile)
    runs = fair_runs(results_dir)
    runs = runs[(runs["profile"] == profile) & (runs["dataset"] == "md17") & (runs["target"] == molecule)]
    committees = {}
    for model in FAIR_MODELS:
        paths = []
        for seed in sorted(runs[runs["model"] == model]["seed"]):
            try:
                paths.append(str(runner.checkpoint_path(runs, molecule, model, int(seed), results_dir)))
            except (FileNotFoundError, ValueError):
                continue  # a run committed without its checkpoint cannot be evaluated
        if len(paths) > 1:
            committees[(molecule, model)] = paths
    return committees


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="dimezbl fair", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train every fair run (resumable; finished runs are reused)")
    train.add_argument(
        "--cells",
        nargs="+",
        default=None,
        help="cells as dataset/target/profile, e.g. md17/ethanol/fair (default: all)",
    )
    train.add_argument("--seeds", nargs="+", type=int, default=None)
    train.add_argument("--device", default="auto")
    train.add_argument("--no-progress", action="store_true")
    sub.add_parser("report", help="tables and figures from the finished runs (no training)")
    short = sub.add_parser(
        "shortrange",
        help="compression curves and MD stability of the fair models of one molecule (needs their checkpoints)",
    )
    short.add_argument("--molecule", default="malonaldehyde")
    short.add_argument("--seed", type=int, default=0, help="the training seed of the models")
    short.add_argument(
        "--profile",
        choices=("fair", "fair_long"),
        default=None,
        help="whose models: the 2,000-step (fair) or 8,000-step (fair_long) cell (default: malonaldehyde fair, "
        "ethanol fair_long)",
    )
    parser.add_argument("--results-dir", default=FAIR_RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.command == "train":
        cells = FAIR_CELLS if args.cells is None else [Cell(*text.split("/")) for text in args.cells]
        train_fair(cells, args.seeds, results_dir=args.results_dir, progress=not args.no_progress, device=args.device)
    elif args.command == "shortrange":
        fair_shortrange(args.results_dir, args.molecule, args.seed, profile=args.profile)
    else:
        paths = write_fair_report(args.results_dir)
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
