"""Figures (PNG): bases (Eq. 4-6), ZBL (Eq. 8-10), learning curves, parity and compression plots."""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from dimezbl_core import (
    COULOMB_CONSTANT_EV_A,
    ZBL,
    ZBL_REACHES,
    ZBL_SCREENING_EXPONENT,
    ZBL_SCREENING_LENGTH_A,
    BesselBasisLayer,
    Envelope,
    SphericalBasisLayer,
    envelope_polynomial,
    zbl_pair_energy,
)

from .files import results_path
from .runner import MODEL_LABELS

# Figures are matplotlib.figure.Figure objects, not pyplot state: a notebook shows the returned
# figure once (with %matplotlib inline), and nothing accumulates between calls.

MODEL_COLORS = {
    "dimenet": "tab:blue",
    "dimezblnet": "tab:red",
    "dimezblnet_switched": "tab:orange",
    "dimezblnet_interpolated": "tab:green",
}
ELEMENT_Z = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}  # the elements of QM9 and MD17


def _figure(ncols: int = 1, nrows: int = 1, width: float = 5.0, height: float = 3.8, **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def save_figure(fig, name: str, results_dir=None):
    """Write <results_dir>/figures/<name>.png (150 dpi, temporary name then rename); returns fig."""
    path = results_path(results_dir, "figures", f"{name}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fig.savefig(tmp, dpi=150, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return fig


def plot_radial_basis(num_radial: int = 6, cutoff_a: float = 5.0, envelope_exponent: int = 5, results_dir=None):
    """Left: the radial basis of Eq. 4 times the envelope, as DimeNet computes it
    (BesselBasisLayer, with Eq. 4's sqrt(2/c) restored: sqrt(2/c) sin(n pi d/c)/d * u(d/c),
    in A^-3/2). Right: the envelope u(d/c) of Eq. 6 (p = envelope_exponent + 1) and u/x."""
    d = torch.linspace(0.05, cutoff_a * 1.04, 500, dtype=torch.float64)
    layer = BesselBasisLayer(num_radial, cutoff_a, envelope_exponent).double()
    with torch.no_grad():
        rbf = layer(d) * math.sqrt(2.0 / cutoff_a) / cutoff_a  # u(x)/x sin(n pi x) -> Eq. 4 * u
    p = envelope_exponent + 1
    u = envelope_polynomial(d / cutoff_a, p)
    fig, axes = _figure(2)
    for n in range(num_radial):
        axes[0, 0].plot(d, rbf[:, n], label=f"n = {n + 1}")
    axes[0, 0].set(
        xlabel="distance d (Å)",
        ylabel=r"$e_{\mathrm{RBF},n}(d)\;u(d/c)$  (Å$^{-3/2}$)",
        title=f"Radial Bessel basis (Eq. 4), c = {cutoff_a:g} Å",
    )
    axes[0, 1].plot(d, u, color="k", label=f"u(d/c), p = {p} (Eq. 6)")
    axes[0, 1].plot(
        d,
        Envelope(envelope_exponent)(d / cutoff_a).clamp(max=5.0),
        color="tab:gray",
        linestyle="--",
        label="u(d/c)/(d/c) (DimeNet's code, clipped at 5)",
    )
    axes[0, 1].set(xlabel="distance d (Å)", ylabel="envelope (dimensionless)", title="Polynomial envelope (Eq. 6)")
    for ax in axes[0]:
        ax.axvline(cutoff_a, color="k", linewidth=0.8, linestyle=":")
        ax.axhline(0.0, color="k", linewidth=0.5)
        ax.legend(fontsize=8)
    return save_figure(fig, "basis_radial_envelope", results_dir)


def plot_spherical_basis(
    num_spherical: int = 7,
    num_radial: int = 6,
    cutoff_a: float = 5.0,
    envelope_exponent: int = 5,
    radial_index: int = 0,
    results_dir=None,
):
    """Eq. 5 in its two factors, from SphericalBasisLayer. Left: the normalised radial part
    j_l(z_ln d/c) times the envelope u(d/c), for n = radial_index + 1 and every l, vs distance
    (the layer's u(x)/x times x: Eq. 5 has no 1/d; DimeNet's normaliser, c^(3/2) absorbed).
    Right: the angular part Y_l^0(alpha) vs the angle alpha (degrees)."""
    layer = SphericalBasisLayer(num_spherical, num_radial, cutoff_a, envelope_exponent).double()
    d = torch.linspace(0.05, cutoff_a, 400, dtype=torch.float64)
    alpha = torch.linspace(0.0, math.pi, 361, dtype=torch.float64)
    with torch.no_grad():
        radial = layer.radial(d)[:, :, radial_index] * (d / cutoff_a)[:, None]  # [D, L], u/x -> u
        angular = layer.angular(torch.cos(alpha))  # [A, L]
    fig, axes = _figure(2)
    for l in range(num_spherical):
        axes[0, 0].plot(d, radial[:, l], label=f"l = {l}")
        axes[0, 1].plot(torch.rad2deg(alpha), angular[:, l], label=f"l = {l}")
    axes[0, 0].set(
        xlabel=r"distance $d_{kj}$ (Å)",
        ylabel="radial factor (dimensionless)",
        title=rf"Eq. 5 radial factor $j_l(z_{{ln}} d/c)\,u(d/c)$, n = {radial_index + 1}",
    )
    axes[0, 1].set(
        xlabel="angle α (degrees)",
        ylabel=r"$Y_l^0(\alpha)$ (dimensionless)",
        title=r"Eq. 5 angular factor $Y_l^0(\alpha)$",
        xticks=range(0, 181, 30),
    )
    for ax in axes[0]:
        ax.axhline(0.0, color="k", linewidth=0.5)
        ax.legend(fontsize=8, ncols=2)
    return save_figure(fig, "basis_spherical", results_dir)


def plot_sbf_heatmap(
    l: int = 2,
    n: int = 1,
    num_spherical: int = 7,
    num_radial: int = 6,
    cutoff_a: float = 5.0,
    envelope_exponent: int = 5,
    results_dir=None,
):
    """a_SBF,ln(d, alpha) of Eq. 5 (with the envelope, DimeNet's normalisation) over distance
    and angle for one (l, n), n counted from 1, from SphericalBasisLayer.combine."""
    if not (0 <= l < num_spherical and 1 <= n <= num_radial):
        raise ValueError(f"need 0 <= l < {num_spherical} and 1 <= n <= {num_radial}, got l={l}, n={n}")
    layer = SphericalBasisLayer(num_spherical, num_radial, cutoff_a, envelope_exponent).double()
    d = torch.linspace(0.3, cutoff_a, 240, dtype=torch.float64)
    alpha = torch.linspace(0.0, math.pi, 181, dtype=torch.float64)
    with torch.no_grad():
        idx_kj = torch.arange(d.numel()).repeat_interleave(alpha.numel())  # one triplet per (d, alpha)
        sbf = layer.combine(layer.radial(d), layer.angular(torch.cos(alpha)).repeat(d.numel(), 1), idx_kj)
    values = sbf[:, l * num_radial + (n - 1)].reshape(d.numel(), alpha.numel())
    limit = float(values.abs().max())
    fig, axes = _figure(1, width=6.0, height=4.5)
    image = axes[0, 0].pcolormesh(
        torch.rad2deg(alpha), d, values, cmap="RdBu_r", vmin=-limit, vmax=limit, shading="auto"
    )
    fig.colorbar(image, ax=axes[0, 0], label=r"$a_{\mathrm{SBF},ln}$ with envelope u(x)/x (dimensionless)")
    axes[0, 0].set(
        xlabel="angle α (degrees)",
        ylabel="distance d (Å)",
        xticks=range(0, 181, 30),
        title=f"2D spherical Fourier-Bessel basis (Eq. 5), l = {l}, n = {n}",
    )
    return save_figure(fig, f"basis_sbf_heatmap_l{l}_n{n}", results_dir)


def zbl_screening_function(x) -> np.ndarray:
    """phi(x) of Eq. 9 read back from zbl_pair_energy (an H-H pair at r = x a): the figure
    shows the module's own implementation, not a second copy of the formula."""
    x = torch.as_tensor(x, dtype=torch.float64)
    a = ZBL_SCREENING_LENGTH_A / 2.0  # Z_i^0.23 + Z_j^0.23 = 2 for H-H (Eq. 10)
    r = x * a
    return (zbl_pair_energy(1, 1, r, "eV") * r / COULOMB_CONSTANT_EV_A).numpy()


def plot_zbl_screening(results_dir=None):
    """phi(x) of Eq. 9 (log scale) against the reduced distance x of Eq. 10, and the screening
    length a (Eq. 10) of the H, C, N, O, F pairs for orientation."""
    x = np.linspace(0.05, 25.0, 600)
    fig, axes = _figure(1, width=6.0)
    ax = axes[0, 0]
    ax.plot(x, zbl_screening_function(x), color="k", label="φ(x), ZBL universal (Eq. 9)")
    ax.axhline(1.0, color="tab:gray", linestyle="--", label="unscreened Coulomb, φ = 1")
    for pair, color in (("H-H", "tab:blue"), ("C-H", "tab:orange"), ("C-C", "tab:green")):
        zi, zj = (ELEMENT_Z[s] for s in pair.split("-"))
        a = ZBL_SCREENING_LENGTH_A / (zi**ZBL_SCREENING_EXPONENT + zj**ZBL_SCREENING_EXPONENT)
        bond = {"H-H": 0.74, "C-H": 1.09, "C-C": 1.54}[pair]
        ax.axvline(bond / a, color=color, linestyle=":", label=f"{pair} bond {bond} Å: x = {bond / a:.1f}")
    ax.set(
        yscale="log",
        xlabel="reduced distance x = r / a  (dimensionless, Eq. 10)",
        ylabel="screening function φ(x) (dimensionless)",
        title="ZBL screening function (Eq. 9)",
    )
    ax.legend(fontsize=8)
    return save_figure(fig, "zbl_screening_function", results_dir)


def plot_zbl_pair_energies(
    elements: Sequence[str] = ("H", "C", "N", "O", "F"), unit: str = "eV", cutoff_a: float = 5.0, results_dir=None
):
    """Pair energies of every unordered pair of `elements` (log scale) for the three reaches of
    ZBL side by side: "cutoff" (the literal term, enveloped at the model cutoff), "covalent"
    (switched off at the sum of covalent radii) and "lammps" (LAMMPS inner/outer switch)."""
    unknown = [e for e in elements if e not in ELEMENT_Z]
    if unknown:
        raise ValueError(f"elements {unknown} are not in {tuple(ELEMENT_Z)} (QM9/MD17)")
    pairs = [(a, b) for k, a in enumerate(elements) for b in elements[k:]]
    z_i = torch.tensor([ELEMENT_Z[a] for a, _ in pairs])[:, None]
    z_j = torch.tensor([ELEMENT_Z[b] for _, b in pairs])[:, None]
    r = torch.linspace(0.05, cutoff_a, 500, dtype=torch.float64)[None, :].expand(len(pairs), -1)
    fig, axes = _figure(len(ZBL_REACHES), width=4.6, height=4.4, sharey=True)
    colors = [f"C{k % 10}" for k in range(len(pairs))]
    styles = ["-", "--"]
    for ax, reach in zip(axes[0], ZBL_REACHES):
        zbl = ZBL(unit, reach, cutoff_a).double()
        with torch.no_grad():
            energy = zbl.pair_energy(z_i.expand_as(r), z_j.expand_as(r), r)  # [pairs, R]
        for k, (a, b) in enumerate(pairs):
            ax.plot(r[k], energy[k], color=colors[k], linestyle=styles[k // 10], label=f"{a}-{b}")
        title = {
            "cutoff": f"reach 'cutoff': enveloped at {cutoff_a:g} Å",
            "covalent": "reach 'covalent': off at r_cov,i + r_cov,j",
            "lammps": f"reach 'lammps': switch {zbl.inner_a:g}-{zbl.outer_a:g} Å",
        }[reach]
        ax.set(yscale="log", xlabel="distance r (Å)", title=title, ylim=(1e-4, 1e5))
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].set_ylabel(f"ZBL pair energy ({unit}, log scale)")
    axes[0, -1].legend(fontsize=7, ncols=2, title="pair", loc="upper right")
    return save_figure(fig, "zbl_pair_energies", results_dir)


def plot_learning_curves(runs: pd.DataFrame, quantity: str = "energy", results_dir=None, name=None):
    """Validation MAE (EMA weights) against the training step, one panel per target, one line per
    (model, seed), from each run's learning_curve.csv; units of the tables, log scale where the
    values span more than a decade."""
    if runs.empty:
        raise ValueError("no runs to plot: train them first (run_models)")
    column = f"valid_{quantity}_mae"
    targets = list(dict.fromkeys(runs["target"]))
    ncols = min(4, len(targets))
    nrows = math.ceil(len(targets) / ncols)
    fig, axes = _figure(ncols, nrows, width=3.6, height=2.9)
    for ax, target in zip(axes.flat, targets):
        rows = runs[runs["target"] == target]
        values = []
        for row in rows.itertuples(index=False):
            curve = pd.read_csv(results_path(results_dir, row.run_dir, "learning_curve.csv"))
            if column not in curve:
                raise ValueError(
                    f"{row.run_dir}/learning_curve.csv has no {column}: {quantity!r} is not a quantity of {row.dataset}"
                )
            ax.plot(
                curve["step"],
                curve[column],
                color=MODEL_COLORS.get(row.model),
                marker=".",
                linestyle=["-", "--", ":", "-."][row.seed % 4],
                label=f"{MODEL_LABELS.get(row.model, row.model)} seed {row.seed}",
            )
            values += curve[column].tolist()
        unit = rows[f"{quantity}_unit"].iloc[0]
        spans_a_decade = min(values) > 0 and max(values) / min(values) > 10
        ax.set(
            yscale="log" if spans_a_decade else "linear",
            xlabel="training step",
            ylabel=f"valid MAE ({unit})",
            title=str(target),
        )
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(targets) :]:
        ax.set_visible(False)
    dataset = runs["dataset"].iloc[0]
    return save_figure(fig, name or f"learning_curves_{dataset}_{quantity}", results_dir)


def plot_parity(predictions: Mapping, quantity: str = "energy", results_dir=None, name=None):
    """Predicted against reference values on the test set, one panel per target, both models
    overlaid (from `predict_runs`). Energies are shown relative to the mean reference energy of
    the set (MD17's absolute energies are ~1e5 kcal/mol); forces are all Cartesian components."""
    if quantity not in ("energy", "forces"):
        raise ValueError(f"unknown quantity {quantity!r}: use 'energy' or 'forces'")
    targets = list(dict.fromkeys(target for target, _ in predictions))
    ncols = min(4, len(targets))
    nrows = math.ceil(len(targets) / ncols)
    fig, axes = _figure(ncols, nrows, width=3.3, height=3.3)
    for ax, target in zip(axes.flat, targets):
        low, high = math.inf, -math.inf
        for (name_, model), result in predictions.items():
            if name_ != target:
                continue
            true, pred = result[f"{quantity}_true"], result[f"{quantity}_pred"]
            if true is None:
                raise ValueError(f"{target}: no {quantity} in these predictions (QM9 has no forces)")
            if quantity == "energy":
                reference = true.mean()
                true, pred = true - reference, pred - reference
            true, pred = true.ravel(), pred.ravel()
            mae = float(np.abs(pred - true).mean())
            ax.scatter(
                true,
                pred,
                s=4,
                alpha=0.5,
                color=MODEL_COLORS.get(model),
                label=f"{MODEL_LABELS.get(model, model)}: MAE {mae:.3g}",
            )
            low, high = min(low, true.min(), pred.min()), max(high, true.max(), pred.max())
            unit = result[f"{quantity}_unit"]
        ax.plot([low, high], [low, high], color="k", linewidth=0.8, label="y = x")
        what = "E − ⟨E⟩" if quantity == "energy" else "F component"
        ax.set(xlabel=f"reference {what} ({unit})", ylabel=f"predicted {what} ({unit})", title=str(target))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(targets) :]:
        ax.set_visible(False)
    dataset = next(iter(predictions.values()))["dataset"]
    return save_figure(fig, name or f"parity_{dataset}_{quantity}", results_dir)


def plot_compression_curves(curves: Sequence[pd.DataFrame], results_dir=None, name=None):
    """E(r) - E(r0) of `compression_curve` results side by side (symmetric log scale):
    DimezblNet, its learned part, ZBL alone and DimeNet, the bond length r0 as built marked."""
    curves = [curves] if isinstance(curves, pd.DataFrame) else list(curves)
    if not curves:
        raise ValueError("no compression curves to plot")
    styles = {
        "DimezblNet": ("tab:red", "-", "DimezblNet"),
        "learned part": ("tab:purple", "--", "learned part (DimezblNet without ZBL)"),
        "ZBL": ("k", ":", "ZBL alone (Eq. 8-10)"),
        "DimeNet": ("tab:blue", "-.", "DimeNet"),
        **{
            MODEL_LABELS[m]: (MODEL_COLORS[m], "-", MODEL_LABELS[m])
            for m in ("dimezblnet_switched", "dimezblnet_interpolated")
        },
        "GFN2-xTB": ("k", "-", "GFN2-xTB (reference)"),
    }
    fig, axes = _figure(len(curves), width=5.2, height=4.3)
    for ax, curve in zip(axes[0], curves):
        for column, (color, linestyle, label) in styles.items():
            if column in curve:
                reference = column == "GFN2-xTB"  # drawn thick and underneath the models
                ax.plot(curve["distance_a"], curve[column], color=color, linestyle=linestyle, label=label,
                        linewidth=3.0 if reference else 1.5, alpha=0.45 if reference else 1.0,
                        zorder=1 if reference else 2)  # fmt: skip
        ax.axvline(
            curve.attrs["r0_a"], color="tab:gray", linewidth=0.8, label=f"r0 = {curve.attrs['r0_a']:.3f} Å (as built)"
        )
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set(
            xlabel="bond length r (Å)",
            ylabel=f"E(r) − E(r0) ({curve.attrs['unit']}, symlog)",
            title=f"{curve.attrs['molecule']}: {curve.attrs['bond']}",
        )
        ax.legend(fontsize=7)
    fig.suptitle(f"Bond compression, models trained on {curves[0].attrs['target']}")
    target = curves[0].attrs["target"].replace("/", "_")
    return save_figure(fig, name or f"compression_curves_{target}", results_dir)
