"""DimezblNet: DimeNet with an explicit ZBL screened nuclear repulsion (one importable module).

Companion of "Prediction of Interatomic Potentials Combining Empirical Potential and Graph
Neural Networks" (Tao & Wan). The file reads top to bottom in the order data flows:

=====================================  ===================================================
section                                paper
=====================================  ===================================================
Units and physical constants           units of Tables 1 and 2; Eq. 8 (e^2 / 4 pi eps0)
Graph (radius graph, triplets)         neighbourhoods N_i and N_j \\ {i} of Eq. 1-3
Basis functions                        Eq. 4 (radial Bessel), Eq. 5 (spherical), Eq. 6
                                       (polynomial envelope)
ZBL screened nuclear repulsion         Eq. 8-10
DimeNet blocks                         Eq. 7 (embedding), Eq. 3 (interaction, bilinear
                                       layer of Sec. 3.2), output blocks of Sec. 3.4
DimezblNet                             Sec. 3.4: V = sum_i (sum_l v_i^(l) + v_zbl,i);
                                       forces F_i = -dV/dR_i (Eq. 11)
Data                                   Sec. 4.2 (QM9, qm9pack) and 4.3 (MD17: readers and an
                                       offline GFN2-xTB generator), DimeNet's splits
Training and evaluation                MAE metrics of Sec. 4.1 under DimeNet's protocol
Reporting                              Tables 1 and 2 (the paper's values quoted, ours beside
                                       them), figures of Eq. 4-10, notebooks via papermill
ASE calculator                         Eq. 11 forces for molecular dynamics
Using the potential                    TorchScript export; Sec. 3.3's short-range motivation:
                                       bond compression vs GFN2-xTB, MD stability (make shortrange)
Command-line entry                     train, evaluate, export, shortrange, generate-md17,
                                       reproduce
=====================================  ===================================================

Units: positions in Angstrom everywhere. Energies are in the unit of the target the model is
trained on (eV for QM9 energies, kcal/mol for MD17); the ZBL term is evaluated in that unit
(`zbl_unit`). Forces are in energy unit per Angstrom.

The DimeNet part follows the original implementation (klicperajo/dimenet) and PyTorch
Geometric's `torch_geometric.nn.models.DimeNet` exactly, including its quirks (see
`DimezblNet`), so that PyG state dicts load with `load_pyg_dimenet_state_dict`.
"""
from __future__ import annotations

import argparse
import copy
import csv
import ctypes
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch_geometric.data import Data

# =============================================================================================
# --- Units and physical constants ---
# =============================================================================================

HARTREE_TO_EV = 27.211386245988  # CODATA 2018
BOHR_TO_ANGSTROM = 0.529177210903  # CODATA 2018

# e^2 / (4 pi eps0) of Eq. 8, as LAMMPS defines it (force->qqr2e of the unit system):
COULOMB_CONSTANT_EV_A = 14.399645  # eV * Angstrom (LAMMPS `units metal`)
COULOMB_CONSTANT_KCAL_MOL_A = 332.06371  # kcal/mol * Angstrom (LAMMPS `units real`)
COULOMB_CONSTANTS = {"eV": COULOMB_CONSTANT_EV_A, "kcal/mol": COULOMB_CONSTANT_KCAL_MOL_A}

# ZBL universal screening (Eq. 9-10), constants of LAMMPS src/pair_zbl_const.h (also nequip):
ZBL_SCREENING_LENGTH_A = 0.46850  # a0 of Eq. 10, Angstrom (pzbl = 0.23 is the exponent)
ZBL_SCREENING_EXPONENT = 0.23
ZBL_PHI_COEFFICIENTS = (0.18175, 0.50986, 0.28022, 0.02817)  # c_1..c_4 of Eq. 9
ZBL_PHI_EXPONENTS = (3.19980, 0.94229, 0.40290, 0.20162)  # -d_1..-d_4 of Eq. 9

MAX_ATOMIC_NUMBER = 94  # the embedding table has 95 rows (index 0 unused), as in DimeNet
MIN_PAIR_DISTANCE_A = 0.01  # closer atoms are treated as coincident (bad input)


def coulomb_constant(unit: str) -> float:
    """e^2/(4 pi eps0) in `unit` * Angstrom, for unit "eV" or "kcal/mol"."""
    if unit not in COULOMB_CONSTANTS:
        raise ValueError(f"unknown energy unit {unit!r}: use one of {sorted(COULOMB_CONSTANTS)}")
    return COULOMB_CONSTANTS[unit]


def covalent_radii_a() -> np.ndarray:
    """Covalent radii in Angstrom indexed by atomic number (Cordero 2008, via ase.data; MACE uses
    the same table): H 0.31, C 0.76, N 0.71, O 0.66, F 0.57."""
    from ase.data import covalent_radii

    return np.asarray(covalent_radii[: MAX_ATOMIC_NUMBER + 1], dtype=np.float64)


class ConstantTable:
    """Float64 constants handed out as tensors of the caller's dtype and device (cached), so a
    module gives exact float64 results after `.double()` and float32 ones otherwise."""

    def __init__(self, **arrays):
        self.arrays = {name: np.asarray(value, dtype=np.float64) for name, value in arrays.items()}
        self._cache = {}

    def get(self, name: str, like: Tensor) -> Tensor:
        key = (name, like.dtype, like.device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.arrays[name], dtype=like.dtype, device=like.device)
        return self._cache[key]


def check_pair_distances(r: Tensor):
    """Coincident atoms (and NaN distances) are bad input: an error, never a silent inf/NaN."""
    if not torch.isfinite(r).all():
        raise ValueError("an interatomic distance is NaN or inf: check the positions")
    if (r < MIN_PAIR_DISTANCE_A).any():
        raise ValueError(
            f"coincident atoms: a distance of {float(r.min()):.3g} A is below "
            f"{MIN_PAIR_DISTANCE_A} A (the nuclear repulsion diverges as 1/r); check the positions"
        )


# =============================================================================================
# --- Graph: radius graph and triplets (neighbourhoods of Eq. 1-3) ---
# =============================================================================================


def scatter_sum(src: Tensor, index: Tensor, dim_size: int) -> Tensor:
    """Sum rows of `src` into `dim_size` buckets given by `index` (dim 0)."""
    out = src.new_zeros((dim_size,) + src.shape[1:])
    return out.index_add_(0, index, src)


def first_order(fn, x: Tensor) -> Tensor:
    """fn(x) for an elementwise map fn (output [*x.shape, ...]), with its first derivative in x
    exact and its higher derivatives in x dropped: fn(x0) + fn'(x0) (x - x0), x0 = x.detach(),
    value and derivative taken in one forward-mode pass. Derivatives in fn's parameters (e.g.
    the RBF's trainable frequencies) stay exact to every order, fn'(x0) included.

    For force training: when the positions are a leaf whose .grad nobody reads, the loss's
    backward through the forces would otherwise also differentiate the bases a second time in
    the positions (the basis functions' own graphs, 3-5% of a force training step on the CPU),
    work whose result is thrown away. See `DimezblNet.energy_and_forces`.
    """
    x0 = x.detach()
    with forward_ad.dual_level():
        value, derivative = forward_ad.unpack_dual(fn(forward_ad.make_dual(x0, torch.ones_like(x0))))
    if derivative is None:  # fn does not depend on x
        return value
    return value + derivative * (x - x0).reshape(x.shape + (1,) * (value.dim() - x.dim()))


def radius_graph(pos: Tensor, batch: Tensor, cutoff: float) -> Tensor:
    """All ordered pairs of atoms of the same molecule closer than `cutoff` (Angstrom).

    Returns edge_index [2, E] int64 with row = source j and col = target i (PyG's j->i flow),
    sorted by target, then source. No self loops, no neighbour cap. `batch` must be sorted.
    Vectorised over all pairs of each molecule (sum of n_b^2 pairs; molecules are small).
    """
    num_atoms = pos.size(0)
    device = pos.device
    counts = torch.bincount(batch)  # atoms per molecule
    first_atom = torch.cumsum(counts, 0) - counts  # index of each molecule's first atom
    pairs_per_atom = counts[batch]  # each atom pairs with every atom of its molecule
    target = torch.repeat_interleave(torch.arange(num_atoms, device=device), pairs_per_atom)
    pair_start = torch.cumsum(pairs_per_atom, 0) - pairs_per_atom
    local = torch.arange(target.numel(), device=device) - torch.repeat_interleave(
        pair_start, pairs_per_atom
    )
    source = first_atom[batch[target]] + local
    with torch.no_grad():
        dist = torch.linalg.vector_norm(pos[target] - pos[source], dim=-1)
    keep = (target != source) & (dist <= cutoff)
    return torch.stack([source[keep], target[keep]])


def triplets(
    edge_index: Tensor, num_nodes: int
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Triplets k->j->i (k != i) of a radius graph sorted by target, as PyG's `triplets`.

    Returns (i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji): the edges' target i and source j, the
    atoms of each triplet and the two edges of each triplet (kj = k->j, ji = j->i).
    """
    source, target = edge_index[0], edge_index[1]
    device = source.device
    in_degree = torch.bincount(target, minlength=num_nodes)
    first_in_edge = torch.cumsum(in_degree, 0) - in_degree  # edges are sorted by target
    # every edge j->i meets every edge k->j that ends in its source j
    num_triplets = in_degree[source]
    idx_ji = torch.repeat_interleave(torch.arange(source.numel(), device=device), num_triplets)
    triplet_start = torch.cumsum(num_triplets, 0) - num_triplets
    local = torch.arange(idx_ji.numel(), device=device) - torch.repeat_interleave(
        triplet_start, num_triplets
    )
    # index_select, not advanced indexing: several times faster for these 1-D gathers on the CPU
    idx_j = source.index_select(0, idx_ji)
    idx_kj = first_in_edge.index_select(0, idx_j) + local
    idx_i, idx_k = target.index_select(0, idx_ji), source.index_select(0, idx_kj)
    keep = (idx_i != idx_k).nonzero().squeeze(1)
    return (target, source, idx_i.index_select(0, keep), idx_j.index_select(0, keep), idx_k.index_select(0, keep),
            idx_kj.index_select(0, keep), idx_ji.index_select(0, keep))


class TripletPlan:
    """Sparse structure of the triplet aggregation of a batch, built once and used by every block.

    The interaction blocks need, for triplet weights s [T, B] and edge features x [E_in, H],

        A[e, b, :] = sum_{t : ji(t) = e} s[t, b] x[kj(t), :]        ([E_out, B, H]),

    i.e. A = M(s) @ x with M(s) the sparse [E_out * B, E_in] matrix holding s[t, b] at
    (ji(t) * B + b, kj(t)). Evaluated as one CSR matrix product, no [T, B, H] tensor is ever
    formed, in the forward or in any backward pass (see `triplet_aggregate`). The plan holds the
    index work: the CSR layout of M and of its transpose and the permutations that put s into
    them. B (the number of weights per triplet) is fixed per plan.
    """

    def __init__(self, idx_kj: Tensor, idx_ji: Tensor, num_edges: int, num_weights: int):
        device = idx_kj.device
        num_triplets, b = idx_kj.numel(), num_weights
        self.num_edges, self.num_weights, self.num_triplets = num_edges, num_weights, num_triplets
        weight = torch.arange(b, device=device)

        def layout(rows: Tensor, cols: Tensor, row_blocks: bool):
            """Positions in CSR order of the T*B values s.reshape(-1) for rows (x B if row_blocks),
            None where they are in CSR order already (the triplets sorted by (row, column) and
            one weight per row block, or no row blocks)."""
            key = rows * num_edges + cols
            in_order = bool((key[1:] >= key[:-1]).all())  # e.g. rows ji of `triplets`' output
            counts = torch.bincount(rows, minlength=num_edges)
            crow_counts = counts.repeat_interleave(b) if row_blocks else counts * b
            crow = torch.zeros(crow_counts.numel() + 1, dtype=torch.long, device=device)
            crow[1:] = torch.cumsum(crow_counts, 0)
            if in_order and not (row_blocks and b > 1):
                return None, crow
            if in_order:
                rank = torch.arange(num_triplets, device=device)
            else:
                order = torch.argsort(key, stable=True)  # rows, then columns ascending
                rank = torch.empty_like(order)
                rank[order] = torch.arange(num_triplets, device=device)
            if row_blocks:  # row (r, b) holds the row r's triplets in order: start*B + b*count + local
                start = torch.cumsum(counts, 0) - counts  # first rank of each row
                local = rank - start[rows]
                position = (start[rows] * b + local)[:, None] + weight[None, :] * counts[rows][:, None]
            else:  # row r holds its triplets in order, each with its B columns (c*B + b) ascending
                position = rank[:, None] * b + weight[None, :]
            return position.reshape(-1), crow

        def place(flat_position: Optional[Tensor], values: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
            """(values in CSR order, the permutation: CSR value k is s.reshape(-1)[order[k]], None
            for the identity, where the values of the matrix are s itself, no copy)."""
            if flat_position is None:
                return values, None
            # scatter_, not an index_put (placed[flat_position] = values): ~30% faster here
            placed = torch.empty_like(values).scatter_(0, flat_position, values)
            order = torch.empty_like(flat_position).scatter_(
                0, flat_position, torch.arange(flat_position.numel(), device=device))
            return placed, order

        flat_position, crow = layout(idx_ji, idx_kj, row_blocks=True)
        col, self.order = place(flat_position, idx_kj.repeat_interleave(b))
        flat_position_t, crow_t = layout(idx_kj, idx_ji, row_blocks=False)
        col_t, self.order_t = place(flat_position_t, (idx_ji[:, None] * b + weight[None, :]).reshape(-1))
        # 32-bit CSR indices where they fit: MKL (LP64) takes them as they are, 64-bit ones it
        # would get converted in every product (~10% of a product's time here)
        small = max(num_triplets * b, num_edges * b) < 2**31 - 1
        index_dtype = torch.int32 if small else torch.long
        self.crow, self.col, self.crow_t, self.col_t = (t.to(index_dtype) for t in (crow, col, crow_t, col_t))
        self._shared_values: Optional[Tensor] = None  # see `share_values`
        self._permuted_values: dict = {}  # transpose -> (its version, permuted shared values)

    @classmethod
    def transposed(cls, idx_kj: Tensor, idx_ji: Tensor, num_edges: int, num_weights: int) -> "TripletPlan":
        """The plan of `triplet_contract`: the roles of kj and ji swapped."""
        return cls(idx_ji, idx_kj, num_edges, num_weights)

    def matrix(self, values: Tensor, transpose: bool = False) -> Tensor:
        """M(values) [E*B, E] in CSR, or its transpose [E, E*B]; values [T, B]."""
        n, nb = self.num_edges, self.num_edges * self.num_weights
        if transpose:
            return torch.sparse_csr_tensor(self.crow_t, self.col_t, self._csr_values(values, True),
                                           (n, nb), check_invariants=False)
        return torch.sparse_csr_tensor(self.crow, self.col, self._csr_values(values, False), (nb, n),
                                       check_invariants=False)

    def share_values(self, values: Tensor) -> "TripletPlan":
        """Declare `values` [T, B] the triplet weights of every product of this plan's owner (the
        angular part in DimeNet++, the same in all blocks), not to be modified while the plan is
        in use: their permuted copy is then made once and kept where it carries no graph (an
        energy step's backward permutes them once, not once per block). Returns the plan."""
        self._shared_values, self._permuted_values = values, {}
        return self

    def _csr_values(self, values: Tensor, transpose: bool) -> Tensor:
        """values in the CSR order of M (or M^T); for the shared values (`share_values`) a
        copy kept from an earlier call where the result carries no graph."""
        flat = values.reshape(-1)
        order = self.order_t if transpose else self.order
        if order is None:
            return flat
        if values is not self._shared_values or (flat.requires_grad and torch.is_grad_enabled()):
            return flat[order]
        kept = self._permuted_values.get(transpose)
        if kept is not None and kept[0] == values._version:
            return kept[1]
        permuted = flat[order]
        self._permuted_values[transpose] = (values._version, permuted)
        return permuted

    def sampled(self, y: Tensor, x: Tensor) -> Tensor:
        """out[t, b] = <y[ji(t) * B + b, :], x[kj(t), :]> for y [E*B, H], x [E, H]: [T, B].

        Evaluated on the pattern of M^T where its values are in triplet order (no permutation
        of the result), else on the pattern of M."""
        def on_pattern(crow: Tensor, col: Tensor, rows: Tensor, columns: Tensor) -> Tensor:
            """<rows[r], columns[c]> at the nonzeros (r, c) of the CSR pattern, in CSR order."""
            pattern = torch.sparse_csr_tensor(crow, col, rows.new_zeros(col.numel()),
                                              (rows.size(0), columns.size(0)), check_invariants=False)
            return torch.sparse.sampled_addmm(pattern, rows.contiguous(), columns.t(), beta=0.0).values()

        if self.order_t is None and self.order is not None:
            return on_pattern(self.crow_t, self.col_t, x, y).view(self.num_triplets, self.num_weights)
        values = on_pattern(self.crow, self.col, y, x)
        if self.order is not None:
            out = torch.empty_like(values)
            out[self.order] = values
            values = out
        return values.view(self.num_triplets, self.num_weights)


def _sparse_mm(plan: TripletPlan, values: Tensor, dense: Tensor, transpose: bool) -> Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": we test what we use
        warnings.simplefilter("ignore", UserWarning)
        matrix = plan.matrix(values, transpose)
        # into an uninitialised output (beta=0 ignores it): half the time of `matrix @ dense`,
        # which zero-fills and copies a result as large as the product itself
        out = dense.new_empty((matrix.size(0), dense.size(1)))
        return torch.addmm(out, matrix, dense.contiguous(), beta=0.0, out=out)


class _SparseProduct(torch.autograd.Function):
    """The three sparse products of a `TripletPlan`, each the others' gradient:

        "aggregate"  (s, x) -> M(s) @ x                 [E*B, H]
        "transpose"  (s, y) -> M(s)^T @ y               [E, H]
        "sampled"    (y, x) -> <y[ji B + b], x[kj]>     [T, B]

    Every backward is again one of them (the table in `backward`), applied through this
    Function, so the products are differentiable to any order (force training differentiates
    twice). Under CUDA autocast they run in float32 (cuSPARSE's reduced-precision support
    varies); on the CPU the autocast decorators do nothing.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, first: Tensor, second: Tensor, plan: TripletPlan, kind: str) -> Tensor:
        ctx.plan, ctx.kind = plan, kind
        ctx.save_for_backward(first, second)
        if kind == "sampled":
            return plan.sampled(first, second)
        return _sparse_mm(plan, first, second, transpose=kind == "transpose")

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: Tensor):
        a, b = ctx.saved_tensors
        plan, apply = ctx.plan, _SparseProduct.apply
        gradients = {  # d/d(first), d/d(second) of each kind, as products of the same plan
            "aggregate": (lambda: apply(grad, b, plan, "sampled"),      # s: <g[ji B + b], x[kj]>
                          lambda: apply(a, grad, plan, "transpose")),   # x: M(s)^T g
            "transpose": (lambda: apply(b, grad, plan, "sampled"),      # s: <y[ji B + b], g[kj]>
                          lambda: apply(a, grad, plan, "aggregate")),   # y: M(s) g
            "sampled": (lambda: apply(grad, b, plan, "aggregate"),      # y: M(g) x
                        lambda: apply(grad, a, plan, "transpose")),     # x: M(g)^T y
        }[ctx.kind]
        return tuple(f() if needed else None
                     for f, needed in zip(gradients, ctx.needs_input_grad[:2])) + (None, None)


def triplet_contract(plan: TripletPlan, y: Tensor, g: Tensor) -> Tensor:
    """out[e, :] = sum_{t : ji(t) = e} sum_l y[t, l] g[kj(t), l, :]: [E, H] for y [T, L],
    g [E, L, H], with `plan` = TripletPlan.transposed(idx_kj, idx_ji, E, L).

    That is M'(y)^T @ g.reshape(E * L, H), the "transpose" product of a plan whose roles of kj
    and ji are swapped (its M'^T has rows ji and columns kj * L + l). For triplets sorted by
    (ji, kj), as `triplets` gives them, the values of M'^T are y itself (no permutation), and
    so is the result of the sampled product of its backward. Differentiable to any order, as
    `triplet_aggregate`. Cost: T x L x H multiply-adds, no [T, H] tensor.
    """
    dtype = torch.promote_types(y.dtype, g.dtype)
    flat = g.to(dtype).reshape(plan.num_edges * plan.num_weights, g.size(-1))
    return _SparseProduct.apply(y.to(dtype), flat, plan, "transpose")


def triplet_aggregate(plan: TripletPlan, s: Tensor, x: Tensor) -> Tensor:
    """A[e, b, :] = sum_{t : ji(t) = e} s[t, b] x[kj(t), :]: [E, B, H] for s [T, B], x [E, H].

    Differentiable to any order (every backward is again one of the three sparse products:
    M(s) x, M(s)^T y and the sampled dot products <y[ji B + b], x[kj]>), so it serves force
    training (create_graph) as well. Cost per call: T x B x H multiply-adds, memory O(E B H).
    """
    dtype = torch.promote_types(s.dtype, x.dtype)
    out = _SparseProduct.apply(s.to(dtype), x.to(dtype).contiguous(), plan, "aggregate")
    return out.view(plan.num_edges, plan.num_weights, x.size(-1))


# =============================================================================================
# --- Basis functions (Eq. 4-6) ---
# =============================================================================================


def envelope_polynomial(x: Tensor, exponent_p: int = 6) -> Tensor:
    """u(x) of Eq. 6: 1 - (p+1)(p+2)/2 x^p + p(p+2) x^(p+1) - p(p+1)/2 x^(p+2) for x < 1, else 0.

    u(0) = 1 and u, u', u'' vanish at x = 1 (DimeNet uses p = envelope_exponent + 1 = 6).
    """
    p = exponent_p
    xp = x.pow(p)
    u = 1.0 - (p + 1) * (p + 2) / 2 * xp + p * (p + 2) * xp * x - p * (p + 1) / 2 * xp * x * x
    return torch.where(x < 1.0, u, torch.zeros_like(u))


class Envelope(nn.Module):
    """DimeNet's envelope as its code applies it: u(x) / x with p = exponent + 1, 0 for x >= 1."""

    def __init__(self, exponent: int = 5):
        super().__init__()
        self.p = exponent + 1

    def forward(self, x: Tensor) -> Tensor:
        return envelope_polynomial(x, self.p) / x


def spherical_bessel_jn(x: Tensor, num_spherical: int) -> Tensor:
    """Spherical Bessel functions j_l(x), l = 0..num_spherical-1, as a tensor [..., num_spherical].

    Upward recurrence j_{l+1} = (2l+1)/x j_l - j_{l-1} where it is stable (x >= max(l, 1)), the
    power series j_l(x) = x^l/(2l+1)!! sum_k (-x^2/2)^k / (k! prod_{m=1..k}(2l+2m+1)) below,
    so that short distances (the ZBL regime) keep full precision. Both branches are evaluated on
    clamped inputs so neither produces inf or NaN gradients.
    """
    orders = torch.arange(num_spherical, device=x.device, dtype=x.dtype)
    series_limit = float(max(num_spherical - 1, 1))
    use_series = x.unsqueeze(-1) < orders.clamp(min=1.0)

    # Upward recurrence on x >= 1 (the series covers everything below).
    xr = x.clamp(min=1.0)
    sin, cos = torch.sin(xr), torch.cos(xr)
    recurrence = [sin / xr]
    if num_spherical > 1:
        recurrence.append(sin / xr**2 - cos / xr)
    for order in range(1, num_spherical - 1):
        recurrence.append((2 * order + 1) / xr * recurrence[order] - recurrence[order - 1])
    recurrence = torch.stack(recurrence, dim=-1)

    # Power series on x <= series_limit (used only where x < max(l, 1)).
    xs = x.clamp(max=series_limit).unsqueeze(-1)
    series = _spherical_bessel_series(xs, orders, _series_coefficients(num_spherical, x))
    return torch.where(use_series, series, recurrence)


SERIES_TERMS = 16  # j_l to ~5e-15 relative wherever the series is used (x < max(l, 1), l <= 6)


def _series_coefficients(num_spherical: int, like: Tensor) -> Tensor:
    """c[k, l] with j_l(x) = x^l sum_k c[k, l] x^(2k): c = (-1/2)^k / (k! prod_{m<=k}(2l+2m+1))
    / (2l+1)!!, [SERIES_TERMS + 1, num_spherical] (float64 arithmetic, cast to `like`)."""
    table = np.zeros((SERIES_TERMS + 1, num_spherical))
    for l in range(num_spherical):
        value = 1.0 / float(np.prod(np.arange(2 * l + 1, 0, -2)))
        for k in range(SERIES_TERMS + 1):
            if k:
                value *= -0.5 / (k * (2 * l + 2 * k + 1))
            table[k, l] = value
    return torch.as_tensor(table, dtype=like.dtype, device=like.device)


def _spherical_bessel_series(xs: Tensor, orders: Tensor, coefficients: Tensor) -> Tensor:
    """x^l sum_k c[k, l] (x^2)^k by Horner's rule (one fused multiply-add per term); `orders`
    and each coefficients[k] broadcast against xs."""
    squared = xs * xs
    last = coefficients.size(0) - 1
    series = coefficients[last].expand_as(squared * coefficients[0])
    for k in range(last - 1, -1, -1):
        series = torch.addcmul(coefficients[k], series, squared)
    return xs.pow(orders) * series


def spherical_bessel_own_order(x: Tensor) -> Tensor:
    """j_l(x[..., l, n]) for x [..., L, R]: each slice l at its own order only.

    The same two branches as `spherical_bessel_jn` (upward recurrence where x >= max(l, 1), power
    series below), but without evaluating every order at every argument: the SBF needs
    j_l(z_ln d/c) only, which this computes in 1/L of the work and memory (L = 7: 7x less).
    """
    coefficients = _series_coefficients(x.size(-2), x).unsqueeze(-1)  # [K + 1, L, 1]
    return _spherical_bessel_own_order(x, coefficients)


def _spherical_bessel_own_order(x: Tensor, coefficients: Tensor) -> Tensor:
    """`spherical_bessel_own_order` with the series coefficients given (TorchScript-compatible:
    the exported model holds them as a buffer)."""
    num_spherical = x.size(-2)
    orders = torch.arange(num_spherical, device=x.device, dtype=x.dtype)[:, None]  # [L, 1]
    use_series = x < orders.clamp(min=1.0)
    xr = x.clamp(min=1.0)
    sin, cos = torch.sin(xr), torch.cos(xr)
    j_prev, j_cur = sin / xr, sin / xr**2 - cos / xr  # j_0, j_1 on the slices l >= 0
    recurrence = [j_prev[..., :1, :]]
    if num_spherical > 1:
        recurrence.append(j_cur[..., 1:2, :])
    for order in range(1, num_spherical - 1):  # j_{order+1}, needed on slices l >= order + 1
        start = order + 1 - (num_spherical - j_cur.size(-2))  # slice index within the kept tail
        j_prev, j_cur = j_cur[..., start:, :], (
            (2 * order + 1) / xr[..., order + 1 :, :] * j_cur[..., start:, :] - j_prev[..., start:, :]
        )
        recurrence.append(j_cur[..., :1, :])
    recurrence = torch.cat(recurrence, dim=-2)

    # The power series only where it is used (x < max(l, 1): 7% of the SBF's arguments on QM9),
    # each argument with its own order's coefficients, placed over the recurrence's (clamped,
    # unused) values there; index_put passes gradients of any order to both sides.
    where = use_series.reshape(-1).nonzero().squeeze(1)
    if where.numel() == 0:
        return recurrence
    xs = x.reshape(-1)[where]  # all below max(l, 1) <= L - 1: no clamp needed
    order_of = torch.div(where, x.size(-1), rounding_mode="floor") % num_spherical
    per_element = coefficients[:, :, 0].t()[order_of]  # [n, K + 1]
    series = _spherical_bessel_series(xs, orders[order_of, 0], per_element.t().contiguous())
    return recurrence.reshape(-1).index_put([where], series).view_as(recurrence)


def bessel_zeros(num_spherical: int, num_radial: int) -> np.ndarray:
    """z_ln [num_spherical, num_radial]: the n-th positive zero of j_l (float64).

    The zeros of j_l and j_{l+1} interlace, so each zero of j_{l+1} is bracketed by consecutive
    zeros of j_l (the scheme of DimeNet's `Jn_zeros`, in float64).
    """
    from scipy.optimize import brentq
    from scipy.special import spherical_jn

    zeros = np.zeros((num_spherical, num_radial))
    points = np.arange(1, num_radial + num_spherical) * np.pi  # zeros of j_0
    zeros[0] = points[:num_radial]
    for order in range(1, num_spherical):
        roots = np.array(
            [
                brentq(lambda r: spherical_jn(order, r), points[m], points[m + 1], xtol=1e-15)
                for m in range(len(points) - 1)
            ]
        )
        zeros[order] = roots[:num_radial]
        points = roots
    return zeros


class BesselBasisLayer(nn.Module):
    """Radial basis of Eq. 4 as DimeNet computes it: u(d/c)/(d/c) * sin(f_n d/c), f_n = n pi.

    The constant sqrt(2/c) of Eq. 4 is absorbed in the following dense layers (as in DimeNet);
    the frequencies f_n are trainable and start at n pi. Input: distances [E] in Angstrom.
    """

    def __init__(self, num_radial: int, cutoff: float = 5.0, envelope_exponent: int = 5):
        super().__init__()
        self.cutoff = cutoff
        self.envelope = Envelope(envelope_exponent)
        self.freq = nn.Parameter(torch.empty(num_radial))
        self.reset_parameters()

    def reset_parameters(self):
        with torch.no_grad():
            self.freq.copy_(torch.arange(1, self.freq.numel() + 1) * math.pi)

    def forward(self, dist: Tensor) -> Tensor:
        x = dist.unsqueeze(-1) / self.cutoff
        return self.envelope(x) * torch.sin(self.freq * x)  # [E, num_radial]


def _sbf_radial(x: Tensor, zeros: Tensor, normalizer: Tensor, coefficients: Tensor, envelope_p: int) -> Tensor:
    """u(x)/x j_l(z_ln x) / sqrt(0.5 j_{l+1}(z_ln)^2) for x = d/c [E]: [E, L, R] (the constants
    given, so that the exported model evaluates the same function with its buffers)."""
    jl = _spherical_bessel_own_order(x[:, None, None] * zeros, coefficients)  # j_l(z_ln d/c)
    return (envelope_polynomial(x, envelope_p) / x)[:, None, None] * jl * normalizer


def _sbf_angular(cos_angle: Tensor, sph_prefactor: Tensor) -> Tensor:
    """sqrt((2l+1)/(4 pi)) P_l(cos alpha) for l < len(sph_prefactor): [T, L] (Legendre recurrence)."""
    num_spherical = sph_prefactor.numel()
    legendre = [torch.ones_like(cos_angle), cos_angle]
    for l in range(1, num_spherical - 1):
        legendre.append(((2 * l + 1) * cos_angle * legendre[l] - l * legendre[l - 1]) / (l + 1))
    return torch.stack(legendre[:num_spherical], dim=-1) * sph_prefactor


def _sbf_combine(radial: Tensor, angular: Tensor, idx_kj: Tensor) -> Tensor:
    """radial[kj] (.) angular [T, L * R] from radial [E, L, R] and angular [T, L]."""
    per_triplet = radial.index_select(0, idx_kj) * angular.unsqueeze(-1)  # [T, L, R]
    return per_triplet.reshape(idx_kj.numel(), radial.size(1) * radial.size(2))


class SphericalBasisLayer(nn.Module):
    """2D spherical Fourier-Bessel basis of Eq. 5, feature index l * num_radial + n.

    a[t, (l, n)] = u(d/c)/(d/c) * j_l(z_ln d/c) / sqrt(0.5 j_{l+1}(z_ln)^2) * Y_l^0(alpha),
    Y_l^0 = sqrt((2l+1)/(4 pi)) P_l(cos alpha). As in DimeNet, d is the distance of the edge kj
    and the envelope multiplies the basis. Vectorised over all (l, n) at once: the radial part
    is computed per edge and gathered to triplets.
    """

    def __init__(
        self, num_spherical: int, num_radial: int, cutoff: float = 5.0, envelope_exponent: int = 5
    ):
        super().__init__()
        from scipy.special import jv

        self.num_spherical, self.num_radial, self.cutoff = num_spherical, num_radial, cutoff
        self.envelope = Envelope(envelope_exponent)
        # The original's Jn_zeros (kept by PyG) stores the zeros, and so the normaliser, in
        # float32; we keep that rounding (relative 1e-7) so that PyG/DimeNet weights give the
        # same energies to ~1e-12 instead of ~1e-6. `bessel_zeros` itself is float64.
        zeros = bessel_zeros(num_spherical, num_radial).astype(np.float32)
        orders = np.arange(num_spherical, dtype=np.float32)[:, None]
        j_next = np.sqrt(np.float32(np.pi) / (2 * zeros)) * jv(orders + np.float32(1.5), zeros)
        normalizer = 1 / (np.float32(0.5) * j_next**2) ** np.float32(0.5)  # float32 as DimeNet
        sph_prefactor = np.sqrt((2 * np.arange(num_spherical) + 1) / (4 * np.pi))
        # Derived from the hyperparameters, so not in the state dict (as in PyG).
        self.constants = ConstantTable(
            zeros=zeros, normalizer=normalizer, sph_prefactor=sph_prefactor
        )

    def radial(self, dist: Tensor) -> Tensor:
        """Enveloped, normalised j_l(z_ln d/c) per edge: [E, num_spherical, num_radial]."""
        x = dist / self.cutoff
        coefficients = _series_coefficients(self.num_spherical, x).unsqueeze(-1)  # [K + 1, L, 1]
        return _sbf_radial(x, self.constants.get("zeros", x), self.constants.get("normalizer", x),
                           coefficients, self.envelope.p)

    def angular(self, cos_angle: Tensor) -> Tensor:
        """Y_l^0 as a function of cos(alpha): [T, num_spherical] (Legendre recurrence)."""
        return _sbf_angular(cos_angle, self.constants.get("sph_prefactor", cos_angle))

    def combine(self, radial: Tensor, angular: Tensor, idx_kj: Tensor) -> Tensor:
        """[T, num_spherical * num_radial] from per-edge radial and per-triplet angular parts."""
        return _sbf_combine(radial, angular, idx_kj)

    def forward(self, dist: Tensor, angle: Tensor, idx_kj: Tensor) -> Tensor:
        """PyG's signature: edge distances [E] (Angstrom), triplet angles [T] (rad), idx_kj [T]."""
        return self.combine(self.radial(dist), self.angular(torch.cos(angle)), idx_kj)


# =============================================================================================
# --- ZBL screened nuclear repulsion (Eq. 8-10) ---
# =============================================================================================


def _zbl_energy_and_derivatives(z_i: Tensor, z_j: Tensor, r: Tensor, unit: str):
    """Un-switched ZBL energy E(r) and its analytic dE/dr, d2E/dr2 (unit, unit/A, unit/A^2)."""
    return _zbl_terms(z_i, z_j, r, coulomb_constant(unit), ZBL_SCREENING_LENGTH_A, ZBL_SCREENING_EXPONENT,
                      [float(c) for c in ZBL_PHI_COEFFICIENTS], [float(d) for d in ZBL_PHI_EXPONENTS])


def _zbl_terms(z_i: Tensor, z_j: Tensor, r: Tensor, coulomb: float, screening_length_a: float,
               screening_exponent: float, coefficients: List[float],
               exponents: List[float]) -> Tuple[Tensor, Tensor, Tensor]:
    """E(r), dE/dr, d2E/dr2 of Eq. 8-10 (unit, unit/A, unit/A^2) with the Coulomb constant
    `coulomb` (unit x A) and the screening constants given (TorchScript-compatible: the exported
    model calls it with the same module constants)."""
    z_i, z_j = z_i.to(r.dtype), z_j.to(r.dtype)
    a = screening_length_a / (z_i**screening_exponent + z_j**screening_exponent)
    x = r / a
    phi, dphi, d2phi = torch.zeros_like(r), torch.zeros_like(r), torch.zeros_like(r)
    for c, d in zip(coefficients, exponents):
        e = c * torch.exp(-d * x)
        phi, dphi, d2phi = phi + e, dphi - d * e, d2phi + d * d * e
    prefactor = coulomb * z_i * z_j
    energy = prefactor * phi / r
    d_energy = prefactor * (dphi / (a * r) - phi / r**2)
    d2_energy = prefactor * (d2phi / (a * a * r) - 2 * dphi / (a * r**2) + 2 * phi / r**3)
    return energy, d_energy, d2_energy


def zbl_pair_energy(z_i, z_j, r, unit: str = "eV") -> Tensor:
    """Un-switched ZBL pair energy of Eq. 8: k Z_i Z_j / r * phi(r / a) in `unit` ("eV" or
    "kcal/mol"); r in Angstrom. Tensors broadcast; differentiable in r. Raises on r ~ 0."""
    if not torch.is_tensor(r):
        r = torch.tensor(r, dtype=torch.get_default_dtype())
    z_i, z_j = torch.as_tensor(z_i, device=r.device), torch.as_tensor(z_j, device=r.device)
    check_pair_distances(r)
    return _zbl_energy_and_derivatives(z_i, z_j, r, unit)[0]


def _zbl_switched(z_i: Tensor, z_j: Tensor, r: Tensor, reach: str, coulomb: float, cutoff_a: float,
                  inner_a: float, outer_a: float, envelope_p: int, covalent_radii: Tensor,
                  screening_length_a: float, screening_exponent: float, coefficients: List[float],
                  exponents: List[float]) -> Tensor:
    """`ZBL.pair_energy` with every constant given (TorchScript-compatible: the exported model
    calls it with its own copies): the pair energy of `_zbl_terms` switched off as `reach` says."""
    energy = _zbl_terms(z_i, z_j, r, coulomb, screening_length_a, screening_exponent, coefficients, exponents)[0]
    if reach == "cutoff":
        return energy * envelope_polynomial(r / cutoff_a, envelope_p)
    if reach == "covalent":
        return energy * envelope_polynomial(r / (covalent_radii[z_i] + covalent_radii[z_j]), envelope_p)
    # LAMMPS pair_style zbl inner outer
    fc, dfc, d2fc = _zbl_terms(z_i, z_j, torch.full_like(r, outer_a), coulomb, screening_length_a,
                               screening_exponent, coefficients, exponents)
    tc = outer_a - inner_a
    a = (-3 * dfc + tc * d2fc) / tc**2
    b = (2 * dfc - tc * d2fc) / tc**3
    c = -fc + tc / 2 * dfc - tc**2 / 12 * d2fc
    t = (r - inner_a).clamp(min=0.0)
    switched = energy + c + a / 3 * t**3 + b / 4 * t**4
    return torch.where(r < outer_a, switched, torch.zeros_like(switched))


ZBL_REACHES = ("cutoff", "covalent", "lammps")

# How the ZBL per-atom energies enter DimezblNet's atomic outputs (`DimezblNet(zbl_combine=...)`):
# "add" is the paper's Sec. 3.4, v_i = sum_l v_i^(l) + v_zbl,i; "interpolate" is DeePMD-kit's
# DP+ZBL linear model, v_i = (1 - w_i) sum_l v_i^(l) + w_i v_zbl,i (`zbl_interpolation_weights`).
ZBL_COMBINATIONS = ("add", "interpolate")
ZBL_SOFTMIN_LENGTH_A = 0.1  # alpha of the softmin distance, Angstrom (DeePMD-kit's smin_alpha examples)


def zbl_interpolation_weights(dist: Tensor, target: Tensor, num_atoms: int, inner_a: float, outer_a: float,
                              softmin_length_a: float = ZBL_SOFTMIN_LENGTH_A) -> Tensor:
    """w_i in [0, 1] [N] of DeePMD-kit's DP+ZBL model (deepmd LinearEnergyAtomicModel, `_compute_weight`).

    sigma_i = sum_j r_ij e^(-r_ij / alpha) / sum_j e^(-r_ij / alpha) is a smooth minimum of atom i's
    neighbour distances (Angstrom; always >= the nearest one), u = (sigma_i - inner_a) / (outer_a - inner_a)
    and w_i = 1 for u <= 0, 1 - 10 u^3 + 15 u^4 - 6 u^5 for 0 < u < 1, 0 for u >= 1: value, first and
    second derivative continuous at both radii. An atom without neighbours has w_i = 0.
    `dist` [E] are the edge lengths, `target` [E] the atom each edge belongs to."""
    with torch.no_grad():  # a per-atom shift for a stable softmax; sigma does not depend on it
        nearest = torch.full((num_atoms,), math.inf, dtype=dist.dtype, device=dist.device)
        nearest = nearest.scatter_reduce(0, target, dist.detach(), reduce="amin")
    weight = torch.exp(-(dist - nearest.index_select(0, target)) / softmin_length_a)
    norm = scatter_sum(weight, target, num_atoms)
    has_neighbours = norm > 0
    sigma = scatter_sum(dist * weight, target, num_atoms) / torch.where(has_neighbours, norm, torch.ones_like(norm))
    u = ((sigma - inner_a) / (outer_a - inner_a)).clamp(0.0, 1.0)
    w = 1 - u**3 * (10 - 15 * u + 6 * u**2)
    return torch.where(has_neighbours, w, torch.zeros_like(w))


class ZBL(nn.Module):
    """Screened nuclear repulsion (Eq. 8-10) with a choice of reach (DESIGN.md section 3).

    - reach="cutoff": the literal term of the paper, multiplied by DimeNet's polynomial envelope
      u(r / cutoff_a) (p = 6) so that it goes smoothly to zero at the model cutoff (as nequip).
    - reach="covalent": MACE-style, E_zbl(r) * u(r / (f (rcov_i + rcov_j))), zero beyond the sum of
      covalent radii (ase.data.covalent_radii) times `covalent_factor` f (MACE: f = 1).
    - reach="lammps": LAMMPS `pair_style zbl inner outer`: E_zbl + C + [r > inner](A/3 t^3 +
      B/4 t^4), t = r - inner, zero beyond outer; energy, force and curvature vanish at outer.
      Note the constant C shifts the energy at every r < outer, as in LAMMPS.

    `forward(z, edge_index, dist)` gives per-atom energies [N] in `unit`: each directed edge
    gives half its pair energy to its target atom, so each unordered pair counts once. For
    targets that are not energies the weight `scale` is a learnable scalar starting at 0
    (`learnable_scale=True`); otherwise it is the fixed 1.
    """

    def __init__(
        self,
        unit: str = "eV",
        reach: str = "cutoff",
        cutoff_a: float = 5.0,
        inner_a: float = 0.5,
        outer_a: float = 1.0,
        envelope_p: int = 6,
        learnable_scale: bool = False,
        combine: str = "add",
        switch_inner_a: float = 0.4,
        switch_outer_a: float = 0.7,
        covalent_factor: float = 1.0,
    ):
        super().__init__()
        coulomb_constant(unit)  # validates the unit
        if not covalent_factor > 0:
            raise ValueError(f"zbl_covalent_factor must be positive, got {covalent_factor}")
        if combine not in ZBL_COMBINATIONS:
            raise ValueError(f"unknown zbl_combine {combine!r}: use one of {ZBL_COMBINATIONS}")
        if combine == "interpolate" and not 0 < switch_inner_a < switch_outer_a < cutoff_a:
            raise ValueError(f"the ZBL interpolation needs 0 < zbl_switch_inner_a < zbl_switch_outer_a < cutoff, "
                             f"got {switch_inner_a}, {switch_outer_a}, {cutoff_a} (Angstrom)")
        self.combine_mode, self.switch_inner_a, self.switch_outer_a = combine, switch_inner_a, switch_outer_a
        if reach not in ZBL_REACHES:
            raise ValueError(f"unknown ZBL reach {reach!r}: use one of {ZBL_REACHES}")
        if reach == "lammps" and not 0 < inner_a < outer_a <= cutoff_a:
            raise ValueError(
                f"ZBL switch needs 0 < inner_a < outer_a <= cutoff_a, got {inner_a}, {outer_a}, "
                f"{cutoff_a} (Angstrom)"
            )
        self.unit, self.reach, self.cutoff_a = unit, reach, cutoff_a
        self.inner_a, self.outer_a, self.envelope_p = inner_a, outer_a, envelope_p
        if learnable_scale:
            self.scale = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("scale", torch.ones(()))
        self.covalent_factor = covalent_factor  # reach="covalent": zero beyond factor * (rcov_i + rcov_j)
        self.constants = ConstantTable(covalent_radii=covalent_factor * covalent_radii_a())

    def extra_repr(self) -> str:
        return f"unit={self.unit!r}, reach={self.reach!r}, cutoff_a={self.cutoff_a}, combine={self.combine_mode!r}"

    def pair_energy(self, z_i: Tensor, z_j: Tensor, r: Tensor) -> Tensor:
        """Switched pair energy in `unit` (without `scale`); r in Angstrom."""
        check_pair_distances(r.detach())
        return _zbl_switched(z_i, z_j, r, self.reach, coulomb_constant(self.unit), self.cutoff_a, self.inner_a,
                             self.outer_a, self.envelope_p, self.constants.get("covalent_radii", r),
                             ZBL_SCREENING_LENGTH_A, ZBL_SCREENING_EXPONENT,
                             [float(c) for c in ZBL_PHI_COEFFICIENTS], [float(d) for d in ZBL_PHI_EXPONENTS])

    def forward(self, z: Tensor, edge_index: Tensor, dist: Tensor, pos_first_order: bool = False) -> Tensor:
        """Per-atom energies [N]; `pos_first_order`: see `first_order`."""
        source, target = edge_index
        z_i, z_j = z[target], z[source]
        if pos_first_order:
            pair = first_order(lambda r: self.pair_energy(z_i, z_j, r), dist)
        else:
            pair = self.pair_energy(z_i, z_j, dist)
        return self.scale * scatter_sum(0.5 * pair, target, z.numel())  # [N]

    def combine(self, network: Tensor, z: Tensor, edge_index: Tensor, dist: Tensor,
                pos_first_order: bool = False) -> Tensor:
        """The atomic outputs [N, C] with the repulsion combined into the network's `network` [N, C]:
        network + v_zbl ("add", Sec. 3.4) or (1 - w) network + w v_zbl ("interpolate",
        `zbl_interpolation_weights`). With network = 0 it is the ZBL part of the model's energy."""
        repulsion = self(z, edge_index, dist, pos_first_order).unsqueeze(-1)  # [N, 1]
        if self.combine_mode == "add":
            return network + repulsion
        w = zbl_interpolation_weights(dist, edge_index[1], z.numel(), self.switch_inner_a,
                                      self.switch_outer_a).unsqueeze(-1)
        return (1 - w) * network + w * repulsion


# =============================================================================================
# --- DimeNet blocks (Eq. 3, Eq. 7, Sec. 3.2 and 3.4) ---
# =============================================================================================


def _swish_value_and_slope(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(silu(x), silu'(x)) = (x s, s + x s (1 - s)), s = sigmoid(x): one exp for both."""
    s = torch.sigmoid(x)
    y = x * s
    return y, s + y * (1 - s)


def _swish_value_and_slope_plus(x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
    """(residual + silu(x), silu'(x)): `_swish_value_and_slope` with the skip connection's sum."""
    s = torch.sigmoid(x)
    y = x * s
    return residual + y, s + y * (1 - s)


def _swish_curvature_times(grad_grad: Tensor, grad: Tensor, x: Tensor) -> Tensor:
    """grad_grad grad silu''(x), silu''(x) = s (1 - s) (2 + x (1 - 2 s)), s = sigmoid(x)."""
    s = torch.sigmoid(x)
    return grad_grad * grad * s * (1 - s) * (2 + x * (1 - 2 * s))


# The fused swish kernels (`CompiledKernels`): C with AVX2/FMA vectors and OpenMP threads, compiled
# with the system's C compiler when first used (-march=native: for the CPU that runs them) and
# called through ctypes, ~30 us of Python a call. exp: Cephes' range reduction and polynomial (float32, ~1 ulp)
# and a degree-13 Taylor polynomial (float64); NaN propagates through the x factor of every result.
_KERNEL_SOURCE = r"""
#include <stdint.h>
#include <stddef.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DZ_CHUNK 16384  /* one thread below this many elements */

int dimezbl_vector_width(void) { return 8; }

static inline __m256 dz_exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(89.0f)), _mm256_set1_ps(-87.0f));  /* > 88.72: inf */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static inline __m256d dz_exp_pd(__m256d x) {
    x = _mm256_max_pd(_mm256_min_pd(x, _mm256_set1_pd(710.0)), _mm256_set1_pd(-708.0));  /* > 709.78: inf */
    __m256d n = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634074)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_fnmadd_pd(n, _mm256_set1_pd(6.93147180369123816490e-01), x);
    r = _mm256_fnmadd_pd(n, _mm256_set1_pd(1.90821492927058770002e-10), r);
    static const double inv_factorial[14] = {1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720,
        1.0 / 5040, 1.0 / 40320, 1.0 / 362880, 1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600,
        1.0 / 6227020800.0};
    __m256d p = _mm256_set1_pd(inv_factorial[13]);
    for (int k = 12; k >= 0; --k) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(inv_factorial[k]));
    __m256i e = _mm256_slli_epi64(_mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(n)),
                                                   _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

/* One vector: y = silu(x) (+ residual), slope = silu'(x) = s + y (1 - s), s = sigmoid(x). */
#define DZ_SWISH(V, T, sfx, exp_fn)                                                         \
static inline void dz_swish_##sfx(const T* x, const T* res, T* y, T* slope) {               \
    V one = _mm256_set1_##sfx(1), v = _mm256_loadu_##sfx(x);                                 \
    V s = _mm256_div_##sfx(one, _mm256_add_##sfx(one, exp_fn(_mm256_sub_##sfx(_mm256_setzero_##sfx(), v)))); \
    V value = _mm256_mul_##sfx(v, s);                                                        \
    _mm256_storeu_##sfx(slope, _mm256_fmadd_##sfx(value, _mm256_sub_##sfx(one, s), s));     \
    if (res) value = _mm256_add_##sfx(value, _mm256_loadu_##sfx(res));                       \
    _mm256_storeu_##sfx(y, value);                                                           \
}                                                                                            \
/* One vector: gg g silu''(x), silu''(x) = s (1 - s) (2 + x (1 - 2 s)). */                  \
static inline void dz_curv_##sfx(const T* gg, const T* g, const T* x, T* out) {             \
    V one = _mm256_set1_##sfx(1), v = _mm256_loadu_##sfx(x);                                 \
    V s = _mm256_div_##sfx(one, _mm256_add_##sfx(one, exp_fn(_mm256_sub_##sfx(_mm256_setzero_##sfx(), v)))); \
    V ds = _mm256_mul_##sfx(s, _mm256_sub_##sfx(one, s));                                    \
    V shape = _mm256_fmadd_##sfx(v, _mm256_fnmadd_##sfx(_mm256_set1_##sfx(2), s, one), _mm256_set1_##sfx(2)); \
    V gg_g = _mm256_mul_##sfx(_mm256_loadu_##sfx(gg), _mm256_loadu_##sfx(g));              \
    _mm256_storeu_##sfx(out, _mm256_mul_##sfx(_mm256_mul_##sfx(gg_g, ds), shape));         \
}                                                                                            \
void dimezbl_swish_##sfx(const T* x, const T* res, T* y, T* slope, int64_t n, int threads) { \
    const int w = 32 / sizeof(T);                                                            \
    int64_t full = n / w;                                                                    \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (n >= DZ_CHUNK)")    \
    for (int64_t b = 0; b < full; ++b)                                                       \
        dz_swish_##sfx(x + b * w, res ? res + b * w : NULL, y + b * w, slope + b * w);       \
    if (n > full * w) { /* the last partial vector through zero-padded copies */            \
        T bx[8] = {0}, br[8] = {0}, by[8], bs[8]; int64_t o = full * w;                      \
        for (int64_t k = o; k < n; ++k) { bx[k - o] = x[k]; if (res) br[k - o] = res[k]; }   \
        dz_swish_##sfx(bx, res ? br : NULL, by, bs);                                         \
        for (int64_t k = o; k < n; ++k) { y[k] = by[k - o]; slope[k] = bs[k - o]; }          \
    }                                                                                        \
}                                                                                            \
void dimezbl_curvature_##sfx(const T* gg, const T* g, const T* x, T* out, int64_t n, int threads) { \
    const int w = 32 / sizeof(T);                                                            \
    int64_t full = n / w;                                                                    \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (n >= DZ_CHUNK)")    \
    for (int64_t b = 0; b < full; ++b) dz_curv_##sfx(gg + b * w, g + b * w, x + b * w, out + b * w); \
    if (n > full * w) {                                                                      \
        T bgg[8] = {0}, bg[8] = {0}, bx[8] = {0}, bo[8]; int64_t o = full * w;               \
        for (int64_t k = o; k < n; ++k) { bgg[k - o] = gg[k]; bg[k - o] = g[k]; bx[k - o] = x[k]; } \
        dz_curv_##sfx(bgg, bg, bx, bo);                                                      \
        for (int64_t k = o; k < n; ++k) out[k] = bo[k - o];                                  \
    }                                                                                        \
}

DZ_SWISH(__m256, float, ps, dz_exp_ps)
DZ_SWISH(__m256d, double, pd, dz_exp_pd)

/* The gradients of m[e, l, c] = q[e, l, c] x[e, c] in one pass: grad_q = g x, grad_x = sum_l g q. */
#define DZ_MESSAGE_BACKWARD(T, sfx)                                                           \
void dimezbl_message_backward_##sfx(const T* restrict g, const T* restrict q, const T* restrict x, \
                                    T* restrict grad_q, T* restrict grad_x, int64_t edges,      \
                                    int64_t width, int64_t channels, int threads) {            \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (edges * width * channels >= DZ_CHUNK)") \
    for (int64_t e = 0; e < edges; ++e) {                                                     \
        const T* xe = x + e * channels;                                                       \
        T* gx = grad_x + e * channels;                                                        \
        for (int64_t c = 0; c < channels; ++c) gx[c] = 0;                                     \
        for (int64_t l = 0; l < width; ++l) {                                                 \
            int64_t o = (e * width + l) * channels;                                           \
            for (int64_t c = 0; c < channels; ++c) {                                          \
                grad_q[o + c] = g[o + c] * xe[c];                                             \
                gx[c] += g[o + c] * q[o + c];                                                 \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
}

DZ_MESSAGE_BACKWARD(float, ps)
DZ_MESSAGE_BACKWARD(double, pd)

/* DimeNet++'s per-edge messages through the rank-B SBF embedding, q never stored:
   g[e, l, c] = x[e, c] q[e, l, c], q[e, l, c] = sum_b r[e, l, b] wt[b, c] (wt = W_sbf2^T [B, C]);
   and the first-order backward: grad_x = sum_l G q, grad_r = (G x) wt^T, grad_wt = sum_(e, l) r^T (G x)
   (per-thread partial sums in double, added in thread order). q is recomputed per row. */
#define DZ_MAX_CHANNELS 512
#define DZ_MAX_BASIS 16
#define DZ_SBF_MESSAGES(T, sfx)                                                               \
static inline void dz_q_row_##sfx(const T* restrict re, const T* restrict wt, T* restrict q,  \
                                  int64_t basis, int64_t channels) {                          \
    for (int64_t c = 0; c < channels; ++c) q[c] = 0;                                          \
    for (int64_t b = 0; b < basis; ++b) {                                                     \
        const T rb = re[b], *w = wt + b * channels;                                           \
        for (int64_t c = 0; c < channels; ++c) q[c] += rb * w[c];                             \
    }                                                                                         \
}                                                                                             \
void dimezbl_sbf_messages_##sfx(const T* restrict r, const T* restrict wt, const T* restrict x, \
                                T* restrict g, int64_t edges, int64_t width, int64_t basis,   \
                                int64_t channels, int threads) {                              \
    _Pragma("omp parallel for num_threads(threads) schedule(static) if (edges * width * channels >= DZ_CHUNK)") \
    for (int64_t e = 0; e < edges; ++e) {                                                     \
        T q[DZ_MAX_CHANNELS];                                                                 \
        const T* xe = x + e * channels;                                                       \
        for (int64_t l = 0; l < width; ++l) {                                                 \
            int64_t row = e * width + l;                                                      \
            dz_q_row_##sfx(r + row * basis, wt, q, basis, channels);                          \
            T* ge = g + row * channels;                                                       \
            for (int64_t c = 0; c < channels; ++c) ge[c] = q[c] * xe[c];                      \
        }                                                                                     \
    }                                                                                         \
}                                                                                             \
int dimezbl_sbf_messages_backward_##sfx(const T* restrict grad, const T* restrict r, const T* restrict wt, \
                                        const T* restrict x, T* restrict grad_r, T* restrict grad_x, \
                                        T* restrict grad_wt, int64_t edges, int64_t width, int64_t basis, \
                                        int64_t channels, int threads) {                      \
    int team = edges * width * channels >= DZ_CHUNK ? threads : 1;                            \
    int64_t size = basis * channels;                                                          \
    double* partial = calloc((size_t)team * (size_t)size, sizeof(double));                    \
    if (!partial) return -1;                                                                  \
    _Pragma("omp parallel num_threads(team)")                                                 \
    {                                                                                         \
        double* acc = partial + (size_t)omp_get_thread_num() * (size_t)size;                  \
        T q[DZ_MAX_CHANNELS], gq[DZ_MAX_CHANNELS], block[DZ_MAX_BASIS * DZ_MAX_CHANNELS];     \
        _Pragma("omp for schedule(static)")                                                   \
        for (int64_t e = 0; e < edges; ++e) {                                                 \
            const T* xe = x + e * channels;                                                   \
            T* gx = grad_x + e * channels;                                                    \
            for (int64_t c = 0; c < channels; ++c) gx[c] = 0;                                 \
            for (int64_t k = 0; k < size; ++k) block[k] = 0;                                  \
            for (int64_t l = 0; l < width; ++l) {                                             \
                int64_t row = e * width + l;                                                  \
                const T* re = r + row * basis;                                                \
                const T* ge = grad + row * channels;                                          \
                dz_q_row_##sfx(re, wt, q, basis, channels);                                   \
                for (int64_t c = 0; c < channels; ++c) { gq[c] = ge[c] * xe[c]; gx[c] += ge[c] * q[c]; } \
                for (int64_t b = 0; b < basis; ++b) {                                         \
                    const T* w = wt + b * channels;                                           \
                    T lanes[8] = {0}, dot = 0, rb = re[b];                                    \
                    T* blk = block + b * channels;                                            \
                    int64_t full = channels / 8 * 8;                                          \
                    for (int64_t c = 0; c < full; c += 8)  /* 8 running sums: vectorised */  \
                        for (int j = 0; j < 8; ++j) lanes[j] += gq[c + j] * w[c + j];         \
                    for (int64_t c = full; c < channels; ++c) dot += gq[c] * w[c];            \
                    for (int j = 0; j < 8; ++j) dot += lanes[j];                              \
                    for (int64_t c = 0; c < channels; ++c) blk[c] += rb * gq[c];              \
                    grad_r[row * basis + b] = dot;                                            \
                }                                                                             \
            }                                                                                 \
            for (int64_t k = 0; k < size; ++k) acc[k] += block[k];                            \
        }                                                                                     \
    }                                                                                         \
    for (int64_t k = 0; k < size; ++k) {                                                      \
        double total = 0;                                                                     \
        for (int t = 0; t < team; ++t) total += partial[(size_t)t * (size_t)size + k];        \
        grad_wt[k] = (T)total;                                                                \
    }                                                                                         \
    free(partial);                                                                            \
    return 0;                                                                                 \
}

DZ_SBF_MESSAGES(float, ps)
DZ_SBF_MESSAGES(double, pd)

/* The float32 backward for channels a multiple of 8, with AVX2 vectors (the model's case: 64). */
static inline float dz_hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
int dimezbl_sbf_messages_backward_ps8(const float* restrict grad, const float* restrict r,
                                      const float* restrict wt, const float* restrict x,
                                      float* restrict grad_r, float* restrict grad_x, float* restrict grad_wt,
                                      int64_t edges, int64_t width, int64_t basis, int64_t channels, int threads) {
    int team = edges * width * channels >= DZ_CHUNK ? threads : 1;
    int64_t size = basis * channels;
    double* partial = calloc((size_t)team * (size_t)size, sizeof(double));
    if (!partial) return -1;
    _Pragma("omp parallel num_threads(team)")
    {
        double* acc = partial + (size_t)omp_get_thread_num() * (size_t)size;
        float gq[DZ_MAX_CHANNELS] __attribute__((aligned(32)));
        float block[DZ_MAX_BASIS * DZ_MAX_CHANNELS] __attribute__((aligned(32)));
        _Pragma("omp for schedule(static)")
        for (int64_t e = 0; e < edges; ++e) {
            const float* xe = x + e * channels;
            float* gx = grad_x + e * channels;
            for (int64_t c = 0; c < channels; ++c) gx[c] = 0;
            for (int64_t k = 0; k < size; ++k) block[k] = 0;
            for (int64_t l = 0; l < width; ++l) {
                int64_t row = e * width + l;
                const float* re = r + row * basis;
                const float* ge = grad + row * channels;
                for (int64_t c = 0; c < channels; c += 8) {
                    __m256 q = _mm256_setzero_ps();
                    for (int64_t b = 0; b < basis; ++b)
                        q = _mm256_fmadd_ps(_mm256_set1_ps(re[b]), _mm256_loadu_ps(wt + b * channels + c), q);
                    __m256 g = _mm256_loadu_ps(ge + c);
                    _mm256_storeu_ps(gx + c, _mm256_fmadd_ps(g, q, _mm256_loadu_ps(gx + c)));
                    _mm256_store_ps(gq + c, _mm256_mul_ps(g, _mm256_loadu_ps(xe + c)));
                }
                for (int64_t b = 0; b < basis; ++b) {
                    const float* w = wt + b * channels;
                    float* blk = block + b * channels;
                    __m256 dot = _mm256_setzero_ps(), rb = _mm256_set1_ps(re[b]);
                    for (int64_t c = 0; c < channels; c += 8) {
                        __m256 v = _mm256_load_ps(gq + c);
                        dot = _mm256_fmadd_ps(v, _mm256_loadu_ps(w + c), dot);
                        _mm256_store_ps(blk + c, _mm256_fmadd_ps(rb, v, _mm256_load_ps(blk + c)));
                    }
                    grad_r[row * basis + b] = dz_hsum_ps(dot);
                }
            }
            for (int64_t k = 0; k < size; ++k) acc[k] += block[k];
        }
    }
    for (int64_t k = 0; k < size; ++k) {
        double total = 0;
        for (int t = 0; t < team; ++t) total += partial[(size_t)t * (size_t)size + k];
        grad_wt[k] = (float)total;
    }
    free(partial);
    return 0;
}
#else
int dimezbl_vector_width(void) { return 1; }  /* no AVX2/FMA: the kernels are not used */
#endif
"""


def _build_kernel_library() -> ctypes.CDLL:
    """Compile `_KERNEL_SOURCE` (C compiler: $CC, else cc, gcc or clang on PATH) into a temporary
    directory and load it; OpenMP where the compiler has it, else one thread. RuntimeError with the
    compiler's message, or where this CPU has no AVX2/FMA (the kernels' only vector path)."""
    compiler = os.environ.get("CC", "").strip() or next(
        (found for found in map(shutil.which, ("cc", "gcc", "clang")) if found), None)
    if not compiler:
        raise RuntimeError("no C compiler found (none of cc, gcc, clang on PATH, and CC is not set)")
    try:  # CC may carry a launcher or flags, e.g. "ccache gcc"
        command = shlex.split(compiler)
    except ValueError as error:
        raise RuntimeError(f"CC={compiler!r} is not a valid command line: {error}") from error
    with tempfile.TemporaryDirectory(prefix="dimezbl_kernels_") as folder:
        source, library = os.path.join(folder, "kernels.c"), os.path.join(folder, "kernels.so")
        with open(source, "w", encoding="utf-8") as handle:
            handle.write(_KERNEL_SOURCE)
        base = command + ["-O3", "-march=native", "-fPIC", "-shared", source, "-o", library, "-lm"]
        errors = []
        for openmp in (["-fopenmp"], []):
            try:
                done = subprocess.run(base + openmp, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.SubprocessError) as error:
                raise RuntimeError(f"running the C compiler {compiler!r} failed: {error}") from error
            if done.returncode == 0:
                break
            errors.append((done.stderr or done.stdout).strip().splitlines()[:1])
        else:
            raise RuntimeError(f"the C compiler {compiler!r} failed: {errors[-1][0] if errors[-1] else '?'}")
        lib = ctypes.CDLL(library)  # mapped now; the folder can go
    if lib.dimezbl_vector_width() < 8:
        raise RuntimeError("this CPU has no AVX2/FMA, the fused kernels' vector path")
    for name in ("dimezbl_swish_ps", "dimezbl_swish_pd", "dimezbl_curvature_ps", "dimezbl_curvature_pd"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_int]
        getattr(lib, name).restype = None
    for name in ("dimezbl_message_backward_ps", "dimezbl_message_backward_pd"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3 + [ctypes.c_int]
        getattr(lib, name).restype = None
    for name in ("dimezbl_sbf_messages_ps", "dimezbl_sbf_messages_pd"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        getattr(lib, name).restype = None
    for name in ("dimezbl_sbf_messages_backward_ps", "dimezbl_sbf_messages_backward_pd",
                 "dimezbl_sbf_messages_backward_ps8"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.openmp = bool(openmp)
    return lib


class CompiledKernels:
    """Optional fused elementwise kernels (issue 6): C (AVX2/FMA, OpenMP), compiled by the system's
    C compiler at the first use in each process (~1 s) and called through ctypes. For `swish`:
    silu(x) and silu'(x) [+ a residual] in one pass, and the second derivative in one pass; for
    DimeNet++'s per-edge messages (`_EdgeMessages`): both first derivatives in one pass.

    On this CPU an elementwise pass over an [E, 128] tensor costs a third to a half of an exp
    (silu, silu_backward and sigmoid are bound by their exp), and a force training step spends
    ~14% of its time in the activation: torch's silu recomputes sigmoid(x) in every backward
    pass. With the kernels, the forward computes silu(x) and silu'(x) in one pass (one exp) and
    keeps silu'(x), every first derivative is then one product, and the second derivative one
    fused pass. Values equal eager's to float32 rounding (tested; exp to ~1 ulp).

    Off by default; `enable_compiled_kernels()`, or DIMEZBL_COMPILED_KERNELS=1 in the
    environment when dimezbl_core is imported, turns them on (CPU tensors of float32/float64
    only; CUDA keeps the eager path). Where they cannot be built (no C compiler, no AVX2/FMA),
    a warning names the cause and the eager path takes over. Memory: silu'(x) is kept beside x,
    one more [E, 128] tensor per activation until the backward. (Sessions 16-17 compiled the same
    formulas with torch.compile; its dynamo/Inductor wrapper cost ~0.2 ms a call, and its exp was
    slower: 2.0 vs 1.3 ms for silu(x) and silu'(x) on the QM9 batch's [E, 128].)
    """

    enabled = os.environ.get("DIMEZBL_COMPILED_KERNELS", "0").strip().lower() in ("1", "true", "yes", "on")
    failure: Optional[str] = None
    _library: Optional[ctypes.CDLL] = None

    @classmethod
    def active_for(cls, x: Tensor) -> bool:
        """Whether `swish` takes the fused path for x: enabled, not failed, a CPU float tensor, and
        no Python dispatch mode (an op timer, FakeTensor tracing) active, under which the kernels'
        raw memory access would bypass it."""
        return (cls.enabled and cls.failure is None and x.device.type == "cpu"
                and x.dtype in (torch.float32, torch.float64) and not torch.jit.is_scripting()
                and _get_current_dispatch_mode() is None)

    @classmethod
    def library(cls) -> Optional[ctypes.CDLL]:
        """The loaded kernels, built at the first call; None (with one warning naming the cause
        and the fix, and the eager path from then on) where they cannot be built."""
        if cls._library is None and cls.failure is None:
            try:
                cls._library = _build_kernel_library()
            except (RuntimeError, OSError) as error:
                cls.failure = str(error)
                warnings.warn(
                    f"dimezbl_core: building the fused kernels failed ({cls.failure}); using the eager "
                    "path from now on (same values). They need a C compiler (e.g. `apt install gcc`, or CC=...) "
                    "and an x86-64 CPU with AVX2/FMA; or unset DIMEZBL_COMPILED_KERNELS.",
                    RuntimeWarning, stacklevel=4)
        return cls._library

    @classmethod
    def _kernel(cls, name: str, dtype: torch.dtype, suffix: str = ""):
        """The C function dimezbl_<name>_<ps|pd><suffix> for `dtype` (float32 / float64), or None where
        the library cannot serve (not built, or a Python dispatch mode active: raw pointers would
        bypass it); the caller then takes its eager formula."""
        library = cls.library() if _get_current_dispatch_mode() is None else None
        if library is None:
            return None
        return getattr(library, f"dimezbl_{name}_{'ps' if dtype == torch.float32 else 'pd'}{suffix}")

    @classmethod
    def _run(cls, kernel: str, fallback, tensors: Tuple[Tensor, ...], optional: Optional[Tensor] = None,
             outputs: int = 1):
        """kernel(tensors..., optional or NULL, outputs...) on contiguous copies of same-shaped CPU
        tensors of one float dtype; `fallback(*tensors[, optional])` where the kernels are off or failed."""
        args = tensors if optional is None else tensors + (optional,)
        x = tensors[0]
        function = cls._kernel(kernel, x.dtype)
        if function is None:
            return fallback(*args)
        for t in args:
            if t.shape != x.shape or t.dtype != x.dtype or t.device.type != "cpu":
                raise ValueError(f"fused swish kernel {kernel}: tensors of shape {tuple(x.shape)}, {x.dtype} on the "
                                 f"CPU expected, got {tuple(t.shape)}, {t.dtype} on {t.device}")
        inputs = [t.detach().contiguous() for t in tensors]
        extra = optional.detach().contiguous() if optional is not None else None
        out = [torch.empty_like(inputs[0]) for _ in range(outputs)]
        pointers = [t.data_ptr() for t in inputs]
        if kernel == "swish":
            pointers.append(extra.data_ptr() if extra is not None else None)
        function(*pointers, *(o.data_ptr() for o in out), x.numel(), torch.get_num_threads())
        return tuple(out) if outputs > 1 else out[0]

    @classmethod
    def state(cls) -> str:
        """For provenance: "eager", "fused kernels (DIMEZBL_COMPILED_KERNELS)" or the failure."""
        if not cls.enabled:
            return "eager"
        if cls.failure is not None:
            return f"eager (building the fused kernels failed: {cls.failure})"
        threads = ("built at the first call" if cls._library is None else "OpenMP" if cls._library.openmp
                   else "one thread: built without OpenMP")
        return f"fused kernels (C, AVX2, {threads}; DIMEZBL_COMPILED_KERNELS / enable_compiled_kernels)"

    @classmethod
    def value_and_slope(cls, x: Tensor) -> Tuple[Tensor, Tensor]:
        return cls._run("swish", _swish_value_and_slope, (x,), outputs=2)

    @classmethod
    def value_and_slope_plus(cls, x: Tensor, residual: Tensor) -> Tuple[Tensor, Tensor]:
        return cls._run("swish", _swish_value_and_slope_plus, (x,), residual, outputs=2)

    @classmethod
    def curvature_times(cls, grad_grad: Tensor, grad: Tensor, x: Tensor) -> Tensor:
        return cls._run("curvature", _swish_curvature_times, (grad_grad, grad, x))

    @staticmethod
    def _check_sbf_messages(r: Tensor, weight: Tensor, x: Tensor, grad: Optional[Tensor] = None) -> None:
        """The shapes and dtypes the raw-pointer kernels rely on (ValueError otherwise)."""
        ok = (r.dim() == 3 and weight.dim() == 2 and r.size(2) == weight.size(1) <= 16 and weight.size(0) <= 512
              and x.shape == (r.size(0), weight.size(0)) and r.dtype == weight.dtype == x.dtype
              and (grad is None or (grad.shape == (r.size(0), r.size(1), weight.size(0)) and grad.dtype == r.dtype)))
        if not ok:
            raise ValueError(f"sbf_messages: r [E, L, B], weight [C, B] (B <= 16, C <= 512), x [E, C] (and grad "
                             f"[E, L, C]) of one dtype expected, got {tuple(r.shape)}, {tuple(weight.shape)}, "
                             f"{tuple(x.shape)}{'' if grad is None else ', ' + str(tuple(grad.shape))}")

    @classmethod
    def sbf_messages(cls, r: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        """g[e, l, c] = x[e, c] sum_b r[e, l, b] weight[c, b] (r [E, L, B], weight [C, B], x [E, C]) in one
        pass, q = r weight^T never stored."""
        function = cls._kernel("sbf_messages", r.dtype)
        if function is None:
            return (r @ weight.t()) * x.unsqueeze(1)
        cls._check_sbf_messages(r, weight, x)
        r, wt, x = r.detach().contiguous(), weight.detach().t().contiguous(), x.detach().contiguous()
        edges, width, basis = r.shape
        g = r.new_empty(edges, width, wt.shape[1])
        function(
            r.data_ptr(), wt.data_ptr(), x.data_ptr(), g.data_ptr(), edges, width, basis, wt.shape[1],
            torch.get_num_threads())
        return g

    @classmethod
    def sbf_messages_backward(cls, grad: Tensor, r: Tensor, weight: Tensor, x: Tensor
                              ) -> Tuple[Tensor, Tensor, Tensor]:
        """The gradients of `sbf_messages` for r, weight and x, in one pass (q recomputed per row)."""
        # float32 with channels a multiple of 8 (the model's 64): the AVX2 version
        vectorised = r.dtype == torch.float32 and weight.size(0) % 8 == 0
        function = cls._kernel("sbf_messages_backward", r.dtype, "8" if vectorised else "")
        if function is None:
            return _sbf_message_gradients(grad, r, weight, x)
        cls._check_sbf_messages(r, weight, x, grad)
        grad, r, x = grad.detach().contiguous(), r.detach().contiguous(), x.detach().contiguous()
        wt = weight.detach().t().contiguous()
        edges, width, basis = r.shape
        grad_r, grad_x, grad_wt = torch.empty_like(r), torch.empty_like(x), torch.empty_like(wt)
        status = function(
            grad.data_ptr(), r.data_ptr(), wt.data_ptr(), x.data_ptr(), grad_r.data_ptr(), grad_x.data_ptr(),
            grad_wt.data_ptr(), edges, width, basis, wt.shape[1], torch.get_num_threads())
        if status != 0:
            raise MemoryError("sbf_messages_backward: no memory for the weight gradient's per-thread partial sums")
        return grad_r, grad_wt.t(), grad_x

    @classmethod
    def message_backward(cls, grad: Tensor, q: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
        """(grad x[:, None], (grad q).sum(1)): the gradients of m = q x[:, None] for q, grad [E, L, C]
        and x [E, C], in one pass (eager: three, with an [E, L, C] temporary)."""
        function = cls._kernel("message_backward", q.dtype)
        if function is None:
            return _message_gradients(grad, q, x)
        if grad.shape != q.shape or x.shape != (q.shape[0], q.shape[2]) or not grad.dtype == q.dtype == x.dtype:
            raise ValueError(f"message_backward: grad and q [E, L, C] and x [E, C] of one dtype expected, got "
                             f"{tuple(grad.shape)}, {tuple(q.shape)}, {tuple(x.shape)}")
        grad, q, x = grad.detach().contiguous(), q.detach().contiguous(), x.detach().contiguous()
        grad_q, grad_x = torch.empty_like(q), torch.empty_like(x)
        function(
            grad.data_ptr(), q.data_ptr(), x.data_ptr(), grad_q.data_ptr(), grad_x.data_ptr(),
            q.shape[0], q.shape[1], q.shape[2], torch.get_num_threads())
        return grad_q, grad_x


def enable_compiled_kernels(enabled: bool = True) -> bool:
    """Turn the fused swish kernels (`CompiledKernels`) on or off for this process; returns
    whether they were on before."""
    before = CompiledKernels.enabled
    CompiledKernels.enabled = bool(enabled)
    return before


def _message_gradients(grad: Tensor, q: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """The gradients of m = q x[:, None] (q [E, L, C], x [E, C]) for q and x, differentiable."""
    return grad * x.unsqueeze(1), (grad * q).sum(1)


def _sbf_message_gradients(grad: Tensor, r: Tensor, weight: Tensor, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of g = (r weight^T) x[:, None] (r [E, L, B], weight [C, B], x [E, C]) for r,
    weight and x; differentiable (q = r weight^T recomputed)."""
    grad_q, grad_x = _message_gradients(grad, r @ weight.t(), x)
    return grad_q @ weight, grad_q.reshape(-1, grad_q.size(-1)).t() @ r.reshape(-1, r.size(-1)), grad_x


class _SbfMessages(torch.autograd.Function):
    """g[e, l, c] = x[e, c] sum_b r[e, l, b] W_sbf2[c, b]: DimeNet++'s per-edge messages through the
    rank-B SBF embedding, with the fused kernels: forward and first-order backward one pass each,
    q = r W_sbf2^T never stored; under create_graph (force training) the differentiable composite."""

    @staticmethod
    def forward(ctx, r: Tensor, weight: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(r, weight, x)
        return CompiledKernels.sbf_messages(r, weight, x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        r, weight, x = ctx.saved_tensors
        if not torch.is_grad_enabled() and CompiledKernels.active_for(r):
            return CompiledKernels.sbf_messages_backward(grad, r, weight, x)
        return _sbf_message_gradients(grad, r, weight, x)


class _EdgeMessages(torch.autograd.Function):
    """m[e, l, c] = q[e, l, c] x[e, c] (DimeNet++'s per-edge messages before the triplet sum); the
    first-order backward as one fused pass where the fused kernels run, the differentiable
    composite under create_graph (force training's first backward)."""

    @staticmethod
    def forward(ctx, q: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(q, x)
        return q * x.unsqueeze(1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, x = ctx.saved_tensors
        if not torch.is_grad_enabled() and CompiledKernels.active_for(q) and all(ctx.needs_input_grad):
            return CompiledKernels.message_backward(grad, q, x)
        grad_q, grad_x = _message_gradients(grad, q, x)
        return (grad_q if ctx.needs_input_grad[0] else None), (grad_x if ctx.needs_input_grad[1] else None)


class _SwishGrad(torch.autograd.Function):
    """g * silu'(x) in one kernel (aten.silu_backward, or one product with the slope the
    compiled forward kept), with its derivatives in closed form:
    d/dg = silu'(x), d/dx = g silu''(x), silu''(x) = s (1 - s) (2 + x (1 - 2 s)), s = sigmoid(x).
    (torch's own silu, differentiated twice, records about ten elementwise operations and
    their saved inputs per activation: a third of the force step's peak memory.)"""

    @staticmethod
    def forward(ctx, grad: Tensor, x: Tensor, slope: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(grad, x, slope)
        if slope is not None:
            return grad * slope
        return torch.ops.aten.silu_backward(grad, x)

    @staticmethod
    def backward(ctx, grad_grad: Tensor):
        grad, x, slope = ctx.saved_tensors
        d_grad = _SwishGrad.apply(grad_grad, x, slope) if ctx.needs_input_grad[0] else None
        d_x = None
        if ctx.needs_input_grad[1]:
            if torch.is_grad_enabled():  # third order asked for: differentiable composite
                d_x = _swish_curvature_times(grad_grad, grad, x)
            elif slope is not None:  # the compiled path: one fused pass
                d_x = CompiledKernels.curvature_times(grad_grad, grad, x)
            else:  # g g' s (1 - s) in one kernel, then (2 + x (1 - 2 s)) in place
                s = torch.sigmoid(x)
                d_x = torch.ops.aten.sigmoid_backward(grad_grad * grad, s)
                d_x.mul_(torch.rsub(s, 1, alpha=2).mul_(x).add_(2))
        return d_grad, d_x, None


class _Swish(torch.autograd.Function):
    """swish(x), or residual + swish(x) (one pass with the fused kernels: the residual layers'
    skip connections)."""

    @staticmethod
    def forward(ctx, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        slope, ctx.with_residual = None, residual is not None
        if CompiledKernels.active_for(x):
            if residual is not None and residual.shape == x.shape and residual.is_contiguous():
                y, slope = CompiledKernels.value_and_slope_plus(x, residual)
                residual = None
            else:
                y, slope = CompiledKernels.value_and_slope(x)
        else:
            y = F.silu(x)
        ctx.save_for_backward(x, slope)
        return y if residual is None else residual + y

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, slope = ctx.saved_tensors
        grad_x = _SwishGrad.apply(grad, x, slope)
        if not ctx.with_residual:
            return grad_x
        return grad_x, grad if ctx.needs_input_grad[1] else None


def swish(x: Tensor) -> Tensor:
    """x sigmoid(x) (DimeNet's activation, torch's silu) with hand-written first and second
    derivatives (`_SwishGrad`): same values as F.silu, differentiable to any order, and about
    half the elementwise passes and saved tensors of F.silu in force training. TorchScript (the
    exported model) compiles it as F.silu."""
    if torch.jit.is_scripting():
        return F.silu(x)
    return _swish_autograd(x)


@torch.jit.unused
def _plus_activation(act, pre: Tensor, residual: Tensor) -> Tensor:
    """residual + act(pre); for swish one fused pass where the fused kernels run."""
    if act is swish:
        return _Swish.apply(pre, residual)
    return residual + act(pre)


@torch.jit.unused
def _swish_autograd(x: Tensor) -> Tensor:
    return _Swish.apply(x)


def glorot_orthogonal_(weight: Tensor, scale: float = 2.0) -> Tensor:
    """DimeNet's GlorotOrthogonal initialiser: an orthogonal matrix scaled to variance
    scale / (fan_in + fan_out)."""
    with torch.no_grad():
        nn.init.orthogonal_(weight)
        weight.mul_(torch.sqrt(scale / ((weight.size(-2) + weight.size(-1)) * weight.var())))
    return weight


def _narrow_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x W^T + b for a layer with few inputs (the RBF's 6 or 8, the SBF's 8), W^T passed
    contiguous: autograd then forms W's gradient as x^T @ grad ([in, E] x [E, out]), not as
    (grad^T @ x)^T to match W's layout ([out, E] x [E, in]), which MKL runs 4x slower for in = 6,
    out = 128 on this project's CPU (2.3 vs 0.5 ms on the QM9 batch). F.linear's values, to
    float rounding."""
    weight_t = weight.t().contiguous()
    if bias is None:
        return x @ weight_t
    return torch.addmm(bias, x, weight_t)


def _dense(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(in_features, out_features, bias=bias)
    glorot_orthogonal_(layer.weight)
    if bias:
        nn.init.zeros_(layer.bias)
    return layer


class EmbeddingBlock(nn.Module):
    """Eq. 7: h_ji = act([Z_j || Z_i || act(e_RBF W_rbf + b)] W + b) (the code's form: the RBF
    goes through a dense layer with bias and activation first, and the order is [i, j, rbf]).

    The dense layer on the concatenation is applied to the atom embeddings per atom and then
    gathered to the edges (same result, E/N times fewer multiply-adds).
    """

    def __init__(self, num_radial: int, hidden_channels: int, act=swish):
        super().__init__()
        self.act = act
        self.emb = nn.Embedding(MAX_ATOMIC_NUMBER + 1, hidden_channels)
        self.lin_rbf = _dense(num_radial, hidden_channels)
        self.lin = _dense(3 * hidden_channels, hidden_channels)
        with torch.no_grad():
            self.emb.weight.uniform_(-math.sqrt(3), math.sqrt(3))

    def forward(self, z: Tensor, rbf: Tensor, i: Tensor, j: Tensor) -> Tensor:
        hidden = self.emb.embedding_dim
        atoms = self.emb(z)  # [N, H]
        w_i, w_j, w_rbf = self.lin.weight.split(hidden, dim=1)
        rbf = self.act(_narrow_linear(rbf, self.lin_rbf.weight, self.lin_rbf.bias))
        per_edge = F.linear(rbf, w_rbf, self.lin.bias)
        # index_select, not [i]: its backward is index_add_ (0.5 ms here), advanced indexing's an
        # accumulating index_put (7 ms for [E, 128] into [N, 128] on the QM9 batch)
        return self.act((atoms @ w_i.T).index_select(0, i) + (atoms @ w_j.T).index_select(0, j) + per_edge)


class ResidualLayer(nn.Module):
    def __init__(self, hidden_channels: int, act=swish):
        super().__init__()
        self.act = act
        self.lin1 = _dense(hidden_channels, hidden_channels)
        self.lin2 = _dense(hidden_channels, hidden_channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.lin2(self.act(self.lin1(x)))
        if torch.jit.is_scripting():
            return x + self.act(h)
        return _plus_activation(self.act, h, x)


class _ResidualStack:
    """The part of both interaction blocks after the message: residual layers, the skip
    connection, residual layers (attribute names are PyG's, so state dicts match)."""

    def residual_stack(self, h: Tensor, x: Tensor) -> Tensor:
        for layer in self.layers_before_skip:
            h = layer(h)
        if torch.jit.is_scripting():
            h = self.act(self.lin(h)) + x
        else:
            h = _plus_activation(self.act, self.lin(h), x)
        for layer in self.layers_after_skip:
            h = layer(h)
        return h


class InteractionBlock(_ResidualStack, nn.Module):
    """Directional message passing of Eq. 3 with DimeNet's bilinear layer (Sec. 3.2).

    m_ji[a] = f(h_ji) + sum_k sum_{l,b} W[a, l, b] s[kj, ji, l] x[kj, b], with s = a_SBF W_sbf
    and x = e_RBF[kj] W_rbf (.) act(h_kj W_kj). Since W does not depend on the triplet, the
    sum over k is taken first, A[ji, l, :] = sum_k s[kj, ji, l] x[kj, :] (one sparse matrix
    product, `triplet_aggregate`), and W is applied once per edge: E x 8 x 128 x 128
    multiply-adds instead of PyG's T x 8 x 128 x 128 (T/E ~ 15 on QM9), and no per-triplet
    [T, 8, 128] or [T, 128] tensor in the forward or any backward pass.
    """

    def __init__(
        self,
        hidden_channels: int,
        num_bilinear: int,
        num_spherical: int,
        num_radial: int,
        num_before_skip: int,
        num_after_skip: int,
        act=swish,
    ):
        super().__init__()
        self.act = act
        self.lin_rbf = _dense(num_radial, hidden_channels, bias=False)
        self.lin_sbf = _dense(num_spherical * num_radial, num_bilinear, bias=False)
        self.lin_kj = _dense(hidden_channels, hidden_channels)
        self.lin_ji = _dense(hidden_channels, hidden_channels)
        self.W = nn.Parameter(torch.empty(hidden_channels, num_bilinear, hidden_channels))
        with torch.no_grad():
            self.W.normal_(mean=0.0, std=2.0 / hidden_channels)
        self.layers_before_skip = nn.ModuleList(
            [ResidualLayer(hidden_channels, act) for _ in range(num_before_skip)]
        )
        self.lin = _dense(hidden_channels, hidden_channels)
        self.layers_after_skip = nn.ModuleList(
            [ResidualLayer(hidden_channels, act) for _ in range(num_after_skip)]
        )

    def edge_inputs(self, x: Tensor, rbf: Tensor, sbf: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x_ji = act(h W_ji) [E, H], x_kj = e_RBF W_rbf (.) act(h W_kj) [E, H], and the triplet
        weights s = a_SBF W_sbf [T, L]: what the triplet sum needs."""
        x_ji = self.act(self.lin_ji(x))
        x_kj = self.act(self.lin_kj(x)) * _narrow_linear(rbf, self.lin_rbf.weight)
        return x_ji, x_kj, self.lin_sbf(sbf)

    def update(self, x: Tensor, x_ji: Tensor, aggregated: Tensor) -> Tensor:
        """m[ji, a] = x_ji[a] + sum_{l, b} A[ji, l, b] W[a, l, b] for A [E, L, H], then the
        residual stack."""
        hidden, num_bilinear = self.W.size(0), self.W.size(1)
        w = self.W.permute(1, 2, 0).reshape(num_bilinear * hidden, hidden)
        h = x_ji + aggregated.reshape(-1, num_bilinear * hidden) @ w
        return self.residual_stack(h, x)

    @torch.jit.unused
    def forward(self, x: Tensor, rbf: Tensor, sbf: Tensor, idx_kj: Tensor, idx_ji: Tensor, plan=None):
        """PyG's signature; `plan` (a TripletPlan of idx_kj, idx_ji, built when not given) is
        shared by blocks. (TorchScript: `edge_inputs`, a triplet sum, `update`.)"""
        if plan is None:
            plan = TripletPlan(idx_kj, idx_ji, x.size(0), self.W.size(1))
        x_ji, x_kj, s = self.edge_inputs(x, rbf, sbf)
        # A[ji, l, b] = sum_k s[kj, ji, l] x_kj[kj, b]: [E, L, H], one sparse product
        return self.update(x, x_ji, triplet_aggregate(plan, s, x_kj))


class InteractionPPBlock(_ResidualStack, nn.Module):
    """DimeNet++ interaction: the bilinear layer replaced by down-projection, a Hadamard product
    with the (two-layer) embedded SBF, and up-projection (Gasteiger et al. 2020b)."""

    def __init__(
        self,
        hidden_channels: int,
        int_emb_size: int,
        basis_emb_size: int,
        num_spherical: int,
        num_radial: int,
        num_before_skip: int,
        num_after_skip: int,
        act=swish,
    ):
        super().__init__()
        self.act = act
        self.lin_rbf1 = _dense(num_radial, basis_emb_size, bias=False)
        self.lin_rbf2 = _dense(basis_emb_size, hidden_channels, bias=False)
        self.lin_sbf1 = _dense(num_spherical * num_radial, basis_emb_size, bias=False)
        self.lin_sbf2 = _dense(basis_emb_size, int_emb_size, bias=False)
        self.lin_kj = _dense(hidden_channels, hidden_channels)
        self.lin_ji = _dense(hidden_channels, hidden_channels)
        self.lin_down = _dense(hidden_channels, int_emb_size, bias=False)
        self.lin_up = _dense(int_emb_size, hidden_channels, bias=False)
        self.layers_before_skip = nn.ModuleList(
            [ResidualLayer(hidden_channels, act) for _ in range(num_before_skip)]
        )
        self.lin = _dense(hidden_channels, hidden_channels)
        self.layers_after_skip = nn.ModuleList(
            [ResidualLayer(hidden_channels, act) for _ in range(num_after_skip)]
        )

    def edge_features(self, x: Tensor, rbf: Tensor) -> Tuple[Tensor, Tensor]:
        """x_ji = act(h W_ji) [E, H], x_kj = act((e_RBF W_rbf1 W_rbf2 (.) act(h W_kj)) W_down)
        [E, int_emb]."""
        hidden = self.lin_ji.out_features
        if torch.jit.is_scripting():
            x_ji, x_kj = self.act(self.lin_ji(x)), self.act(self.lin_kj(x))
        else:  # both layers as one [E, H] x [H, 2H] product and one activation (fewer, larger passes)
            x_ji, x_kj = self.act(torch.addmm(torch.cat([self.lin_ji.bias, self.lin_kj.bias]), x,
                                              torch.cat([self.lin_ji.weight, self.lin_kj.weight]).t())
                                  ).split(hidden, dim=1)
        rbf_embedded = _narrow_linear(_narrow_linear(rbf, self.lin_rbf1.weight), self.lin_rbf2.weight)
        return x_ji, self.act(self.lin_down(x_kj * rbf_embedded))

    def edge_inputs(self, x: Tensor, rbf: Tensor, sbf: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """`edge_features` and the triplet weights s = a_SBF W_sbf1 [T, basis_emb]."""
        x_ji, x_kj = self.edge_features(x, rbf)
        return x_ji, x_kj, self.lin_sbf1(sbf)

    def update(self, x: Tensor, x_ji: Tensor, aggregated: Tensor) -> Tensor:
        """The messages sum_b W_sbf2[c, b] A[ji, b, c] for A [E, basis_emb, int_emb] (the sum over
        k taken first, A = sum_k s[kj, ji, b] x_kj[kj, c]; PyG forms (s W_sbf2^T)[c] x_kj[kj, c]
        per triplet), up-projected, added to x_ji, then the residual stack."""
        messages = (aggregated * self.lin_sbf2.weight.t().unsqueeze(0)).sum(1)  # [E, int_emb]
        return self.residual_stack(x_ji + self.act(self.lin_up(messages)), x)

    @torch.jit.unused
    def forward(self, x: Tensor, rbf: Tensor, sbf: Tensor, idx_kj: Tensor, idx_ji: Tensor, plan=None):
        """PyG's signature; `plan` (a TripletPlan of idx_kj, idx_ji, built when not given) is
        shared by blocks. (TorchScript: `edge_inputs`, a triplet sum, `update`.)"""
        if plan is None:
            plan = TripletPlan(idx_kj, idx_ji, x.size(0), self.lin_sbf1.out_features)
        x_ji, x_kj, s = self.edge_inputs(x, rbf, sbf)
        return self.update(x, x_ji, triplet_aggregate(plan, s, x_kj))

    def sbf_per_edge(self, radial: Tensor) -> Tensor:
        """q[e, l, c] = sum_n radial[e, l, n] (W_sbf1^T W_sbf2^T)[(l, n), c]: [E, L, int_emb] from
        the SBF's radial part [E, L, R], in the layout the triplet contraction reads. Through the
        basis embedding (rank basis_emb): r[e, l, b] = sum_n radial[e, l, n] W_sbf1[b, (l, n)] (one
        product with W_sbf1 arranged block-diagonally, [L * R, L * basis_emb]), then r W_sbf2^T on
        the [E * L, basis_emb] rows: E L basis_emb (R + int_emb) multiply-adds, a fifth of those of
        the [L * R, L * int_emb] block-diagonal product of W_sbf1^T W_sbf2^T (whose blocks are 6/7
        zeros)."""
        num_edges, num_spherical, _ = radial.shape
        r = self.sbf_basis_embedding(radial)
        # a narrow-input layer (B = 8 inputs): W_sbf2's gradient as r^T @ grad (`_narrow_linear`)
        q = _narrow_linear(r.view(num_edges * num_spherical, -1), self.lin_sbf2.weight)  # [E * L, C]
        return q.view(num_edges, num_spherical, -1)

    def sbf_basis_embedding(self, radial: Tensor) -> Tensor:
        """r[e, l, b] = sum_n radial[e, l, n] W_sbf1[b, (l, n)]: [E, L, basis_emb] (`sbf_per_edge`)."""
        num_edges, num_spherical, num_radial = radial.shape
        w1 = self.lin_sbf1.weight.t().reshape(num_spherical, num_radial, -1)  # [L, R, B]
        r = radial.reshape(num_edges, num_spherical * num_radial) @ torch.block_diag(*w1.unbind(0))
        return r.view(num_edges, num_spherical, -1)

    @torch.jit.unused
    def factored(self, x: Tensor, rbf: Tensor, radial: Tensor, angular: Tensor, plan: TripletPlan) -> Tensor:
        """`forward` with the SBF in its factored form a[t, (l, n)] = radial[kj(t), l, n]
        angular[t, l] (what `DimezblNet` uses; radial [E, L, R], angular [T, L]). The messages of PyG's DimeNet++,

            m[ji, c] = sum_k x_kj[kj, c] sum_b W_sbf2[c, b] sum_(l,n) W_sbf1[b, (l, n)] a[t, (l, n)],

        regrouped as sum_k sum_l angular[t, l] (x_kj[kj, c] q[kj, l, c]): the SBF layers act per
        edge (no [T, 42] basis and no [T, 8] or [T, 64] weights), and the triplet sum is one
        sparse product with L = 7 weights per triplet (`triplet_contract`, plan from
        `TripletPlan.transposed`), giving [E, int_emb] directly."""
        x_ji, x_kj = self.edge_features(x, rbf)
        weight = self.lin_sbf2.weight
        # energies only (the geometry, hence radial, without grad): one fused pass each way, q never
        # stored; with forces (a second backward in force training) q is kept, cheaper to differentiate
        if (CompiledKernels.active_for(x_kj) and not radial.requires_grad and weight.size(0) <= 512
                and weight.size(1) <= 16 and radial.dtype == x_kj.dtype == weight.dtype):
            g = _SbfMessages.apply(self.sbf_basis_embedding(radial), weight, x_kj)  # [E, L, C]
        else:
            g = _EdgeMessages.apply(self.sbf_per_edge(radial), x_kj)
        return self.residual_stack(x_ji + self.act(self.lin_up(triplet_contract(plan, angular, g))), x)


class OutputBlock(nn.Module):
    """Output block (Sec. 3.4): H_i = sum_j (e_RBF W) (.) h_ji, then dense layers to v_i^(l)."""

    def __init__(
        self,
        num_radial: int,
        hidden_channels: int,
        out_channels: int,
        num_layers: int,
        act=swish,
        output_initializer: str = "zeros",
        out_emb_channels: Optional[int] = None,
    ):
        super().__init__()
        self.act = act
        self.lin_rbf = _dense(num_radial, hidden_channels, bias=False)
        width = hidden_channels
        if out_emb_channels is not None:  # DimeNet++: up-projection before the dense layers
            self.lin_up = _dense(hidden_channels, out_emb_channels, bias=False)
            width = out_emb_channels
        self.lins = nn.ModuleList([_dense(width, width) for _ in range(num_layers)])
        self.lin = nn.Linear(width, out_channels, bias=False)
        if output_initializer == "zeros":
            nn.init.zeros_(self.lin.weight)
        elif output_initializer == "glorot_orthogonal":
            glorot_orthogonal_(self.lin.weight)
        else:
            raise ValueError(
                f"unknown output_initializer {output_initializer!r}: use 'zeros' or "
                "'glorot_orthogonal'"
            )

    def forward(self, x: Tensor, rbf: Tensor, i: Tensor, num_nodes: int) -> Tensor:
        x = scatter_sum(_narrow_linear(rbf, self.lin_rbf.weight) * x, i, num_nodes)  # [N, H]
        if hasattr(self, "lin_up"):
            x = self.lin_up(x)
        for lin in self.lins:
            x = self.act(lin(x))
        return self.lin(x)  # [N, out_channels]


# =============================================================================================
# --- DimezblNet: DimeNet + ZBL (Sec. 3.4, Eq. 11) ---
# =============================================================================================

VARIANTS = ("dimenet", "dimenet++")


class DimezblNet(nn.Module):
    """DimeNet (or DimeNet++) whose atomic outputs get the ZBL pair repulsion added (Sec. 3.4):
    V = sum_i (sum_l v_i^(l) + v_zbl,i). `zbl=False` is the plain DimeNet baseline.

    ZBL recipes: `zbl_reach` says how far the pair term reaches (`ZBL`); `zbl_combine="add"` is the
    paper's sum, `zbl_combine="interpolate"` DeePMD-kit's DP+ZBL blend v_i = (1 - w_i) sum_l v_i^(l) +
    w_i v_zbl,i with w_i = 1 below `zbl_switch_inner_a` and 0 beyond `zbl_switch_outer_a` (Angstrom;
    `zbl_interpolation_weights`): pure ZBL for compressed atoms, the plain network at bonding distances.

    Defaults are DimeNet's (DESIGN.md section 2): 128 channels, 6 blocks (4 for DimeNet++),
    8 bilinear, 7 spherical, 6 radial, cutoff 5 A, envelope exponent 5, 1/2 residual layers
    before/after the skip, 3 output layers, swish, zero-initialised final output layer.

    Quirks of the original kept so that weights are interchangeable with PyG's `DimeNet`: the
    angle of triplet k->j->i is taken between R_j - R_i and R_k - R_i (DimeNet++: between
    R_i - R_j and R_j - R_k); the SBF uses d_kj and is multiplied by the envelope.
    The angle enters only through cos(alpha) (Y_l^0 is a polynomial in it), computed from dot
    products, which is smooth also for collinear atoms where atan2 of a cross-product norm is not.

    Inputs: z int64 [N] (1..94), pos [N, 3] in Angstrom, batch int64 [N] sorted (molecule index
    of each atom; None for one molecule). Energies are in the unit of the training target;
    `zbl_unit` must be that unit.
    """

    def __init__(
        self,
        hidden_channels: int = 128,
        out_channels: int = 1,
        num_blocks: Optional[int] = None,
        num_bilinear: int = 8,
        num_spherical: int = 7,
        num_radial: int = 6,
        cutoff: float = 5.0,
        envelope_exponent: int = 5,
        num_before_skip: int = 1,
        num_after_skip: int = 2,
        num_output_layers: int = 3,
        variant: str = "dimenet",
        int_emb_size: int = 64,
        basis_emb_size: int = 8,
        out_emb_channels: int = 256,
        output_initializer: str = "zeros",
        zbl: bool = True,
        zbl_unit: str = "eV",
        zbl_reach: str = "cutoff",
        zbl_inner_a: float = 0.5,
        zbl_outer_a: float = 1.0,
        zbl_learnable_scale: bool = False,
        zbl_combine: str = "add",
        zbl_switch_inner_a: float = 0.4,
        zbl_switch_outer_a: float = 0.7,
        zbl_covalent_factor: float = 1.0,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}: use one of {VARIANTS}")
        if num_spherical < 2:
            raise ValueError("num_spherical must be at least 2")
        if num_blocks is None:
            num_blocks = 6 if variant == "dimenet" else 4
        self.hparams = dict(
            hidden_channels=hidden_channels, out_channels=out_channels, num_blocks=num_blocks,
            num_bilinear=num_bilinear, num_spherical=num_spherical, num_radial=num_radial,
            cutoff=cutoff, envelope_exponent=envelope_exponent, num_before_skip=num_before_skip,
            num_after_skip=num_after_skip, num_output_layers=num_output_layers, variant=variant,
            int_emb_size=int_emb_size, basis_emb_size=basis_emb_size,
            out_emb_channels=out_emb_channels, output_initializer=output_initializer, zbl=zbl,
            zbl_unit=zbl_unit, zbl_reach=zbl_reach, zbl_inner_a=zbl_inner_a,
            zbl_outer_a=zbl_outer_a, zbl_learnable_scale=zbl_learnable_scale, zbl_combine=zbl_combine,
            zbl_switch_inner_a=zbl_switch_inner_a, zbl_switch_outer_a=zbl_switch_outer_a,
            zbl_covalent_factor=zbl_covalent_factor,
        )  # fmt: skip
        self.cutoff, self.variant, self.out_channels = cutoff, variant, out_channels
        # weights per triplet of the sparse triplet sum: DimeNet's bilinear weights s = a_SBF W_sbf,
        # DimeNet++'s angular part of the SBF (InteractionPPBlock.factored)
        self.triplet_weights = num_spherical if variant == "dimenet++" else num_bilinear
        act = swish  # F.silu with analytic derivatives
        self.rbf = BesselBasisLayer(num_radial, cutoff, envelope_exponent)
        self.sbf = SphericalBasisLayer(num_spherical, num_radial, cutoff, envelope_exponent)
        self.emb = EmbeddingBlock(num_radial, hidden_channels, act)
        plus = variant == "dimenet++"
        self.output_blocks = nn.ModuleList(
            [
                OutputBlock(
                    num_radial, hidden_channels, out_channels, num_output_layers, act,
                    output_initializer, out_emb_channels if plus else None,
                )  # fmt: skip
                for _ in range(num_blocks + 1)
            ]
        )
        if plus:
            blocks = [
                InteractionPPBlock(
                    hidden_channels, int_emb_size, basis_emb_size, num_spherical, num_radial,
                    num_before_skip, num_after_skip, act,
                )  # fmt: skip
                for _ in range(num_blocks)
            ]
        else:
            blocks = [
                InteractionBlock(
                    hidden_channels, num_bilinear, num_spherical, num_radial, num_before_skip,
                    num_after_skip, act,
                )  # fmt: skip
                for _ in range(num_blocks)
            ]
        self.interaction_blocks = nn.ModuleList(blocks)
        self.zbl = (
            ZBL(zbl_unit, zbl_reach, cutoff, zbl_inner_a, zbl_outer_a, learnable_scale=zbl_learnable_scale,
                combine=zbl_combine, switch_inner_a=zbl_switch_inner_a, switch_outer_a=zbl_switch_outer_a,
                covalent_factor=zbl_covalent_factor)
            if zbl else None
        )  # fmt: skip

    # --- input checks: bad input is an error that names the problem, never a silent NaN ---
    def _check_inputs(self, z: Tensor, pos: Tensor, batch: Optional[Tensor]):
        if not torch.is_tensor(z) or z.dtype.is_floating_point or z.dtype == torch.bool:
            raise TypeError("z must be an integer tensor of atomic numbers (torch.long)")
        if not torch.is_tensor(pos) or not pos.dtype.is_floating_point:
            raise TypeError("pos must be a floating point tensor of positions in Angstrom")
        if z.dim() != 1:
            raise ValueError(f"z must have shape [num_atoms], got shape {tuple(z.shape)}")
        if z.numel() == 0:
            raise ValueError("empty input: a molecule needs at least one atom")
        if pos.shape != (z.numel(), 3):
            raise ValueError(
                f"pos must have shape [num_atoms, 3] = [{z.numel()}, 3] to match z, got shape "
                f"{tuple(pos.shape)}"
            )
        bad = ((z < 1) | (z > MAX_ATOMIC_NUMBER)).nonzero()
        if bad.numel():
            index = int(bad[0])
            raise ValueError(
                f"atomic number {int(z[index])} at index {index} is not supported: the embedding "
                f"covers Z = 1..{MAX_ATOMIC_NUMBER}"
            )
        bad = (~torch.isfinite(pos)).any(dim=1).nonzero()
        if bad.numel():
            raise ValueError(
                f"pos of atom {int(bad[0])} is not finite (NaN or inf): {pos[bad[0]].tolist()}"
            )
        if batch is None:
            return z.long(), torch.zeros_like(z, dtype=torch.long), 1
        if not torch.is_tensor(batch) or batch.dtype.is_floating_point:
            raise TypeError("batch must be an integer tensor (molecule index of each atom)")
        if batch.shape != z.shape:
            raise ValueError(
                f"batch must have shape [num_atoms] = [{z.numel()}], got {tuple(batch.shape)}"
            )
        batch = batch.long()
        if batch[0] < 0 or (batch[1:] < batch[:-1]).any():
            raise ValueError(
                "batch must be non-negative and sorted (atoms of each molecule contiguous, as in "
                "PyG's Batch); sort the atoms by molecule"
            )
        num_molecules = int(batch[-1]) + 1
        empty = (torch.bincount(batch, minlength=num_molecules) == 0).nonzero()
        if empty.numel():
            raise ValueError(f"molecule {int(empty[0])} of the batch is empty (has no atoms)")
        return z.long(), batch, num_molecules

    @staticmethod
    def _check_distances(dist: Tensor, edge_index: Tensor):
        close = (dist < MIN_PAIR_DISTANCE_A).nonzero()
        if close.numel():
            e = int(close[0])
            raise ValueError(
                f"coincident atoms {int(edge_index[1, e])} and {int(edge_index[0, e])}: distance "
                f"{float(dist[e]):.3g} A < {MIN_PAIR_DISTANCE_A} A"
            )

    def _geometry_parts(self, pos, i, j, idx_i, idx_k, idx_kj, idx_ji):
        """(dist [E], cos_angle [T], vec [E, 3], a, b [T, 3], |a|, |b| [T]): edge lengths (Angstrom)
        and triplet angle cosines with the vectors they come from; vec = R_i - R_j for edge j->i,
        cos_angle = a.b / (|a| |b|)."""
        # gathers by index_select: their backward is index_add_, advanced indexing's an
        # accumulating index_put, several times slower ([T, 3] into [E, 3]: 3 ms on QM9)
        vec = pos.index_select(0, i) - pos.index_select(0, j)
        dist = vec.norm(dim=-1)
        a, norm_a = vec.index_select(0, idx_ji), dist.index_select(0, idx_ji)
        if self.variant == "dimenet":  # angle between R_j - R_i and R_k - R_i: a = R_i - R_j, b = R_i - R_k
            b = pos.index_select(0, idx_i) - pos.index_select(0, idx_k)
            norm_b = b.norm(dim=-1)
        else:  # DimeNet++: angle between R_i - R_j and R_j - R_k
            b, norm_b = vec.index_select(0, idx_kj), dist.index_select(0, idx_kj)
        cos_angle = (a * b).sum(-1) / (norm_a * norm_b)
        return dist, cos_angle, vec, a, b, norm_a, norm_b

    def _geometry(self, pos, i, j, idx_i, idx_k, idx_kj, idx_ji) -> Tuple[Tensor, Tensor]:
        """Edge lengths [E] (Angstrom) and the cosines of the triplet angles [T]."""
        return self._geometry_parts(pos, i, j, idx_i, idx_k, idx_kj, idx_ji)[:2]

    def _geometry_first_order(self, pos, i, j, idx_i, idx_k, idx_kj, idx_ji) -> Tuple[Tensor, Tensor]:
        """`_geometry` as its values at the detached positions plus their first-order change in
        pos - pos.detach() (zero in value): exact first derivatives in pos, none higher (see
        `first_order`)."""
        with torch.no_grad():
            dist0, cos0, vec, a, b, norm_a, norm_b = self._geometry_parts(pos.detach(), i, j, idx_i, idx_k,
                                                                          idx_kj, idx_ji)
            # d cos(a, b) / da = b / (|a| |b|) - cos a / |a|^2, and the same with a and b swapped
            grad_a = b / (norm_a * norm_b)[:, None] - (cos0 / norm_a**2)[:, None] * a
            grad_b = a / (norm_a * norm_b)[:, None] - (cos0 / norm_b**2)[:, None] * b
            unit = vec / dist0[:, None]
        delta = pos - pos.detach()  # zero, with pos's graph
        delta_vec = delta.index_select(0, i) - delta.index_select(0, j)
        delta_b = (delta.index_select(0, idx_i) - delta.index_select(0, idx_k) if self.variant == "dimenet"
                   else delta_vec.index_select(0, idx_kj))
        dist = dist0 + (unit * delta_vec).sum(-1)
        cos_angle = cos0 + (grad_a * delta_vec.index_select(0, idx_ji)).sum(-1) + (grad_b * delta_b).sum(-1)
        return dist, cos_angle

    def atomic_outputs(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None,
                       pos_first_order: bool = False):
        """Per-atom outputs sum_l v_i^(l) + v_zbl,i [N, out_channels] and the checked batch.

        pos_first_order: the bases and ZBL are linearised in the distances and angles
        (`first_order`): values and first derivatives in pos exact, second and higher derivatives
        in pos dropped, derivatives in the weights exact. Only for force training with a pos
        leaf nobody differentiates twice (`energy_and_forces` decides); never for Hessians."""
        z, batch, num_molecules = self._check_inputs(z, pos, batch)
        pos = pos.to(self.rbf.freq.dtype)
        num_atoms = z.numel()
        with torch.no_grad():
            edge_index = radius_graph(pos.detach(), batch, self.cutoff)
            i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji = triplets(edge_index, num_atoms)
        geometry = self._geometry_first_order if pos_first_order else self._geometry
        dist, cos_angle = geometry(pos, i, j, idx_i, idx_k, idx_kj, idx_ji)
        self._check_distances(dist.detach(), edge_index)
        if pos_first_order:
            rbf = first_order(self.rbf, dist)
            radial, angular = first_order(self.sbf.radial, dist), first_order(self.sbf.angular, cos_angle)
        else:
            rbf = self.rbf(dist)  # [E, num_radial]
            radial, angular = self.sbf.radial(dist), self.sbf.angular(cos_angle)  # [E, L, R], [T, L]
        x = self.emb(z, rbf, i, j)  # [E, H]
        plus = self.variant == "dimenet++"  # DimeNet++ keeps the SBF factored (InteractionPPBlock.factored)
        with torch.no_grad():  # the sparse layout of the triplet sums, shared by all blocks
            plan = (TripletPlan.transposed if plus else TripletPlan)(idx_kj, idx_ji, dist.numel(),
                                                                     self.triplet_weights)
            if plus:
                plan.share_values(angular)  # the triplet weights of every block
        sbf = None if plus else self.sbf.combine(radial, angular, idx_kj)  # [T, L * R]
        out = self.output_blocks[0](x, rbf, i, num_atoms)
        for interaction, output in zip(self.interaction_blocks, self.output_blocks[1:]):
            if plus:
                x = interaction.factored(x, rbf, radial, angular, plan)
            else:
                x = interaction(x, rbf, sbf, idx_kj, idx_ji, plan)
            out = out + output(x, rbf, i, num_atoms)
        if self.zbl is not None:  # Sec. 3.4's sum, or DeePMD-kit's blend (ZBL.combine)
            out = self.zbl.combine(out, z, edge_index, dist, pos_first_order)
        return out, batch, num_molecules

    def atomic_energies(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        """Per-atom energies [N] (out_channels = 1) or outputs [N, C]."""
        out = self.atomic_outputs(z, pos, batch)[0]
        return out.squeeze(-1) if self.out_channels == 1 else out

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None,
                pos_first_order: bool = False) -> Tensor:
        """Energy per molecule [B] (out_channels = 1) or outputs [B, C]. `pos_first_order`:
        see `atomic_outputs` (for force training loops, as `energy_and_forces` uses it)."""
        out, batch, num_molecules = self.atomic_outputs(z, pos, batch, pos_first_order)
        total = scatter_sum(out, batch, num_molecules)
        return total.squeeze(-1) if self.out_channels == 1 else total

    def energy_and_forces(
        self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None, create_graph: bool = False
    ) -> Tuple[Tensor, Tensor]:
        """(energies [B], forces [N, 3] = -dE/dR, Eq. 11). `create_graph=True` for force
        training (a loss on the forces can then be back-propagated to the weights).

        When `pos` does not require grad, the positions are differentiated through a leaf of our
        own that no caller can reach, so with create_graph the bases are linearised in the
        geometry (`pos_first_order`): the forces and every derivative of them in the weights are
        exact, and a loss's backward skips the second derivatives in that leaf that would be
        computed and thrown away. A `pos` that requires grad (e.g. for a Hessian) keeps every
        order exact."""
        if self.out_channels != 1:
            raise ValueError("forces need a scalar energy model (out_channels = 1)")
        return _module_energy_and_forces(self, z, pos, batch, create_graph)


def _module_energy_and_forces(module, z: Tensor, pos: Tensor, batch: Optional[Tensor], create_graph: bool):
    """`DimezblNet.energy_and_forces` through `module`'s forward (a DimezblNet, or one wrapped by DDP,
    which must be called through its forward)."""
    own_leaf = not pos.requires_grad
    if own_leaf:
        pos = pos.detach().requires_grad_(True)
    energy = module(z, pos, batch, pos_first_order=own_leaf and create_graph)
    (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    return energy, -grad


def load_pyg_dimenet_state_dict(model: DimezblNet, state_dict: dict) -> DimezblNet:
    """Load the state dict of a PyG `DimeNet` / `DimeNetPlusPlus` into the DimeNet part of
    `model` (same hyperparameters; variant "dimenet" / "dimenet++"). The ZBL part is untouched.
    Parameter names and shapes are PyG's, so this is a checked `load_state_dict`."""
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("zbl.")}
    missing = sorted(set(ours) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(ours))
    if missing or unexpected:
        plus_keys = any(".lin_down." in k for k in state_dict)
        hint = (
            f"the state dict looks like {'DimeNetPlusPlus' if plus_keys else 'DimeNet'}; build "
            f"DimezblNet(variant={'dimenet++' if plus_keys else 'dimenet'!r}, ...) with the same "
            "hyperparameters (num_blocks, num_output_layers, residual layers)"
        )
        raise ValueError(
            f"PyG state dict does not match the model: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}; {hint}"
        )
    for key, value in state_dict.items():
        if ours[key].shape != value.shape:
            raise ValueError(
                f"shape of {key}: PyG {tuple(value.shape)} vs model {tuple(ours[key].shape)}; "
                "use the same hidden_channels, num_bilinear, num_spherical, num_radial"
            )
    result = model.load_state_dict(state_dict, strict=False)
    assert not result.unexpected_keys and all(k.startswith("zbl.") for k in result.missing_keys)
    return model



# =============================================================================================
# --- Data: QM9 (qm9pack), MD17 (readers and the GFN2-xTB generator), splits ---
# =============================================================================================
# QM9 is stored in training units (D, bohr^3, eV, bohr^2, cal/(mol K)), MD17 in kcal/mol and
# kcal/mol/Angstrom; positions always in Angstrom.

LOG = logging.getLogger("dimezbl.data")


# --- Units and constants -------------------------------------------------------------------------

EV_TO_MEV = 1000.0

QM9_TARGETS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "cv")

# Training units: DESIGN.md section 2 (models train in eV; U0, U, H, G are atomization energies).
QM9_TRAINING_UNITS = {
    "mu": "D", "alpha": "bohr^3", "homo": "eV", "lumo": "eV", "gap": "eV", "r2": "bohr^2",
    "zpve": "eV", "U0": "eV", "U": "eV", "H": "eV", "G": "eV", "cv": "cal/(mol K)",
}
# Reporting units: Table 1 of the paper (energy-like MAEs in meV).
QM9_REPORTING_UNITS = {
    target: ("meV" if unit == "eV" else unit) for target, unit in QM9_TRAINING_UNITS.items()
}
_QM9_TRAINING_TO_REPORTING = {
    target: (EV_TO_MEV if unit == "eV" else 1.0) for target, unit in QM9_TRAINING_UNITS.items()
}


def qm9_to_reporting_units(values, target: str):
    """Convert ``values`` of QM9 ``target`` from training units to Table 1's reporting units.

    eV -> meV for homo, lumo, gap, zpve, U0, U, H, G; mu (D), alpha (bohr^3), r2 (bohr^2) and
    cv (cal/(mol K)) are unchanged. Works on floats, numpy arrays and torch tensors.
    """
    if target not in _QM9_TRAINING_TO_REPORTING:
        raise ValueError(f"unknown QM9 target {target!r}: choose one of {', '.join(QM9_TARGETS)}")
    return values * _QM9_TRAINING_TO_REPORTING[target]


# QM9 atomic reference energies, in Hartree, per property: the "atomref" table of the QM9 record
# (Ramakrishnan, Dral, Rupp, von Lilienfeld, Sci. Data 1, 140022 (2014), file atomref.txt;
# B3LYP/6-31G(2df,p) energies of the free atoms). Columns: U0 (0 K), U (298.15 K), H (298.15 K),
# G (298.15 K). PyG's torch_geometric.datasets.qm9.atomrefs holds the same numbers times 27.211386246.
QM9_ATOMREF_HARTREE = {
    #     U0           U            H            G
    1: (-0.500273, -0.498857, -0.497912, -0.510927),     # H
    6: (-37.846772, -37.845355, -37.844411, -37.861317),  # C
    7: (-54.583861, -54.582445, -54.581501, -54.598897),  # N
    8: (-75.064579, -75.063163, -75.062219, -75.079532),  # O
    9: (-99.718730, -99.717314, -99.716370, -99.733544),  # F
}
_QM9_ATOMIZATION_TARGETS = ("U0", "U", "H", "G")  # the column order of QM9_ATOMREF_HARTREE

# qm9pack column holding each target, and the factor from that column's unit to the training unit.
# ("Enthalphy" is qm9pack's spelling.)
QM9_CSV_COLUMNS = {
    "mu": ("Dipole_debye", 1.0),                          # D
    "alpha": ("Polarizability_bohr3", 1.0),               # bohr^3
    "homo": ("HOMO_au", HARTREE_TO_EV),                   # Hartree -> eV
    "lumo": ("LUMO_au", HARTREE_TO_EV),                   # Hartree -> eV
    "gap": ("HOMO_LUMO_gap_au", HARTREE_TO_EV),           # Hartree -> eV
    "r2": ("R2_bohr2", 1.0),                              # bohr^2
    "zpve": ("ZPVE_au", HARTREE_TO_EV),                   # Hartree -> eV
    "U0": ("InternalEnergy_0K_au", HARTREE_TO_EV),        # Hartree -> eV (after atomref subtraction)
    "U": ("InternalEnergy_298K_au", HARTREE_TO_EV),
    "H": ("Enthalphy_298K_au", HARTREE_TO_EV),
    "G": ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV),
    "cv": ("Heatcapacity_Cv_cal_mol_K", 1.0),             # cal/(mol K)
}

QM9_NUM_MOLECULES = 130_831  # QM9 without the 3,054 molecules that failed the consistency check
QM9_CSV_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
QM9_POLARIZABILITY_FILE = "qm9_polarizability.csv"
QM9_CACHE_FORMAT_VERSION = 1
QM9_CACHE_FILE = f"qm9_v{QM9_CACHE_FORMAT_VERSION}.pt"
QM9_SPLIT_SIZES = (110_000, 10_000)  # train, validation; the rest (10,831) is test (DimeNet)

_SETUP_HINT = "run `make setup` (or `pip install qm9pack==1.0.3` in the project's venv)"


# --- Shared file helpers -------------------------------------------------------------------------

def data_dir_path(data_dir=None) -> Path:
    """The data directory: ``data_dir``, else $DIMEZBL_DATA_DIR, else ``<repository>/data``."""
    if data_dir is not None:
        return Path(data_dir)
    env = os.environ.get("DIMEZBL_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "data"


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same folder and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _atomic_write_json(path: Path, obj) -> None:
    _atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _sha256(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


# --- QM9 source and parsing ----------------------------------------------------------------------

def qm9_source_files() -> dict[str, Path]:
    """Paths of qm9pack's CSV files, found without importing qm9pack (it needs pkg_resources)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the QM9 source package qm9pack is not installed: {_SETUP_HINT}")
    data_folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    files = {name: data_folder / name for name in (*QM9_CSV_FILES, QM9_POLARIZABILITY_FILE)}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(
            f"qm9pack is installed but its data files are missing: {', '.join(missing)}; "
            f"reinstall it: {_SETUP_HINT}")
    return files


def _qm9_source_fingerprint(files: dict[str, Path]) -> dict[str, int]:
    """File name -> size in bytes; a changed qm9pack makes the cache stale."""
    return {name: path.stat().st_size for name, path in sorted(files.items())}


# Atomic number of each element symbol byte; QM9 holds only H, C, N, O, F.
_ELEMENT_BYTE_TO_Z = np.zeros(256, dtype=np.uint8)
for _symbol, _z in (("H", 1), ("C", 6), ("N", 7), ("O", 8), ("F", 9)):
    _ELEMENT_BYTE_TO_Z[ord(_symbol)] = _z


def parse_qm9_csv(files: dict[str, Path]) -> dict[str, np.ndarray]:
    """Parse qm9pack's CSVs in bulk.

    Returns numpy arrays: ``z`` uint8 [A], ``pos`` float32 [A, 3] in Angstrom, ``ptr`` int64 [M + 1]
    (molecule i owns atoms ptr[i]:ptr[i+1]), ``y`` float32 [M, 12] in training units (QM9_TARGETS
    order), ``gdb_id`` int64 [M] (the QM9 index, 1..133885).
    """
    value_columns = [column for column, _ in QM9_CSV_COLUMNS.values()]
    usecols = ["XYZ_file", "Index", "N_atoms", "Elements", "XYZ_Ang", *value_columns]
    frame = pd.concat(
        [pd.read_csv(files[name], usecols=usecols) for name in QM9_CSV_FILES], ignore_index=True)
    n_molecules = len(frame)
    if n_molecules != QM9_NUM_MOLECULES:
        raise ValueError(
            f"qm9pack holds {n_molecules} molecules, expected {QM9_NUM_MOLECULES}: "
            f"the DimeNet split needs the full set; {_SETUP_HINT}")
    gdb_id = frame["Index"].to_numpy(np.int64, copy=True)  # writable (pandas copy-on-write)
    if not np.all(np.diff(gdb_id) > 0):
        raise ValueError("qm9pack rows are not sorted by QM9 index: the split would not match DimeNet's")

    n_atoms = frame["N_atoms"].to_numpy(np.int64)
    ptr = np.zeros(n_molecules + 1, dtype=np.int64)
    np.cumsum(n_atoms, out=ptr[1:])
    total_atoms = int(ptr[-1])

    # Elements: "['C','H','H']" -> one byte per atom after deleting brackets, quotes and commas.
    element_bytes = "".join(frame["Elements"].tolist()).encode("ascii").translate(None, b"[]', ")
    z = _ELEMENT_BYTE_TO_Z[np.frombuffer(element_bytes, dtype=np.uint8)]
    if z.size != total_atoms or not z.all():
        raise ValueError(
            f"qm9pack Elements column parsed to {z.size} atoms ({int((z == 0).sum())} unknown symbols), "
            f"N_atoms sums to {total_atoms}: the CSV is damaged; {_SETUP_HINT}")

    # Coordinates: "[[x,y,z],[x,y,z]]" -> one comma-separated list of floats for the whole data set.
    coordinate_text = ",".join(frame["XYZ_Ang"].tolist()).translate(str.maketrans("", "", "[]"))
    pos = np.fromstring(coordinate_text, dtype=np.float64, sep=",")
    if pos.size != 3 * total_atoms or not np.isfinite(pos).all():
        raise ValueError(
            f"qm9pack XYZ_Ang column parsed to {pos.size} numbers, expected 3 * {total_atoms}: "
            f"the CSV is damaged; {_SETUP_HINT}")
    pos = pos.reshape(total_atoms, 3)

    # Targets, in float64 until the atomization energies are formed (|U0| reaches hundreds of Hartree).
    raw = np.stack([frame[column].to_numpy(np.float64) for column, _ in QM9_CSV_COLUMNS.values()], axis=1)
    atomref_table = np.zeros((256, len(_QM9_ATOMIZATION_TARGETS)))
    for atomic_number, refs in QM9_ATOMREF_HARTREE.items():
        atomref_table[atomic_number] = refs
    atomref_per_molecule = np.add.reduceat(atomref_table[z], ptr[:-1], axis=0)  # [M, 4] Hartree
    for column, target in enumerate(_QM9_ATOMIZATION_TARGETS):
        raw[:, QM9_TARGETS.index(target)] -= atomref_per_molecule[:, column]
    factors = np.array([factor for _, factor in QM9_CSV_COLUMNS.values()])
    y = raw * factors

    _check_qm9_polarizability(files[QM9_POLARIZABILITY_FILE], frame)
    return {"z": z, "pos": pos.astype(np.float32), "ptr": ptr, "y": y.astype(np.float32),
            "gdb_id": gdb_id}


QM9_ALPHA_TOLERANCE_BOHR3 = 0.01  # the CSV rounds alpha to 0.01 bohr^3, the tensor to 0.001


def _check_qm9_polarizability(path: Path, frame: pd.DataFrame) -> None:
    """Check the alpha column against the trace/3 of qm9pack's polarizability tensors (bohr^3)."""
    tensor = pd.read_csv(path, usecols=["XYZ_file", "A_xx", "A_yy", "A_zz"])
    if len(tensor) != len(frame) or not (tensor["XYZ_file"].to_numpy() == frame["XYZ_file"].to_numpy()).all():
        raise ValueError(f"{path} does not list the same molecules as the QM9 CSVs; {_SETUP_HINT}")
    isotropic = tensor[["A_xx", "A_yy", "A_zz"]].to_numpy().mean(axis=1)
    deviation = np.abs(isotropic - frame["Polarizability_bohr3"].to_numpy())
    if deviation.max() > QM9_ALPHA_TOLERANCE_BOHR3:
        worst = int(deviation.argmax())
        raise ValueError(
            f"QM9 alpha of {frame['XYZ_file'].iloc[worst]} differs from its polarizability tensor "
            f"by {deviation[worst]:.4f} bohr^3: the CSV is damaged; {_SETUP_HINT}")


# --- QM9 cache -----------------------------------------------------------------------------------

def _qm9_cache_paths(data_dir) -> tuple[Path, Path]:
    cache = data_dir_path(data_dir) / QM9_CACHE_FILE
    return cache, cache.with_suffix(".json")


def _write_qm9_cache(arrays: dict[str, np.ndarray], data_dir, fingerprint: dict[str, int]) -> None:
    """torch.save the arrays into one file (atomically), then its sidecar (version, size, sha256)."""
    cache_path, sidecar_path = _qm9_cache_paths(data_dir)
    buffer = io.BytesIO()
    torch.save({key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}, buffer)
    payload = buffer.getvalue()
    _atomic_write_bytes(cache_path, payload)
    _atomic_write_json(sidecar_path, {
        "format_version": QM9_CACHE_FORMAT_VERSION, "sha256": _sha256(payload), "size_bytes": len(payload),
        "source_sizes_bytes": fingerprint, "num_molecules": int(arrays["ptr"].size - 1),
    })


def _read_qm9_cache(data_dir, fingerprint: dict[str, int] | None) -> tuple[dict[str, torch.Tensor] | None, str]:
    """The cached tensors, or (None, why the cache cannot be used). ``fingerprint`` None (qm9pack
    absent): the cache's own checks (version, size, sha256, shapes) only, not staleness."""
    cache_path, sidecar_path = _qm9_cache_paths(data_dir)
    if not cache_path.exists():
        return None, f"no cache at {cache_path}"
    try:
        sidecar = json.loads(sidecar_path.read_text())
        expected_sha, expected_size = sidecar["sha256"], sidecar["size_bytes"]
        version, sources = sidecar["format_version"], sidecar["source_sizes_bytes"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return None, f"its sidecar {sidecar_path} is missing or unreadable ({error})"
    if version != QM9_CACHE_FORMAT_VERSION:
        return None, f"it has format version {version}, this code writes {QM9_CACHE_FORMAT_VERSION}"
    if fingerprint is not None and sources != fingerprint:
        return None, f"the qm9pack CSV sizes changed ({sources} -> {fingerprint})"
    payload = cache_path.read_bytes()
    if len(payload) != expected_size:
        return None, f"it is {len(payload)} bytes, {expected_size} were written (truncated?)"
    if _sha256(payload) != expected_sha:
        return None, "its sha256 does not match the one recorded when it was written (corrupt)"
    try:
        tensors = torch.load(io.BytesIO(payload), weights_only=True)
        ptr = tensors["ptr"]
        consistent = (ptr.numel() == QM9_NUM_MOLECULES + 1 and int(ptr[-1]) == tensors["z"].shape[0]
                      == tensors["pos"].shape[0] and tensors["y"].shape == (QM9_NUM_MOLECULES, len(QM9_TARGETS)))
    except Exception as error:  # noqa: BLE001 - any unreadable cache is rebuilt, with the reason
        return None, f"torch.load failed ({type(error).__name__}: {str(error)[:200]})"
    if not consistent:
        return None, "its tensors have inconsistent shapes"
    return tensors, ""


# --- QM9 dataset and splits ----------------------------------------------------------------------

class IndexedDataset(torch.utils.data.Dataset):
    """Rows of data held in a few big tensors. ``dataset[i]`` builds one PyG ``Data``; an index array,
    boolean mask, list, tensor or slice gives a view dataset of those rows (no copy of the tensors)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.dim() == 0):
            position = int(index)
            if not -len(self) <= position < len(self):
                raise IndexError(f"index {position} is out of range for {self!r}")
            return self._item(int(self.rows[position]))
        if isinstance(index, slice):
            return self._view(self.rows[index])
        positions = torch.as_tensor(np.asarray(index))
        if positions.dtype == torch.bool:
            if positions.shape != self.rows.shape:
                raise IndexError(f"boolean mask of shape {tuple(positions.shape)} for {self!r}")
            return self._view(self.rows[positions])
        positions = positions.long()
        if positions.numel() and not (-len(self) <= int(positions.min()) and int(positions.max()) < len(self)):
            raise IndexError(f"index array reaches outside 0..{len(self) - 1} of {self!r}")
        return self._view(self.rows[positions])

    def _item(self, row: int) -> Data:
        raise NotImplementedError

    def _content(self) -> dict[str, torch.Tensor]:
        """The tensors that hold the whole data set (every row, not only this view's)."""
        raise NotImplementedError

    def content_sha256(self) -> str:
        """sha256 of the whole data set's values (names, dtypes, shapes and bytes of its tensors):
        the same data give the same digest whichever file or cache they were read from, so that
        provenance can tell whether a regenerated data set is the one a run was trained on."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self._content().items()):
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(tensor.contiguous().numpy().tobytes())
        return digest.hexdigest()

    def _view(self, rows: torch.Tensor) -> "IndexedDataset":
        view = self.__class__.__new__(self.__class__)
        view.__dict__.update(self.__dict__)
        view.rows = rows
        return view


class QM9Dataset(IndexedDataset):
    """QM9 molecules stored as concatenated tensors (z, pos, ptr, y, gdb_id); items are PyG ``Data``.

    ``dataset[i]`` is ``Data(z int64 [N], pos float32 [N, 3] Angstrom, y float32 [1, 12] training units,
    idx int64 [1] row index in the full set, gdb_id int64 [1] QM9 index)``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self._z, self._pos, self._ptr = tensors["z"], tensors["pos"], tensors["ptr"]
        self._y, self._gdb_id = tensors["y"], tensors["gdb_id"]
        super().__init__(torch.arange(self._y.shape[0]))

    def _item(self, row: int) -> Data:
        start, end = int(self._ptr[row]), int(self._ptr[row + 1])
        return Data(z=self._z[start:end].long(), pos=self._pos[start:end].clone(),
                    y=self._y[row:row + 1].clone(), idx=torch.tensor([row]),
                    gdb_id=self._gdb_id[row:row + 1].clone())

    def _content(self) -> dict[str, torch.Tensor]:
        return {"z": self._z, "pos": self._pos, "ptr": self._ptr, "y": self._y, "gdb_id": self._gdb_id}

    @property
    def y(self) -> torch.Tensor:
        """All targets of the molecules in this (sub)set, float32 [len, 12] in training units."""
        return self._y[self.rows]

    def __repr__(self) -> str:
        return f"QM9Dataset({len(self)} molecules)"


def load_qm9(data_dir=None) -> QM9Dataset:
    """The whole QM9 set (130,831 molecules) as a dataset of PyG ``Data``, parsed once and cached.

    The cache ``<data_dir>/qm9_v1.pt`` (+ ``.json`` sidecar) is verified on every load (format version,
    qm9pack file sizes, byte size, sha256); a missing, stale, truncated or corrupt cache is rebuilt
    from qm9pack's CSVs with a logged warning.
    """
    try:
        files = qm9_source_files()
    except ModuleNotFoundError as error:
        # A machine without qm9pack (a GPU node, say) can use a cache built elsewhere: copy
        # <data_dir>/qm9_v1.pt and its .json; it is verified as usual, only its staleness cannot be.
        tensors, reason = _read_qm9_cache(data_dir, None)
        if tensors is None:
            cache_path, _ = _qm9_cache_paths(data_dir)
            raise ModuleNotFoundError(
                f"{error}; or copy a QM9 cache built where qm9pack is installed to {cache_path} "
                f"(with its .json sidecar): {reason}") from error
        LOG.warning("qm9pack is not installed: using the verified QM9 cache in %s as it is "
                    "(its sha256 matches; whether qm9pack changed since cannot be checked here)",
                    data_dir_path(data_dir))
        return QM9Dataset(tensors)
    fingerprint = _qm9_source_fingerprint(files)
    tensors, reason = _read_qm9_cache(data_dir, fingerprint)
    if tensors is None:
        cache_path, _ = _qm9_cache_paths(data_dir)
        if cache_path.exists():
            LOG.warning("QM9 cache %s is not used and will be rebuilt: %s", cache_path, reason)
        else:
            LOG.info("building the QM9 cache: %s", reason)
        start = time.perf_counter()
        arrays = parse_qm9_csv(files)
        _write_qm9_cache(arrays, data_dir, fingerprint)
        LOG.info("QM9 parsed and cached at %s in %.1f s", cache_path, time.perf_counter() - start)
        tensors = {key: torch.from_numpy(value) for key, value in arrays.items()}
    return QM9Dataset(tensors)


def qm9_split(n: int = QM9_NUM_MOLECULES, seed: int = 42) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DimeNet's QM9 split: ``RandomState(seed).permutation(n)``, 110,000 train, 10,000 valid, rest test."""
    n_train, n_valid = QM9_SPLIT_SIZES
    if n <= n_train + n_valid:
        raise ValueError(f"qm9_split needs n > {n_train + n_valid} (got n={n}); use n={QM9_NUM_MOLECULES}")
    permutation = np.random.RandomState(seed).permutation(n)
    return permutation[:n_train], permutation[n_train:n_train + n_valid], permutation[n_train + n_valid:]


def subset_split(split, n_train: int | None, n_valid: int | None, n_test: int | None):
    """Prefixes of a (train, valid, test) split, for small profiles; ``None`` keeps a whole set.

    Prefixes keep every subset inside its parent set, so small-profile test molecules are true test
    molecules.
    """
    subsets = []
    for name, indices, size in zip(("train", "valid", "test"), split, (n_train, n_valid, n_test)):
        if size is not None and not 0 < size <= len(indices):
            raise ValueError(f"n_{name}={size} must be between 1 and the {name} set's size {len(indices)}")
        subsets.append(np.asarray(indices)[:size])
    return tuple(subsets)


# --- MD17 readers --------------------------------------------------------------------------------

MD17_MOLECULES = ("aspirin", "benzene", "ethanol", "malonaldehyde", "naphthalene", "salicylic_acid",
                  "toluene", "uracil")
MD17_FORMULAS = {  # Hill formulas, to check that a file holds the molecule it is named for
    "aspirin": "C9H8O4", "benzene": "C6H6", "ethanol": "C2H6O", "malonaldehyde": "C3H4O2",
    "naphthalene": "C10H8", "salicylic_acid": "C7H6O3", "toluene": "C7H8", "uracil": "C4H4N2O2",
}
MD17_PYG_NAMES = {name: name.replace("_", " ") for name in MD17_MOLECULES}  # torch_geometric's keys
MD17_SGDML_KEYS = ("E", "F", "R", "z")
MD17_RMD17_KEYS = ("energies", "forces", "coords", "nuclear_charges")
MD17_SOURCES = ("generated", "npz", "pyg")


def md17_download_help(molecule: str | None = None) -> str:
    """Where the published MD17 files are (URLs from torch_geometric.datasets.MD17's tables)."""
    from torch_geometric.datasets import MD17

    if molecule is None:
        sgdml, revised = f"{MD17.gdml_url}/md17_<molecule>.npz", "rmd17_<molecule>.npz"
    else:
        pyg_name = MD17_PYG_NAMES[md17_molecule_name(molecule)]
        sgdml, revised = f"{MD17.gdml_url}/{MD17.file_names[pyg_name]}", MD17.file_names[f"revised {pyg_name}"]
    return f"MD17 (sGDML layout): {sgdml}; rMD17: {MD17.revised_url} (file rmd17/npz_data/{revised})"


def md17_molecule_name(molecule: str) -> str:
    """Canonical MD17 molecule name (``'Salicylic acid'`` -> ``'salicylic_acid'``), or a clear error."""
    name = str(molecule).strip().lower().replace(" ", "_").replace("-", "_")
    if name not in MD17_MOLECULES:
        raise ValueError(f"unknown MD17 molecule {molecule!r}: choose one of {', '.join(MD17_MOLECULES)}")
    return name


def read_md17_npz(path) -> dict[str, np.ndarray]:
    """Read an MD17 npz in the sGDML layout (E, F, R, z) or the rMD17 layout (energies, forces, coords,
    nuclear_charges).

    Returns ``z`` int64 [N], ``R`` float64 [M, N, 3] Angstrom, ``E`` float64 [M] kcal/mol,
    ``F`` float64 [M, N, 3] kcal/mol/Angstrom, and ``layout`` ('sgdml' or 'rmd17').
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no MD17 npz at {path}; get one from {md17_download_help()}, or generate "
                                "GFN2-xTB data offline: python dimezbl_core.py generate-md17 --molecule <name>")
    unreadable = f"{path} is not a readable npz file"
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{unreadable} ({error}); re-download or regenerate it") from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{unreadable} (it holds a single array, not named arrays)")
    with npz:
        keys = set(npz.files)
        if set(MD17_SGDML_KEYS) <= keys:
            layout, layout_keys = "sgdml", MD17_SGDML_KEYS
        elif set(MD17_RMD17_KEYS) <= keys:
            layout, layout_keys = "rmd17", MD17_RMD17_KEYS
        else:
            raise ValueError(
                f"{path} is neither an sGDML MD17 npz (missing keys {sorted(set(MD17_SGDML_KEYS) - keys)}) "
                f"nor an rMD17 npz (missing keys {sorted(set(MD17_RMD17_KEYS) - keys)}); it holds {sorted(keys)}")
        try:
            e, f, r, z = (npz[key] for key in layout_keys)
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
            raise ValueError(f"{unreadable} ({error}); re-download or regenerate it") from None
    e = np.asarray(e, dtype=np.float64)
    if e.ndim == 2 and e.shape[1] == 1:
        e = e[:, 0]
    r, f, z = np.asarray(r, dtype=np.float64), np.asarray(f, dtype=np.float64), np.asarray(z)
    if z.ndim != 1 or z.size == 0 or not np.issubdtype(z.dtype, np.integer) or z.min() < 1:
        raise ValueError(f"{path}: atomic numbers must be positive integers of shape [N], got {z.dtype} {z.shape}")
    n_atoms = z.size
    if r.ndim != 3 or r.shape[1:] != (n_atoms, 3) or r.shape[0] == 0:
        raise ValueError(f"{path}: positions have shape {r.shape}, expected [M, {n_atoms}, 3] for {n_atoms} atoms")
    if f.shape != r.shape:
        raise ValueError(f"{path}: forces have shape {f.shape}, positions {r.shape}; they must match")
    if e.shape != (r.shape[0],):
        raise ValueError(f"{path}: energies have shape {e.shape}, expected [{r.shape[0]}] or [{r.shape[0]}, 1]")
    for key, values in zip(layout_keys[:3], (e, f, r)):
        bad = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"{path}: {key} of configuration {int(np.argmax(bad))} is not finite (NaN or inf; "
                             f"{int(bad.sum())} configuration(s) in all): remove them or regenerate the file")
    return {"z": z.astype(np.int64), "R": r, "E": e, "F": f, "layout": layout}


class MD17Dataset(IndexedDataset):
    """Configurations of one molecule; items are ``Data(z int64 [N], pos float32 [N, 3] Angstrom,
    energy float64 [1] kcal/mol, forces float32 [N, 3] kcal/mol/Angstrom, idx int64 [1])``.

    Energies stay float64: absolute energies reach 1e4 to 1e5 kcal/mol, where float32 steps are
    0.001 to 0.01 kcal/mol.
    """

    def __init__(self, arrays: dict[str, np.ndarray], molecule: str):
        self.molecule = molecule
        self._z = torch.as_tensor(arrays["z"], dtype=torch.long)
        self._pos = torch.as_tensor(arrays["R"], dtype=torch.float32)
        self._energy = torch.as_tensor(arrays["E"], dtype=torch.float64)
        self._forces = torch.as_tensor(arrays["F"], dtype=torch.float32)
        super().__init__(torch.arange(self._pos.shape[0]))

    def _item(self, row: int) -> Data:
        return Data(z=self._z.clone(), pos=self._pos[row].clone(), energy=self._energy[row:row + 1].clone(),
                    forces=self._forces[row].clone(), idx=torch.tensor([row]))

    def _content(self) -> dict[str, torch.Tensor]:
        return {"z": self._z, "R": self._pos, "E": self._energy, "F": self._forces}

    @property
    def energy(self) -> torch.Tensor:
        """Energies of the configurations in this (sub)set, float64 [len] kcal/mol."""
        return self._energy[self.rows]

    def __repr__(self) -> str:
        return f"MD17Dataset({self.molecule}, {len(self)} configurations)"


def md17_default_path(molecule: str, source: str = "generated", data_dir=None) -> Path:
    """Where ``load_md17`` looks: ``<data_dir>/md17/generated/<molecule>.npz`` or ``.../md17/npz/...``."""
    folder = {"generated": "generated", "npz": "npz"}[source]
    return data_dir_path(data_dir) / "md17" / folder / f"{md17_molecule_name(molecule)}.npz"


def _check_md17_formula(arrays: dict[str, np.ndarray], molecule: str, path) -> None:
    from ase import Atoms  # lazily: ase.build/ase.md are not needed to read data

    formula = Atoms(numbers=arrays["z"]).get_chemical_formula(mode="hill")
    if formula != MD17_FORMULAS[molecule]:
        raise ValueError(f"{path} holds {formula}, but {molecule} is {MD17_FORMULAS[molecule]}: wrong file?")


PYG_DOWNLOAD_TIMEOUT_S = 30.0


def _download_md17_pyg(molecule: str, data_dir) -> Path:
    """Download MD17's npz through torch_geometric.datasets.MD17's URL and raw-file layout.

    The file lands where ``MD17(root=<data_dir>/md17/pyg, name=...)`` looks for it
    (``<root>/<pyg name>/raw/<file>``), so PyG finds it too. Our reader then keeps float64 energies
    and skips PyG's per-frame Python processing loop.
    """
    from torch_geometric.data import download_url
    from torch_geometric.datasets import MD17

    pyg_name = MD17_PYG_NAMES[molecule]
    file_name = MD17.file_names[pyg_name]
    raw_path = data_dir_path(data_dir) / "md17" / "pyg" / pyg_name / "raw" / file_name
    if raw_path.is_file():
        return raw_path
    url = f"{MD17.gdml_url}/{file_name}"
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(PYG_DOWNLOAD_TIMEOUT_S)  # fail in seconds where packets are dropped
    try:
        return Path(download_url(url, str(raw_path.parent), log=False))
    except (urllib.error.URLError, OSError) as error:
        if raw_path.exists():  # a download cut off mid-way
            raw_path.unlink()
        raise ConnectionError(
            f"could not download MD17 {molecule!r} for torch_geometric.datasets.MD17 from {url} "
            f"({getattr(error, 'reason', error)}; no network?). Fix: on a machine with internet, download "
            f"that file and put it at {raw_path} (PyG then uses it without downloading); or put any "
            f"sGDML/rMD17 npz at {md17_default_path(molecule, 'npz', data_dir)} and use source='npz'; "
            f"or generate GFN2-xTB data offline: python dimezbl_core.py generate-md17 --molecule {molecule}"
        ) from None
    finally:
        socket.setdefaulttimeout(previous_timeout)


def load_md17(molecule: str, source: str = "generated", data_dir=None, path=None) -> MD17Dataset:
    """One MD17 molecule as a dataset of ``Data(z, pos [Angstrom], energy [kcal/mol], forces [kcal/mol/A])``.

    source: 'generated' (GFN2-xTB data from ``generate_md17``, default ``<data_dir>/md17/generated/``),
    'npz' (an sGDML or rMD17 npz, default ``<data_dir>/md17/npz/<molecule>.npz``), or 'pyg' (downloaded
    via torch_geometric.datasets.MD17, needs internet). ``path`` overrides the file for 'generated'/'npz'.
    """
    molecule = md17_molecule_name(molecule)
    if source not in MD17_SOURCES:
        raise ValueError(f"unknown MD17 source {source!r}: choose one of {', '.join(MD17_SOURCES)}")
    if source == "pyg":
        if path is not None:
            raise ValueError("path is for source='npz' or 'generated'; source='pyg' downloads its own file")
        file_path = _download_md17_pyg(molecule, data_dir)
    else:
        file_path = Path(path) if path is not None else md17_default_path(molecule, source, data_dir)
        if not file_path.is_file():
            how = (f"generate it: python dimezbl_core.py generate-md17 --molecule {molecule} --n-configs 2000"
                   if source == "generated"
                   else f"put an sGDML or rMD17 npz there; get one from {md17_download_help(molecule)}")
            raise FileNotFoundError(f"no MD17 {source} data for {molecule} at {file_path}: {how}")
    arrays = read_md17_npz(file_path)
    _check_md17_formula(arrays, molecule, file_path)
    return MD17Dataset(arrays, molecule)


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
    return np.column_stack([center[0] + radius_a * np.cos(angles), center[1] + radius_a * np.sin(angles),
                            np.zeros(6)])


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
    carbonyl_o = _place(ring[1], ring[0], carbon, 1.22, 123.0, 0.0)   # towards the ortho group
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
    return "C9O4H8", np.vstack([ring, carboxyl[0], acetyl_c, methyl_c, carboxyl[1:3], ester_o, acetyl_o,
                                carboxyl[3], _methyl_hydrogens(ester_o, acetyl_c, methyl_c), ring_h])


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
    substituents = [_radial(ring, 1, 1.22), _radial(ring, 3, 1.22),      # O2, O4
                    _radial(ring, 0, _NH_A), _radial(ring, 2, _NH_A),    # H1, H3
                    _radial(ring, 4, _CH_A), _radial(ring, 5, _CH_A)]    # H5, H6
    return "NCNCCCOOHHHH", np.vstack([ring, substituents])


def _build_malonaldehyde():
    """Planar enol form O=CH-CH=CH-OH with its intramolecular O-H...O hydrogen bond (as in MD17)."""
    central_c = np.zeros(3)
    aldehyde_c = 1.42 * np.array([np.cos(np.radians(150)), np.sin(np.radians(150)), 0.0])
    enol_c = 1.37 * np.array([np.cos(np.radians(30)), np.sin(np.radians(30)), 0.0])
    aldehyde_o = aldehyde_c + 1.24 * np.array([np.cos(np.radians(100)), np.sin(np.radians(100)), 0.0])
    enol_o = enol_c + 1.33 * np.array([np.cos(np.radians(80)), np.sin(np.radians(80)), 0.0])
    bridge_h = enol_o + _OH_A * (aldehyde_o - enol_o) / np.linalg.norm(aldehyde_o - enol_o)
    c_h = [central_c + np.array([0.0, -_CH_A, 0.0]),
           aldehyde_c + _CH_A * np.array([np.cos(np.radians(210)), np.sin(np.radians(210)), 0.0]),
           enol_c + _CH_A * np.array([np.cos(np.radians(-30)), np.sin(np.radians(-30)), 0.0])]
    return "CCCOOHHHH", np.vstack([aldehyde_c, central_c, enol_c, aldehyde_o, enol_o, bridge_h, c_h])


_MD17_BUILDERS = {
    "aspirin": _build_aspirin, "malonaldehyde": _build_malonaldehyde, "naphthalene": _build_naphthalene,
    "salicylic_acid": _build_salicylic_acid, "toluene": _build_toluene, "uracil": _build_uracil,
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
MD17_TEMPERATURE_K = 500.0       # MD17's MD temperature (Chmiela et al., Sci. Adv. 3, e1603015 (2017))
MD17_TIMESTEP_FS = 0.5           # MD17's time step
MD17_SAMPLE_EVERY = 20           # 10 fs between stored configurations: less correlated than every step
MD17_EQUILIBRATION_STEPS = 2000  # 1 ps at 0.5 fs before the first stored configuration
LANGEVIN_FRICTION_PER_FS = 0.01  # 1/fs (100 fs relaxation time), ase's documented example value
OPTIMISATION_FMAX_EV_A = 0.01    # eV/Angstrom, BFGS on the starting geometry
CHECKPOINT_EVERY = 100           # configurations between checkpoints


def _ev_to_kcal_per_mol() -> float:
    """eV -> kcal/mol from ase.units (CODATA 2014), the units tblite's ASE calculator uses."""
    from ase import units

    return 1.0 / (units.kcal / units.mol)


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
        raise RuntimeError(f"{molecule}: GFN2-xTB optimisation changed the bonding (lost "
                           f"{sorted(bonds_before - bonds_after)}, gained {sorted(bonds_after - bonds_before)}): "
                           "fix the starting geometry")
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


def _state_path(out_path: Path) -> Path:
    return out_path.with_name(out_path.stem + ".state.npz")


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _write_generation_state(path: Path, settings: dict, frames: dict[str, list], atoms, rng,
                            md_steps_done: int, wall_s: float) -> None:
    """Checkpoint: the configurations so far plus the MD state (positions, momenta, RNG state)."""
    _atomic_write_bytes(path, _npz_bytes(
        R=np.array(frames["R"]).reshape(-1, len(atoms), 3), E=np.array(frames["E"]),
        F=np.array(frames["F"]).reshape(-1, len(atoms), 3), md_step=np.array(frames["md_step"], dtype=np.int64),
        temperature_k=np.array(frames["temperature_k"]), positions=atoms.get_positions(), momenta=atoms.get_momenta(),
        rng_state=np.array(json.dumps(rng.bit_generator.state)),
        settings=np.array(json.dumps(settings, sort_keys=True)),
        md_steps_done=np.array(md_steps_done), wall_s=np.array(wall_s)))


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


def generate_md17(molecule: str, n_configs: int, out_path=None, temperature_k: float = MD17_TEMPERATURE_K,
                  timestep_fs: float = MD17_TIMESTEP_FS, sample_every: int = MD17_SAMPLE_EVERY, seed: int = 0,
                  equilibration_steps: int = MD17_EQUILIBRATION_STEPS, resume: bool = True,
                  progress: bool = True, friction_per_fs: float = LANGEVIN_FRICTION_PER_FS,
                  checkpoint_every: int = CHECKPOINT_EVERY, num_threads: int = 1, data_dir=None) -> Path:
    """Generate an MD17-style data set with GFN2-xTB: Langevin MD at ``temperature_k`` (K),
    ``timestep_fs`` (fs) steps, one configuration stored every ``sample_every`` steps after
    ``equilibration_steps``.

    Writes ``out_path`` (default ``<data_dir>/md17/generated/<molecule>.npz``) in the sGDML layout:
    E [M, 1] kcal/mol, F [M, N, 3] kcal/mol/Angstrom, R [M, N, 3] Angstrom, z [N], name, theory; plus
    ``<name>.json`` (method, settings, versions, wall time) and ``<name>.state.npz`` (checkpoint with the
    MD state). With ``resume=True`` a run continues from a checkpoint made with the same settings;
    asking for more configurations than exist extends the trajectory.
    """
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from tqdm.auto import tqdm

    molecule = md17_molecule_name(molecule)
    if n_configs < 1 or sample_every < 1 or equilibration_steps < 0:
        raise ValueError(f"need n_configs >= 1, sample_every >= 1, equilibration_steps >= 0; got "
                         f"{n_configs}, {sample_every}, {equilibration_steps}")
    out_path = Path(out_path) if out_path is not None else md17_default_path(molecule, "generated", data_dir)
    state_path = _state_path(out_path)
    settings = {"molecule": molecule, "method": XTB_METHOD, "temperature_k": float(temperature_k),
                "timestep_fs": float(timestep_fs), "sample_every": int(sample_every), "seed": int(seed),
                "equilibration_steps": int(equilibration_steps), "friction_per_fs": float(friction_per_fs),
                "optimisation_fmax_ev_a": OPTIMISATION_FMAX_EV_A, "checkpoint_format": 1}
    ev_to_kcal = _ev_to_kcal_per_mol()

    atoms, geometry_source = optimise_md17_geometry(molecule, num_threads)
    atoms.set_constraint(FixCom())  # keep the centre of mass in place (ase's advice over fixcm=True)
    rng = np.random.default_rng(seed)
    frames = {"R": [], "E": [], "F": [], "md_step": [], "temperature_k": []}
    md_steps_done, wall_before = 0, 0.0
    state, reason = (None, "resume=False") if not resume else (
        _read_generation_state(state_path, settings) if state_path.exists() else (None, "no checkpoint"))
    if state is not None:
        frames = {key: list(state[key]) for key in frames}
        atoms.set_positions(state["positions"], apply_constraint=False)
        atoms.set_momenta(state["momenta"], apply_constraint=False)
        rng.bit_generator.state = json.loads(str(state["rng_state"]))
        md_steps_done, wall_before = int(state["md_steps_done"]), float(state["wall_s"])
        LOG.info("%s: resuming from %d configurations in %s", molecule, len(frames["E"]), state_path)
    else:
        if resume and state_path.exists():
            LOG.warning("%s: starting over: %s", molecule, reason)
        _thermalize_momenta(atoms, temperature_k, rng)
        Stationary(atoms)
        ZeroRotation(atoms)
    resumed_from = len(frames["E"])

    dynamics = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_k,
                        friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    start = time.perf_counter()

    def checkpoint():
        _write_generation_state(state_path, settings, frames, atoms, rng, md_steps_done,
                                wall_before + time.perf_counter() - start)

    bar = tqdm(total=n_configs, initial=min(resumed_from, n_configs), desc=f"{molecule} {XTB_METHOD} MD",
               unit="config", disable=not progress)
    try:
        if md_steps_done < equilibration_steps:
            dynamics.run(equilibration_steps - md_steps_done)
            md_steps_done = equilibration_steps
        sampling_start = time.perf_counter()
        while len(frames["E"]) < n_configs:
            dynamics.run(sample_every)
            md_steps_done += sample_every
            frames["R"].append(atoms.get_positions())
            frames["E"].append(atoms.get_potential_energy() * ev_to_kcal)
            frames["F"].append(atoms.get_forces(apply_constraint=False) * ev_to_kcal)
            frames["md_step"].append(md_steps_done)
            frames["temperature_k"].append(atoms.get_temperature())
            bar.update(1)
            if len(frames["E"]) % checkpoint_every == 0:
                checkpoint()
    except KeyboardInterrupt:
        checkpoint()
        LOG.warning("%s: interrupted; %d configurations kept in %s, run again to resume",
                    molecule, len(frames["E"]), state_path)
        raise
    finally:
        bar.close()
    checkpoint()
    end = time.perf_counter()
    wall_s = wall_before + end - start

    z = atoms.get_atomic_numbers().astype(np.int64)
    n_atoms = len(z)
    _atomic_write_bytes(out_path, _npz_bytes(
        E=np.array(frames["E"][:n_configs]).reshape(-1, 1),
        F=np.array(frames["F"][:n_configs]).reshape(-1, n_atoms, 3),
        R=np.array(frames["R"][:n_configs]).reshape(-1, n_atoms, 3), z=z,
        md_step=np.array(frames["md_step"][:n_configs], dtype=np.int64),
        name=np.array(molecule), theory=np.array(f"{XTB_METHOD} (tblite), Langevin MD {temperature_k:g} K"),
        type=np.array("d"), r_unit=np.array("Ang"), e_unit=np.array("kcal/mol")))
    new_configs = max(0, min(n_configs, len(frames["E"])) - resumed_from)
    _atomic_write_json(out_path.with_suffix(".json"), {
        **settings, "n_configs": n_configs, "n_atoms": n_atoms, "md_steps": int(frames["md_step"][n_configs - 1]),
        "langevin": "ase.md.langevin.Langevin with ase.constraints.FixCom", "start_geometry": geometry_source,
        "resumed_from_configs": resumed_from, "wall_time_s": round(wall_s, 3),
        "configs_per_s_sampling": round(new_configs / max(end - sampling_start, 1e-9), 3),
        "mean_temperature_k": round(float(np.mean(frames["temperature_k"][:n_configs])), 1),
        "units": {"E": "kcal/mol", "F": "kcal/mol/Angstrom", "R": "Angstrom"},
        "ev_to_kcal_per_mol": ev_to_kcal, "software": _software_versions(), "openmp_threads": num_threads,
        "note": "GFN2-xTB data generated offline, not the DFT data of MD17: comparable across models "
                "here, not with the paper's absolute numbers",
    })
    return out_path


# --- MD17 splits and command line ----------------------------------------------------------------

def md17_split(n_total: int, n_train: int = 1000, n_valid: int = 1000, seed: int = 42):
    """Seeded (train, valid, test) index arrays: ``n_train`` (DimeNet: 1,000), ``n_valid``, the rest test.

    For small (smoke) data sets pass smaller ``n_train``/``n_valid`` explicitly.
    """
    if n_train < 1 or n_valid < 0 or n_train + n_valid >= n_total:
        raise ValueError(f"md17_split: n_train={n_train} + n_valid={n_valid} must leave at least one test "
                         f"configuration of n_total={n_total}; pass smaller n_train/n_valid for small data sets")
    permutation = np.random.RandomState(seed).permutation(n_total)
    return permutation[:n_train], permutation[n_train:n_train + n_valid], permutation[n_train + n_valid:]


def generate_md17_main(argv: Sequence[str] | None = None) -> int:
    """``dimezbl_core.py generate-md17``: GFN2-xTB MD17-style data sets, resumable, with progress bars."""
    parser = argparse.ArgumentParser(
        prog="dimezbl_core.py generate-md17",
        description="Generate MD17-style data (GFN2-xTB via tblite, Langevin MD at 500 K) in the sGDML npz layout.")
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
    for molecule in (MD17_MOLECULES if args.all else (args.molecule,)):
        path = generate_md17(molecule, args.n_configs, out_path=args.out, temperature_k=args.temperature_k,
                             timestep_fs=args.timestep_fs, sample_every=args.sample_every, seed=args.seed,
                             equilibration_steps=args.equilibration_steps, resume=not args.no_resume,
                             progress=not args.no_progress, friction_per_fs=args.friction_per_fs,
                             num_threads=args.threads, data_dir=args.data_dir)
        print(f"{molecule}: {args.n_configs} configurations -> {path}")
    return 0


REPOSITORY_ROOT = Path(__file__).resolve().parent


def portable_path(path) -> str:
    """A path as stored in configs: relative to the repository root when it lies inside it (so
    that committed run configs match in any checkout), absolute otherwise."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(REPOSITORY_ROOT))
    except ValueError:
        return str(path)


def repository_path(path) -> Optional[Path]:
    """Inverse of `portable_path`: a relative path is taken from the repository root."""
    if path is None:
        return None
    path = Path(path)
    return path if path.is_absolute() else REPOSITORY_ROOT / path

# =============================================================================================
# --- Training and evaluation: config, profiles, loop, EMA, checkpoints, metrics, provenance ---
# =============================================================================================

QM9_ENERGY_TARGETS = ("U0", "U", "H", "G")  # total (atomization) energies: ZBL enters in eV


_FLOAT_TYPES = ("float", "Optional[float]")  # TrainConfig annotations are strings here (from __future__ import annotations)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved with every run and checkpoint.

    Defaults are DimeNet's protocol (DESIGN.md section 2); profiles override some fields.
    Energies: QM9 targets in training units (eV for energies), MD17 in kcal/mol (forces
    kcal/mol/A).
    """

    dataset: str = "qm9"  # "qm9" or "md17"
    target: str = "U0"  # a QM9 target of QM9_TARGETS, or an MD17 molecule
    zbl: bool = True  # False: the plain DimeNet baseline
    profile: str = "custom"
    model: dict = field(default_factory=dict)  # DimezblNet keyword overrides
    md17_source: str = "generated"
    md17_path: Optional[str] = None  # an npz file instead of the default place of md17_source
    n_train: Optional[int] = None  # None: DimeNet's sizes (QM9 110,000; MD17 1,000)
    n_valid: Optional[int] = None  # None: QM9 10,000; MD17 1,000
    n_test: Optional[int] = None  # None: the rest
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 3000
    decay_rate: float = 0.01
    decay_steps: Optional[int] = 4_000_000  # None: max_steps (the rate falls by decay_rate over the run)
    ema_decay: float = 0.999
    grad_clip_norm: float = 1000.0
    amsgrad_eps: float = 1e-7
    max_steps: int = 3_000_000
    max_wall_s: Optional[float] = None  # stop (and evaluate) after this much training time
    eval_every: int = 10_000
    checkpoint_every: Optional[int] = None  # None: at every evaluation
    force_weight: float = 100.0  # rho of DimeNet's MD17 loss
    # Subtracted from the targets (and so learnt as the residual): None is the dataset's default,
    # "none" for QM9 as DimeNet, "mean_per_atom" for MD17's absolute energies (see target_offset).
    target_offset: Optional[str] = None
    early_stopping_patience: Optional[int] = None  # evaluations without improvement (MD17)
    seed: int = 0
    split_seed: int = 42
    name: Optional[str] = None  # the model's name in run directories and tables (None: model_name's default)
    out_dir: str = "results/runs"
    data_dir: Optional[str] = None
    device: str = "auto"
    amp: bool = False  # bf16 autocast for energy-only training on CUDA
    compile: bool = False  # torch.compile the model
    dtype: str = "float32"

    def __post_init__(self):
        # A JSON/`--set` integer (max_wall_s=7200) is stored as the float the field holds (7200.0),
        # so config.json files and comparisons see one type.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in _FLOAT_TYPES and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
        self.validate()

    def validate(self):
        """Check every field (type, range, choices) at construction, for the command line, notebooks and
        Python alike; a bad value is a ValueError naming the field, the value and what it may be."""
        def fail(name, wanted):
            raise ValueError(f"config field {name}={getattr(self, name)!r} is invalid: {wanted}")

        def integer(name, low, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                fail(name, f"it must be an integer >= {low}" + (" or null" if optional else ""))

        def number(name, low, high=math.inf, low_open=False, high_open=False, optional=False):
            value = getattr(self, name)
            if value is None and optional:
                return
            ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                  and (value > low if low_open else value >= low) and (value < high if high_open else value <= high))
            if not ok:
                bounds = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
                          f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
                fail(name, f"it must be a number {bounds}" + (" or null" if optional else ""))

        def choice(name, choices, optional=False):
            value = getattr(self, name)
            if not (value is None and optional) and value not in choices:
                fail(name, f"use one of {list(choices)}" + (" or null" if optional else ""))

        choice("dataset", ("qm9", "md17"))
        if self.dataset == "qm9" and self.target not in QM9_TARGETS:
            fail("target", f"use one of the QM9 targets {list(QM9_TARGETS)}")
        if self.dataset == "md17" and (not isinstance(self.target, str) or self.target not in MD17_MOLECULES):
            fail("target", f"use one of the MD17 molecules {list(MD17_MOLECULES)} (md17_molecule_name spells them)")
        for name in ("zbl", "amp", "compile"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "it must be true or false")
        for name in ("profile", "out_dir"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(name, "it must be a non-empty string")
        if self.name is not None and (not isinstance(self.name, str) or not self.name or "/" in self.name):
            fail("name", "it must be null or a non-empty name without '/'")
        if not isinstance(self.model, dict):
            fail("model", "it must be a dict of DimezblNet keyword arguments")
        choice("md17_source", MD17_SOURCES)
        for name in ("md17_path", "data_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                fail(name, "it must be null or a path (string)")
        for name in ("n_train", "n_valid", "n_test"):
            integer(name, 1, optional=True)
        integer("batch_size", 1)
        integer("warmup_steps", 0)
        integer("decay_steps", 1, optional=True)
        integer("max_steps", 1)
        integer("eval_every", 1)
        integer("checkpoint_every", 1, optional=True)
        integer("early_stopping_patience", 1, optional=True)
        integer("seed", 0)
        integer("split_seed", 0)
        number("learning_rate", 0.0, low_open=True)
        number("decay_rate", 0.0, 1.0, low_open=True)
        number("ema_decay", 0.0, 1.0, high_open=True)
        number("grad_clip_norm", 0.0, low_open=True)
        number("amsgrad_eps", 0.0, low_open=True)
        number("force_weight", 0.0)
        number("max_wall_s", 0.0, low_open=True, optional=True)
        choice("target_offset", TARGET_OFFSETS, optional=True)
        choice("dtype", ("float32", "float64"))
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda") or (
                self.device.startswith("cuda:") and self.device[5:].isdigit())):
            fail("device", "use auto, cpu, cuda or cuda:N")
        defaults = {name: parameter.default for name, parameter in inspect.signature(DimezblNet.__init__).parameters.items()
                    if name != "self"}
        for name, value in self.model.items():
            default = defaults.get(name)
            wanted = type(default) if default is not None else None
            if wanted is None or name not in defaults:
                continue  # unknown names are from_dict's error; None defaults take an int
            if wanted is bool:
                ok = isinstance(value, bool)
            elif wanted is int:
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
            elif wanted is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            else:
                ok = isinstance(value, wanted)
            if not ok:
                raise ValueError(f"config field model.{name}={value!r} is invalid: it must be "
                                 f"{'a non-negative integer' if wanted is int else 'a ' + wanted.__name__}")

    @property
    def model_name(self) -> str:
        if self.name is not None:
            return self.name
        return ("dimezblnet" if self.zbl else "dimenet") + (
            "_pp" if self.model.get("variant") == "dimenet++" else ""
        )

    @property
    def run_dir(self) -> Path:
        root = Path(self.out_dir)
        if not root.is_absolute():
            root = REPOSITORY_ROOT / root
        return root / self.profile / self.dataset / self.target / f"{self.model_name}_seed{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config fields {unknown}; known: {sorted(known)}")
        model_fields = set(inspect.signature(DimezblNet.__init__).parameters) - {"self"}
        wrong = sorted(set(values.get("model") or {}) - model_fields)
        if wrong:  # a misspelt `--set model.NAME=...` fails here, before any data is loaded
            raise ValueError(f"unknown model fields {wrong} (DimezblNet keyword arguments); "
                             f"known: {sorted(model_fields)}")
        return cls(**values)


SMOKE_MODEL = dict(hidden_channels=32, num_blocks=2, num_bilinear=4, num_output_layers=2,
                   num_after_skip=1, int_emb_size=16, basis_emb_size=4, out_emb_channels=32)  # fmt: skip
CPU_MODEL = dict(hidden_channels=64, num_blocks=4)  # DimeNet otherwise (8 bilinear, 3 output layers)

PROFILES = {
    # Minutes on 2 CPU cores (`make reproduce` trains 40 models in it: 16 min in all on the slowest
    # 2-core CPU it has run on, an AMD EPYC Zen 1): a shrunk model, small subsets, a 10-step EMA
    # horizon (the runs are 50-100 steps), offsets so that training starts near the data.
    "smoke": dict(
        model=SMOKE_MODEL, batch_size=16, warmup_steps=20, eval_every=25, ema_decay=0.9,
        target_offset="per_element",
        qm9=dict(n_train=1000, n_valid=100, n_test=200, max_steps=50),
        md17=dict(n_train=100, n_valid=25, max_steps=100, early_stopping_patience=None),
    ),
    # Hours on a workstation CPU (120 models for both tables and 3 seeds; measured on one core of
    # this project's 2-core machine: MD17 8-12 min, QM9 24-32 min per model, about 40 core-hours
    # in all): DimeNet's architecture at half width and 4 blocks (CPU_MODEL), the full QM9
    # training set, 2,000 steps of batch 32 per model (a step budget, so results do not depend
    # on the machine; max_wall_s is only a safety stop, recorded as the stop reason if hit).
    "cpu": dict(
        model=CPU_MODEL, batch_size=32, warmup_steps=300, max_steps=2000, max_wall_s=3600.0,
        target_offset="auto", ema_decay=0.99,
        eval_every=250, qm9=dict(n_train=110_000, n_valid=1000, n_test=None),
        md17=dict(n_train=1000, n_valid=500, early_stopping_patience=None),
    ),
    # The cpu architecture under a test that is fair to both models: the same per-element start
    # (a least-squares energy per element of what each network has to learn), DimeNet's warm-up and
    # exponential decay compressed to the run (the rate falls 100x by max_steps), 4 seeds
    # (PROFILE_SEEDS); the ZBL recipes of MODEL_RECIPES. docs/fair.md describes the experiment.
    "fair": dict(
        model=CPU_MODEL, batch_size=32, warmup_steps=100, max_steps=2000, decay_steps=None, decay_rate=0.01,
        target_offset="per_element", ema_decay=0.99, eval_every=250,
        qm9=dict(n_train=110_000, n_valid=1000, n_test=None),
        md17=dict(n_train=1000, n_valid=500, early_stopping_patience=None),
    ),
    # DimeNet's protocol (GPU; days per model).
    "paper": dict(
        model={}, qm9=dict(), md17=dict(n_train=1000, n_valid=1000, early_stopping_patience=50,
                                         eval_every=1000),
    ),
}  # fmt: skip

# Seeds per (target, model) of each profile: the tables give mean and spread over them.
# The fair profile at four times the budget (the same data: PROFILE_MD17_DATA), to see where the
# gap goes as training converges.
PROFILES["fair_long"] = {**PROFILES["fair"], "max_steps": 8000}

PROFILE_SEEDS = {"smoke": (0,), "cpu": (0, 1, 2), "fair": (0, 1, 2, 3), "fair_long": (0, 1, 2, 3), "paper": (0, 1, 2)}

# The offline MD17 stand-in each profile generates (generate_md17 keyword arguments).
PROFILE_MD17_GENERATION = {
    "smoke": dict(n_configs=200, sample_every=5, equilibration_steps=400),  # 2.5 fs apart
    "cpu": dict(n_configs=2000),
    "fair": dict(n_configs=2000),
    "fair_long": dict(n_configs=2000),
    "paper": dict(n_configs=12000),
}
PROFILE_MD17_DATA = {"fair_long": "fair"}  # profiles that train on another profile's generated data


def profile_config(profile: str, dataset: str, target: str, zbl: bool = True, seed: int = 0,
                   **overrides) -> TrainConfig:
    """The named config of a profile (smoke, cpu, paper) for one model; overrides win.

    overrides["model"] replaces the profile's model dict; a key "model.NAME" changes one field of
    it and keeps the others (e.g. {"model.zbl_reach": "covalent"}, `--set model.zbl_reach=covalent`)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILES)}")
    values = {k: v for k, v in PROFILES[profile].items() if k not in ("qm9", "md17")}
    values.update(PROFILES[profile].get(dataset, {}))
    values.update(dataset=dataset, target=target, zbl=zbl, seed=seed, profile=profile)
    fields = {key: value for key, value in overrides.items() if not key.startswith("model.")}
    values.update(fields)
    values["model"] = dict(values.get("model", {}))  # a copy: "model.NAME" keys never change the caller's dict
    for key, value in overrides.items():
        if key.startswith("model."):
            values["model"][key[len("model."):]] = value
    return TrainConfig.from_dict(values)


# --- optimisation pieces ---


def learning_rate_at(step: int, config: TrainConfig) -> float:
    """DimeNet's schedule: lr * min(1, (step + 1) / warmup) * decay_rate^(step / decay_steps);
    decay_steps None is max_steps, so that the rate reaches lr * decay_rate at max_steps."""
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    decay_steps = config.decay_steps if config.decay_steps is not None else config.max_steps
    return config.learning_rate * warmup * config.decay_rate ** (step / decay_steps)


class ExponentialMovingAverage:
    """EMA of the weights: ema <- decay * ema + (1 - decay) * weights after every step (as
    DimeNet's tf.train.ExponentialMovingAverage without num_updates). Validation, test and the
    best checkpoint use the EMA weights."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)
            else:
                self.shadow[key].copy_(value)

    def copy_to(self, model: torch.nn.Module):
        model.load_state_dict(self.shadow)


def select_device(preference: str = "auto") -> torch.device:
    """CUDA when available (or asked for), the CPU otherwise."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but CUDA is not available; use --device cpu")
    return device


# --- data for training ---


@dataclass
class Batch:
    z: Tensor
    pos: Tensor
    batch: Tensor
    target: Tensor  # [B] in training units (QM9 target or MD17 energy minus offsets)
    forces: Optional[Tensor] = None  # [N, 3] kcal/mol/A (MD17)
    num_atoms: Optional[Tensor] = None  # [B]
    offset_energy: Optional[Tensor] = None  # float64 [B]: what was subtracted from the target (training units)

    def to(self, device) -> "Batch":
        return Batch(**{k: (v.to(device) if torch.is_tensor(v) else v)
                        for k, v in dataclasses.asdict(self).items()})  # fmt: skip


def raw_targets(samples, target_index: Optional[int] = None) -> Tensor:
    """float64 [B]: the QM9 target `target_index` (training units) or the MD17 energy (kcal/mol)."""
    if target_index is not None:
        return torch.cat([s.y[:, target_index] for s in samples]).double()
    return torch.cat([s.energy for s in samples]).double()


def offset_atomic_energies(offset, z: Tensor) -> Tensor:
    """float64 [N]: the per-atom part of a target offset for atoms `z` (training units).

    An offset is (per molecule, per atom) or (per molecule, per atom, per element), the last a
    sequence indexed by atomic number (MAX_ATOMIC_NUMBER + 1 entries); the energy subtracted from a
    molecule's target is per_molecule + sum over its atoms of (per_atom + per_element[Z])."""
    atomic = torch.full(z.shape, float(offset[1]), dtype=torch.float64)
    if len(offset) > 2:
        atomic = atomic + torch.as_tensor(offset[2], dtype=torch.float64)[z.long().cpu()]
    return atomic


def offset_energies(offset, z: Tensor, batch: Tensor, num_molecules: int) -> Tensor:
    """float64 [B]: the offset of each molecule (`offset_atomic_energies`, plus the per-molecule part)."""
    return float(offset[0]) + scatter_sum(offset_atomic_energies(offset, z), batch.cpu(), num_molecules)


def collate(samples, target_index: Optional[int] = None, offset=(0.0, 0.0)) -> Batch:
    """Concatenate molecules (PyG `Data`) into one batch. The target is stored minus the molecule's
    offset (`offset_energies`; training units), subtracted in float64 so that absolute MD17 energies
    (~1e5 kcal/mol) keep their precision."""
    counts = torch.tensor([s.z.numel() for s in samples])
    z = torch.cat([s.z for s in samples])
    pos = torch.cat([s.pos for s in samples])
    batch = torch.repeat_interleave(torch.arange(len(samples)), counts)
    offset_energy = offset_energies(offset, z, batch, len(samples))
    target = (raw_targets(samples, target_index) - offset_energy).float()
    forces = torch.cat([s.forces for s in samples]).float() if target_index is None else None
    return Batch(z, pos, batch, target, forces=forces, num_atoms=counts, offset_energy=offset_energy)


@torch.no_grad()
def molecule_zbl_energies(samples, zbl: ZBL, chunk: int = 256, unit_weight: bool = False) -> Tensor:
    """float64 [B]: the ZBL part of each molecule's energy as the model combines it (`ZBL.combine` with a
    zero network: the switched pair sum, or w_i-weighted for zbl_combine="interpolate") in the ZBL module's
    unit, times the module's weight (`scale`), or times 1 with unit_weight (whatever was learned)."""
    zbl = copy.deepcopy(zbl).cpu().double()
    if unit_weight:
        zbl.scale.fill_(1.0)
    energies = []
    for start in range(0, len(samples), chunk):
        part = samples[start:start + chunk]
        z = torch.cat([s.z for s in part])
        pos = torch.cat([s.pos for s in part]).double()
        batch = torch.repeat_interleave(torch.arange(len(part)), torch.tensor([s.z.numel() for s in part]))
        edge_index = radius_graph(pos, batch, zbl.cutoff_a)
        dist = (pos[edge_index[1]] - pos[edge_index[0]]).norm(dim=-1)
        atomic = zbl.combine(torch.zeros(z.numel(), 1, dtype=pos.dtype), z, edge_index, dist).squeeze(-1)
        energies.append(scatter_sum(atomic, batch, len(part)))
    return torch.cat(energies)


QM9_INTENSIVE_TARGETS = ("mu", "homo", "lumo", "gap")  # the others grow with molecule size
TARGET_OFFSETS = ("none", "mean", "mean_per_atom", "per_element", "auto")


def element_counts(samples) -> Tuple[np.ndarray, np.ndarray]:
    """(elements [K] sorted atomic numbers, counts [B, K] float64): how many atoms of each element
    every molecule has."""
    z = torch.cat([s.z for s in samples]).long()
    molecule = torch.repeat_interleave(torch.arange(len(samples)), torch.tensor([s.z.numel() for s in samples]))
    elements, column = torch.unique(z, return_inverse=True)
    counts = torch.zeros(len(samples), len(elements), dtype=torch.float64)
    counts.index_put_((molecule, column), torch.ones_like(z, dtype=torch.float64), accumulate=True)
    return elements.numpy(), counts.numpy()


def per_element_least_squares(samples, values: Tensor) -> np.ndarray:
    """float64 [MAX_ATOMIC_NUMBER + 1]: energies e_Z minimising sum_m (values_m - sum_Z n_mZ e_Z)^2
    over the molecules (the atomic reference energies of schnetpack, nequip and MACE; no intercept).
    Elements that never occur get 0. A set of one composition (MD17) has many minimisers: the
    smallest-norm one, whose prediction is the mean."""
    elements, counts = element_counts(samples)
    coefficients = np.linalg.lstsq(counts, values.double().numpy(), rcond=None)[0]
    table = np.zeros(MAX_ATOMIC_NUMBER + 1)
    table[elements] = coefficients
    return table


def resolve_offset_kind(kind: str, target_index: Optional[int]) -> str:
    """The offset `kind` of a target: "auto" is mean_per_atom, "per_element" is itself, for extensive
    targets and MD17 energies; both are "mean" for the intensive QM9 targets (QM9_INTENSIVE_TARGETS)."""
    if kind not in TARGET_OFFSETS:
        raise ValueError(f"unknown target_offset {kind!r}: use one of {TARGET_OFFSETS}")
    intensive = target_index is not None and QM9_TARGETS[target_index] in QM9_INTENSIVE_TARGETS
    if kind in ("auto", "per_element") and intensive:
        return "mean"
    return "mean_per_atom" if kind == "auto" else kind


def offset_record(offset, kind: str) -> dict:
    """The offset as metrics.json records it: kind, per molecule, per atom, per element (by symbol)."""
    from ase.data import chemical_symbols

    per_element = ({chemical_symbols[z]: value for z, value in enumerate(offset[2]) if value != 0.0}
                   if len(offset) > 2 else {})
    return {"kind": kind, "per_molecule": float(offset[0]), "per_atom": float(offset[1]),
            "per_element": per_element, "unit": "training unit (eV for QM9 energies, kcal/mol MD17)"}


def target_offset(samples, target_index, kind: str, zbl: Optional[ZBL] = None):
    """Offsets from the training set (see `offset_atomic_energies` for the layout). "none": DimeNet's
    raw targets; "mean": the mean target; "mean_per_atom": the mean target per atom times the atom
    count; "per_element": a least-squares energy per element (`per_element_least_squares`);
    "auto" and "per_element" resolve by target (`resolve_offset_kind`).
    With a fixed-weight ZBL term the offsets are those of the target minus the ZBL energy, so that
    DimezblNet, too, starts from the best linear fit of what its network has to learn."""
    kind = resolve_offset_kind(kind, target_index)
    if kind == "none":
        return (0.0, 0.0)
    values = raw_targets(samples, target_index)
    if zbl is not None and not isinstance(zbl.scale, nn.Parameter):
        values = values - molecule_zbl_energies(samples, zbl)
    if kind == "mean":
        return (float(values.mean()), 0.0)
    if kind == "per_element":
        return (0.0, 0.0, per_element_least_squares(samples, values).tolist())
    counts = torch.tensor([s.z.numel() for s in samples], dtype=torch.float64)
    return (0.0, float((values / counts).mean()))


class RunData:
    """Train/valid/test sets of one run with DimeNet's splits, and the batches of each step.

    The order of training molecules is a function of (seed, epoch) only, so a resumed run sees
    exactly the batches of an uninterrupted one. In a distributed run every rank takes its
    share of each global batch (rank::world_size), like DistributedSampler with a shared seed.
    """

    def __init__(self, config: TrainConfig, zbl: Optional[ZBL] = None):
        self.config = config
        if config.dataset == "qm9":  # the target was checked by TrainConfig.validate
            full = load_qm9(config.data_dir)
            split = subset_split(qm9_split(len(full), config.split_seed), config.n_train,
                                 config.n_valid, config.n_test)  # fmt: skip
            self.target_index = QM9_TARGETS.index(config.target)
        elif config.dataset == "md17":
            full = load_md17(config.target, source=config.md17_source, data_dir=config.data_dir,
                             path=repository_path(config.md17_path))
            n_train = config.n_train or 1000
            n_valid = config.n_valid if config.n_valid is not None else 1000
            train, valid, test = md17_split(len(full), n_train, n_valid, seed=config.split_seed)
            split = (train, valid, test[: config.n_test] if config.n_test else test)
            self.target_index = None
        else:
            raise ValueError(f"unknown dataset {config.dataset!r}: use 'qm9' or 'md17'")
        self.train, self.valid, self.test = (full[np.asarray(s)] for s in split)
        self.data_sha256 = full.content_sha256()  # of the whole set the splits were taken from
        kind = config.target_offset or ("none" if config.dataset == "qm9" else "mean_per_atom")
        train_samples = [self.train[i] for i in range(len(self.train))]
        self.offset = target_offset(train_samples, self.target_index, kind, zbl)
        self.offset_kind = resolve_offset_kind(kind, self.target_index)
        of_what = ("the target minus the ZBL energy (fixed weight)" if zbl is not None
                   and not isinstance(zbl.scale, nn.Parameter) else "the target")
        self.offset_method = {
            "none": "none (raw targets, as DimeNet)",
            "mean": f"mean of {of_what} over the training set",
            "mean_per_atom": f"mean per atom of {of_what} over the training set, times the atom count",
            "per_element": f"per-element least squares of {of_what} on the training set (no intercept)",
        }[self.offset_kind]
        self.elements = torch.cat([s.z for s in train_samples]).unique().tolist()
        if len(self.train) < config.batch_size:
            raise ValueError(f"{len(self.train)} training molecules are fewer than one batch")

    def _collate(self, samples) -> Batch:
        return collate(samples, self.target_index, self.offset)

    def train_batch(self, step: int, rank: int = 0, world_size: int = 1) -> Batch:
        size = self.config.batch_size
        per_epoch = len(self.train) // size
        epoch, position = divmod(step, per_epoch)
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.train), generator=generator)
        indices = order[position * size:(position + 1) * size][rank::world_size]
        return self._collate([self.train[int(i)] for i in indices])

    def batches(self, subset, batch_size: Optional[int] = None):
        size = batch_size or self.config.batch_size
        for start in range(0, len(subset), size):
            yield self._collate([subset[i] for i in range(start, min(start + size, len(subset)))])

    def mean_predictor_mae(self, subset) -> dict:
        """MAE of predicting the training mean (the bar a trained model must clear)."""
        samples = [subset[i] for i in range(len(subset))]
        train_mean = raw_targets([self.train[i] for i in range(len(self.train))], self.target_index).mean()
        mae = {"energy": float((raw_targets(samples, self.target_index) - train_mean).abs().mean())}
        if self.target_index is None:  # the mean force is zero
            mae["forces"] = float(torch.cat([s.forces for s in samples]).abs().mean())
        return mae


# --- model, loss, evaluation ---


def build_model(config: TrainConfig) -> DimezblNet:
    kwargs = dict(config.model)
    if config.dataset == "md17":
        kwargs.setdefault("zbl_unit", "kcal/mol")
    else:
        kwargs.setdefault("zbl_unit", "eV")
        # ZBL is an energy: for non-energy targets its weight is learnable and starts at 0
        kwargs.setdefault("zbl_learnable_scale", config.target not in QM9_ENERGY_TARGETS)
    return DimezblNet(zbl=config.zbl, **kwargs)


def _energy_and_forces(module, batch: Batch, need_forces: bool, create_graph: bool):
    """Energies and forces (None unless need_forces) of a DimezblNet, possibly DDP-wrapped: pos is
    a leaf of this function's own, so force training linearises the bases in it (`first_order`)."""
    if not need_forces:
        return module(batch.z, batch.pos, batch.batch), None
    return _module_energy_and_forces(module, batch.z, batch.pos.detach(), batch.batch, create_graph)


def compute_loss(module, batch: Batch, config: TrainConfig, amp: bool = False):
    """MAE of the target (QM9), or DimeNet's MD17 loss MAE_E + rho * MAE_F."""
    need_forces = batch.forces is not None
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and not need_forces):
        energy, forces = _energy_and_forces(module, batch, need_forces, create_graph=True)
    loss = (energy.float() - batch.target).abs().mean()
    if need_forces:
        loss = loss + config.force_weight * (forces - batch.forces).abs().mean()
    return loss


def evaluate(model, run_data: RunData, subset, device) -> dict:
    """MAE and RMSE of energy (target) and forces over a subset, in training units."""
    model.eval()
    abs_e, sq_e, abs_f, sq_f, n_f = 0.0, 0.0, 0.0, 0.0, 0
    for batch in run_data.batches(subset):
        batch = batch.to(device)
        need_forces = batch.forces is not None
        with torch.set_grad_enabled(need_forces):
            energy, forces = _energy_and_forces(model, batch, need_forces, create_graph=False)
        error = (energy.detach() - batch.target).double()
        abs_e, sq_e = abs_e + float(error.abs().sum()), sq_e + float((error**2).sum())
        if need_forces:
            error = (forces.detach() - batch.forces).double()
            abs_f, sq_f, n_f = abs_f + float(error.abs().sum()), sq_f + float((error**2).sum()), n_f + error.numel()
    n = len(subset)
    metrics = {"energy_mae": abs_e / n, "energy_rmse": math.sqrt(sq_e / n)}
    if n_f:
        metrics.update(forces_mae=abs_f / n_f, forces_rmse=math.sqrt(sq_f / n_f))
    model.train()
    return metrics


def to_reporting_units(metrics: dict, config: TrainConfig) -> dict:
    """QM9: meV for the energy-like targets (one conversion, qm9_to_reporting_units); MD17:
    kcal/mol and kcal/mol/A unchanged."""
    if config.dataset != "qm9":
        return dict(metrics)
    return {k: float(qm9_to_reporting_units(v, config.target)) for k, v in metrics.items()}


def reporting_unit(config: TrainConfig) -> dict:
    if config.dataset == "qm9":
        return {"energy": QM9_REPORTING_UNITS[config.target]}
    return {"energy": "kcal/mol", "forces": "kcal/mol/A"}


# --- checkpoints (atomic write, safe load) and provenance ---


def atomic_torch_save(obj, path: Path):
    """torch.save to a temporary file in the same directory, then rename: a checkpoint is
    either the old one or the new one, never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu") -> dict:
    """Load a checkpoint safely (weights_only=True: tensors and plain containers only)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # truncated or not a checkpoint
        raise ValueError(f"checkpoint {path} is corrupt or not a DimezblNet checkpoint ({error}); "
                         "delete it to start over, or resume from another one") from error
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= set(checkpoint):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(f"{path} is a torch file but not a DimezblNet checkpoint (it needs the keys 'config' and "
                         f"'model'; it holds {found}): give the checkpoint_best.pt or checkpoint_last.pt of a run")
    return checkpoint


def git_state() -> dict:
    """The code that runs: git commit and dirty flag of the repository as they were when this
    module was imported (a long job keeps the code it loaded even if commits follow), and the
    sha256 of dimezbl_core.py as loaded."""
    return dict(_GIT_AT_IMPORT)


def _git_state_now() -> dict:
    def run(*args):
        return subprocess.run(["git", *args], cwd=REPOSITORY_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip()  # fmt: skip
    try:
        # dirty: uncommitted changes to the code; results/ is excluded, since a run rewrites the
        # committed tables, figures and executed notebooks there itself
        changes = run("status", "--porcelain", "--", ".", ":(exclude)results")
        commit = run("rev-parse", "HEAD") or None
    except (OSError, subprocess.SubprocessError):
        commit = changes = None
    if commit is None and os.environ.get("DIMEZBL_GIT_COMMIT"):
        # a copy of the tree without .git (a GPU node, a tarball): the commit it was copied from,
        # as declared by whoever copied it; dimezbl_core_sha256 lets a reader check the claim
        return {"commit": os.environ["DIMEZBL_GIT_COMMIT"], "dirty": None,
                "commit_source": "DIMEZBL_GIT_COMMIT (no git repository here)"}
    return {"commit": commit, "dirty": None if commit is None else bool(changes)}


_GIT_AT_IMPORT = {**_git_state_now(), "dimezbl_core_sha256": _sha256(Path(__file__).read_bytes())}


def hardware_description(device: torch.device) -> dict:
    info = {"device": str(device), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
    return info


def software_versions() -> dict:
    import torch_geometric

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torch_geometric": torch_geometric.__version__, "numpy": np.__version__}  # fmt: skip


def _json_dump_atomic(obj, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class TrainingDiverged(RuntimeError):
    """A NaN or inf loss; the last good checkpoint is kept."""


# --- the loop ---


def _distributed_context():
    """(rank, world_size) under torchrun (gloo on the CPU, nccl on CUDA), else (0, 1)."""
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class RunLock:
    """An exclusive lock on a run directory while a process trains it (`<run_dir>/.training.lock`,
    holding the pid): a second process that would train the same run (a notebook while a
    background job trains it, say) stops with an error instead of interleaving checkpoints and
    learning curves. fcntl.flock: released by the kernel when the holder exits, even on kill -9,
    so a crashed run never leaves a stale lock. Where fcntl does not exist (Windows) it does nothing."""

    def __init__(self, run_dir: Path):
        self.path, self.file = Path(run_dir) / ".training.lock", None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.seek(0)
            holder = self.file.read().strip() or "?"
            self.file.close()
            self.file = None
            raise RuntimeError(f"{self.path.parent} is being trained by another process (pid {holder}); "
                               "let it finish or stop it before training this run here") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # closing releases the lock
            self.file = None
        return False


def train(config: TrainConfig, resume: bool = True, progress: bool = True,
          run_dir: Optional[Path] = None) -> dict:
    """Train one model under DimeNet's protocol; returns the final metrics (also written to
    <run_dir>/metrics.json). Resumes from <run_dir>/checkpoint_last.pt when it exists. The run
    directory is locked meanwhile (RunLock): another process training the same run is an error."""
    rank, _ = _distributed_context()
    run_dir = Path(run_dir) if run_dir is not None else config.run_dir
    if rank != 0:  # one lock per run: rank 0 holds it for the whole job
        return _train(config, resume, progress, run_dir)
    with RunLock(run_dir):
        return _train(config, resume, progress, run_dir)


def _train(config: TrainConfig, resume: bool, progress: bool, run_dir: Path) -> dict:
    from tqdm.auto import tqdm

    if config.compile and config.dataset == "md17":
        raise ValueError(
            "compile=True cannot train on forces: the force loss differentiates F = -dE/dR a second "
            "time, and torch.compile's AOT autograd does not differentiate its backward again; use "
            "compile=True for QM9 targets (energies only) and compile=False for MD17")
    rank, world_size = _distributed_context()
    device = select_device(config.device)
    if world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
    last_path, best_path = run_dir / "checkpoint_last.pt", run_dir / "checkpoint_best.pt"
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    model = build_model(config).to(device=device, dtype=dtype)
    ema = ExponentialMovingAverage(model, config.ema_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate, amsgrad=True,
                                 eps=config.amsgrad_eps)  # fmt: skip
    data = RunData(config, model.zbl)
    state = {"step": 0, "best_valid": math.inf, "best_step": -1, "evals_since_best": 0,
             "train_time_s": 0.0, "loss_sum": 0.0, "loss_count": 0, "segments": []}  # fmt: skip
    if resume and last_path.exists():
        checkpoint = load_checkpoint(last_path)
        if _config_mismatch(checkpoint["config"], config):  # what a finished run may differ in, too
            raise ValueError(f"{last_path} was written with another config; use another run "
                             "directory or delete the checkpoint to start over")
        if rank == 0:  # a resumed run is unfinished: metrics of an earlier stop (by max_wall_s) are stale
            (run_dir / "metrics.json").unlink(missing_ok=True)
        model.load_state_dict(checkpoint["model"])
        ema.shadow = checkpoint["ema"]
        optimizer.load_state_dict(checkpoint["optimizer"])
        torch.set_rng_state(checkpoint["rng_cpu"])
        state.update(checkpoint["state"])
        if rank == 0:
            print(f"resuming {run_dir} from step {state['step']}", flush=True)
    elif rank == 0:
        for stale in (run_dir / "learning_curve.csv", run_dir / "metrics.json"):
            stale.unlink(missing_ok=True)
    # the code and threads of each process that trains this run (a resumed run may span commits)
    state["segments"] = [*state["segments"],
                         {**git_state(), "from_step": state["step"], "torch_threads": torch.get_num_threads(),
                          "hardware": hardware_description(device), "swish": CompiledKernels.state(),
                          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}]
    if rank == 0 and CompiledKernels.enabled:
        print(f"swish: {CompiledKernels.state()} (compiled at the first step)", flush=True)
    module = model
    if world_size > 1:
        module = torch.nn.parallel.DistributedDataParallel(model)
    if config.compile:
        module = torch.compile(module, dynamic=True)
    eval_model = copy.deepcopy(model)
    checkpoint_every = config.checkpoint_every or config.eval_every
    amp = config.amp and device.type == "cuda"

    def save_last():
        if rank == 0:
            atomic_torch_save({"model": model.state_dict(), "ema": ema.shadow,
                               "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
                               "state": dict(state), "config": config.to_dict()}, last_path)  # fmt: skip

    curve_path = run_dir / "learning_curve.csv"
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        _json_dump_atomic(config.to_dict(), run_dir / "config.json")
        _truncate_curve(curve_path, state["step"])
    bar = tqdm(total=config.max_steps, initial=state["step"], disable=not progress or rank != 0,
               desc=f"{config.model_name} {config.dataset}/{config.target}", dynamic_ncols=True)  # fmt: skip
    start = time.perf_counter() - state["train_time_s"]
    stop_reason = "max_steps"
    model.train()
    while state["step"] < config.max_steps:
        step = state["step"]
        if config.max_wall_s is not None and time.perf_counter() - start > config.max_wall_s:
            stop_reason = "max_wall_s"
            break
        batch = data.train_batch(step, rank, world_size).to(device)
        lr = learning_rate_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = compute_loss(module, batch, config, amp)
        if not torch.isfinite(loss):
            bar.close()
            raise TrainingDiverged(
                f"loss is {float(loss.detach())} at step {step} (training batch {step % max(1, len(data.train) // config.batch_size)} "
                f"of epoch {step // max(1, len(data.train) // config.batch_size)}); nothing was updated and the last good checkpoint "
                f"{last_path} is kept. Check the data of that batch, or lower the learning rate."
            )
        optimizer.zero_grad(set_to_none=True)
        # only the weights: for force losses, skips the second derivatives in the positions
        loss.backward(inputs=trainable)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip_norm)
        optimizer.step()
        ema.update(model)
        state["step"] = step + 1
        state["loss_sum"] += float(loss.detach())  # since the last evaluation
        state["loss_count"] += 1
        bar.update(1)
        if state["step"] % config.eval_every == 0 or state["step"] == config.max_steps:
            ema.copy_to(eval_model)
            valid = evaluate(eval_model, data, data.valid, device)
            score = valid["energy_mae"] + (config.force_weight * valid["forces_mae"]
                                           if "forces_mae" in valid else 0.0)  # fmt: skip
            improved = score < state["best_valid"]
            if improved:
                state.update(best_valid=score, best_step=state["step"], evals_since_best=0)
                if rank == 0:
                    atomic_torch_save({"model": ema.shadow, "config": config.to_dict(),
                                       "step": state["step"], "valid": valid,
                                       "offset": list(data.offset), "elements": data.elements},
                                      best_path)  # fmt: skip
            else:
                state["evals_since_best"] += 1
            state["train_time_s"] = time.perf_counter() - start
            row = {"step": state["step"], "lr": lr, "train_loss": state["loss_sum"] / state["loss_count"],
                   **{f"valid_{k}": v for k, v in to_reporting_units(valid, config).items()},
                   "wall_s": round(state["train_time_s"], 2)}  # fmt: skip
            state.update(loss_sum=0.0, loss_count=0)
            if rank == 0:
                _append_curve(curve_path, row)
            bar.set_postfix(loss=f"{row['train_loss']:.4g}", valid_mae=f"{row['valid_energy_mae']:.4g}",
                            lr=f"{lr:.2e}")  # fmt: skip
            patience = config.early_stopping_patience
            if patience is not None and state["evals_since_best"] >= patience:
                stop_reason = "early_stopping"
                save_last()
                break
        if state["step"] % checkpoint_every == 0:
            state["train_time_s"] = time.perf_counter() - start
            save_last()
    bar.close()
    state["train_time_s"] = time.perf_counter() - start
    save_last()
    return finish_run(config, data, run_dir, device, state, stop_reason, model, rank, world_size)


def _truncate_curve(path: Path, step: int):
    """Drop learning-curve rows written after the checkpoint we resume from."""
    if not path.exists():
        return
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept = [r for r in rows if int(r["step"]) <= step]
    if len(kept) != len(rows):
        with open(path, "w", newline="") as handle:
            if kept:
                writer = csv.DictWriter(handle, fieldnames=list(kept[0]))
                writer.writeheader()
                writer.writerows(kept)


def _append_curve(path: Path, row: dict):
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def finish_run(config, data, run_dir, device, state, stop_reason, model, rank=0,
               world_size=1) -> dict:
    """Evaluate the best (EMA) model once on validation and test; write metrics and provenance."""
    best_path = run_dir / "checkpoint_best.pt"
    eval_model = build_model(config).to(device=device, dtype=getattr(torch, config.dtype))
    eval_model.load_state_dict(load_checkpoint(best_path)["model"])
    valid = to_reporting_units(evaluate(eval_model, data, data.valid, device), config)
    test = to_reporting_units(evaluate(eval_model, data, data.test, device), config)
    baseline = to_reporting_units(
        {f"{k}_mae": v for k, v in data.mean_predictor_mae(data.test).items()}, config)
    metrics = {"valid": valid, "test": test, "test_mean_predictor": baseline,
               "units": reporting_unit(config), "best_step": state["best_step"],
               "steps": state["step"], "stop_reason": stop_reason,
               "n_train": len(data.train), "n_valid": len(data.valid), "n_test": len(data.test),
               "target_offset": offset_record(data.offset, data.offset_kind),
               "offset_method": data.offset_method,
               "final_learning_rate": learning_rate_at(max(state["step"] - 1, 0), config)}
    if rank == 0:
        if eval_model.zbl is not None:  # before metrics.json, which marks the run done
            _write_zbl_term_file(eval_model, data, run_dir)
        _json_dump_atomic(metrics, run_dir / "metrics.json")
        _json_dump_atomic({
            "config": config.to_dict(), "seed": config.seed, "git": git_state(),
            "software": software_versions(), "hardware": hardware_description(device),
            "segments": state["segments"],  # each process that trained it: code, first step
            "train_wall_time_s": round(state["train_time_s"], 2), "world_size": world_size,
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "data": {"dataset": config.dataset, "target": config.target,
                     "source": "qm9pack (QM9, B3LYP/6-31G(2df,p))" if config.dataset == "qm9"
                     else f"MD17 source={config.md17_source}",
                     "content_sha256": data.data_sha256},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, run_dir / "provenance.json")  # fmt: skip
    return metrics


def evaluate_checkpoint(path, subset: str = "test", device: str = "auto") -> dict:
    """Evaluate a saved (best or last) checkpoint on the valid or test set of its own config."""
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"])
    target_device = select_device(device)
    model = build_model(config).to(device=target_device, dtype=getattr(torch, config.dtype))
    weights = checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"]
    model.load_state_dict(weights)
    data = RunData(config, model.zbl)
    metrics = evaluate(model, data, getattr(data, subset), target_device)
    return {"subset": subset, "metrics": to_reporting_units(metrics, config),
            "units": reporting_unit(config)}  # fmt: skip


ZBL_TERM_FILE = "zbl_term.json"  # in a DimezblNet run directory, beside metrics.json


def zbl_term_summary(model: DimezblNet, data: RunData, subset: str = "test") -> dict:
    """What the ZBL term of a trained DimezblNet adds to its predictions on one subset.

    The term is weight x E_zbl(molecule): E_zbl (switched, in the ZBL module's unit: eV for QM9,
    kcal/mol for MD17) depends on the geometry only; the weight is the fixed 1 for energies and is
    learned, starting at 0, for the other QM9 targets. Returns the weight, E_zbl's mean and std over
    the subset's molecules, and the contribution weight x E_zbl in the target's reporting unit
    (Tables 1 and 2). Set its std (over molecules) beside the test MAE: a contribution whose spread
    is comparable to the error is not harmless, even with a weight near 0. "Molecules" are the
    subset's entries: QM9 molecules, or MD17 configurations of one molecule (`n_molecules` counts
    those; the key keeps its name so that the committed zbl_term.json files stay readable).
    """
    if model.zbl is None:
        raise ValueError("this model has no ZBL term (a DimeNet run): give a DimezblNet checkpoint")
    if subset not in ("train", "valid", "test"):
        raise ValueError(f"unknown subset {subset!r}: use 'train', 'valid' or 'test'")
    part = getattr(data, subset)
    # E_zbl itself (float64); the weight multiplies it below
    zbl_energy = molecule_zbl_energies([part[i] for i in range(len(part))], model.zbl, unit_weight=True).numpy()
    weight = float(model.zbl.scale.detach())
    contribution = weight * zbl_energy  # the target's training unit
    if data.config.dataset == "qm9":
        contribution = qm9_to_reporting_units(contribution, data.config.target)
    return {"subset": subset, "n_molecules": int(zbl_energy.size), "zbl_weight": weight,
            "zbl_weight_learned": isinstance(model.zbl.scale, nn.Parameter),
            "zbl_energy": {"mean": float(zbl_energy.mean()), "std": float(zbl_energy.std()),
                           "unit": model.zbl.unit},
            "contribution": {"mean": float(contribution.mean()), "std": float(contribution.std()),
                             "unit": reporting_unit(data.config)["energy"]}}  # fmt: skip


def write_zbl_term(run_dir, subset: str = "test", device: str = "cpu", data_dir=None) -> dict:
    """`zbl_term_summary` of a finished DimezblNet run (its best checkpoint, EMA weights), written
    atomically to <run_dir>/zbl_term.json with the commit that computed it. train() writes it at the
    end of every DimezblNet run; this writes it for runs that finished before it did."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint_best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the ZBL term needs the run's best checkpoint")
    model, config = load_trained_model(path, device, data_dir)
    return _write_zbl_term_file(model, RunData(config, model.zbl), run_dir, subset)


def _write_zbl_term_file(model: DimezblNet, data: RunData, run_dir: Path, subset: str = "test") -> dict:
    summary = {**zbl_term_summary(model, data, subset), "checkpoint": "checkpoint_best.pt (EMA weights)",
               "git": git_state(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _json_dump_atomic(summary, run_dir / ZBL_TERM_FILE)
    return summary


def zbl_terms(runs: pd.DataFrame, results_dir=None) -> pd.DataFrame:
    """One row per DimezblNet run of a `collect_runs` table: the learned ZBL weight and what the
    term adds (from each run's zbl_term.json) beside the run's test MAE, the DimeNet test MAE of
    the same seed and the MAE of predicting the training mean (how much the target itself varies).
    Runs without zbl_term.json get NaN (write it with `write_zbl_term`)."""
    rows = []
    for run in runs[runs["model"].str.startswith("dimezblnet")].itertuples(index=False):
        path = results_path(results_dir, run.run_dir, ZBL_TERM_FILE)
        fix = (f"restore it from git or write it again from the run's best checkpoint: python dimezbl_core.py "
               f"zbl-term {path.parent}")
        term = _read_run_file(path, fix) if path.exists() else None
        dimenet = runs[(runs["target"] == run.target) & (runs["seed"] == run.seed)
                       & (runs["model"] == run.model.replace("dimezblnet", "dimenet"))]["test_energy_mae"]
        rows.append({
            "target": run.target, "seed": run.seed,
            "zbl_weight": term["zbl_weight"] if term else math.nan,
            "zbl_energy_mean": term["zbl_energy"]["mean"] if term else math.nan,
            "zbl_energy_std": term["zbl_energy"]["std"] if term else math.nan,
            "zbl_energy_unit": term["zbl_energy"]["unit"] if term else None,
            "contribution_mean": term["contribution"]["mean"] if term else math.nan,
            "contribution_std": term["contribution"]["std"] if term else math.nan,
            "test_energy_mae": run.test_energy_mae,
            "dimenet_test_energy_mae": float(dimenet.iloc[0]) if len(dimenet) else math.nan,
            "mean_predictor_energy_mae": run.mean_predictor_energy_mae,
            "unit": run.energy_unit, "run_dir": run.run_dir,
            "zbl_term_commit": term["git"]["commit"] if term and term.get("git") else None,
        })  # fmt: skip
    return pd.DataFrame(rows)


def zbl_terms_header(dataset: str) -> list:
    """The provenance block of tables/zbl_term_<dataset>.csv (written as '# ' lines)."""
    structures = "molecules" if dataset == "qm9" else "configurations"
    return [
        f"ZBL term of each DimezblNet run ({dataset}): the ZBL weight (fixed 1 or learned), E_ZBL of the test "
        f"{structures} (mean, std over them; zbl_energy_unit) and weight x E_ZBL (contribution; unit), from each "
        "run's zbl_term.json (best checkpoint, EMA weights)",
        "Beside it: the run's test energy MAE, DimeNet's test MAE with the same seed and the MAE of predicting the "
        "training mean (unit)",
        "NaN: the run has no zbl_term.json (its checkpoint was not on the machine that wrote the table); write it "
        "with: python dimezbl_core.py zbl-term RUN_DIR",
        f"Git commit that computed each row: column zbl_term_commit; table written at {git_state().get('commit')}",
        f"Written: {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {platform.node() or '?'}",
    ]


def write_zbl_terms(runs: pd.DataFrame, dataset: str, results_dir=None) -> pd.DataFrame:
    """`zbl_terms` of a dataset's runs, written atomically to <results_dir>/tables/zbl_term_<dataset>.csv
    under a '# ' provenance block (`zbl_terms_header`; read it back with pandas.read_csv(path, comment='#'))."""
    table = zbl_terms(runs[runs["dataset"] == dataset], results_dir)
    header = "".join(f"# {line}\n" for line in zbl_terms_header(dataset))
    _atomic_write_bytes(results_path(results_dir, "tables", f"zbl_term_{dataset}.csv"),
                        (header + table.to_csv(index=False)).encode("utf-8"))
    return table


def add_train_arguments(parser):
    parser.add_argument("--dataset", choices=("qm9", "md17"), required=True)
    parser.add_argument("--target", required=True, help="QM9 target (U0, mu, ...) or MD17 molecule")
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES))
    parser.add_argument("--no-zbl", action="store_true", help="train the plain DimeNet baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    parser.add_argument("--out-dir", default=None, help="default results/runs")
    parser.add_argument("--data-dir", default=None, help="default $DIMEZBL_DATA_DIR or data/")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a TrainConfig field, e.g. --set max_steps=100 "
                        "--set 'model={\"hidden_channels\": 64}'")  # fmt: skip
    parser.add_argument("--no-resume", action="store_true", help="start over even if a checkpoint exists")
    parser.add_argument("--no-progress", action="store_true")


def parse_set_arguments(items) -> dict:
    """`--set NAME=JSON` items as a dict (a value that is not JSON stays a string)."""
    values = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            values[key] = json.loads(value)
        except json.JSONDecodeError:
            values[key] = value
    return values


def run_models_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python dimezbl_core.py run-models --profile cpu --dataset md17 --targets benzene ...`: the
    training part of notebooks 03/04 (run_models) from the command line, e.g. for a long profile
    trained in chunks in the background; prints one line per run, exit status 3 if one diverges."""
    import argparse

    parser = argparse.ArgumentParser(prog="python dimezbl_core.py run-models", description=(
        "Train DimeNet and DimezblNet for targets of a profile, seed by seed (both models of a seed "
        "together); finished runs are reused, interrupted ones resume from their checkpoints."))
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES))
    parser.add_argument("--dataset", choices=("qm9", "md17"), required=True)
    parser.add_argument("--targets", nargs="+", required=True, help="QM9 targets or MD17 molecules")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the profile's seeds")
    parser.add_argument("--models", nargs="+", choices=tuple(MODEL_RECIPES), default=("dimenet", "dimezblnet"),
                        help="models to train (MODEL_RECIPES; default: DimeNet and the literal DimezblNet)")
    parser.add_argument("--results-dir", default=None, help="default <repository>/results")
    parser.add_argument("--data-dir", default=None, help="default $DIMEZBL_DATA_DIR or <repository>/data")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default torch's); with two jobs on two cores use 1 each")
    parser.add_argument("--reuse-committed", action="store_true",
                        help="count finished runs without their checkpoints as done (see run_models)")
    parser.add_argument("--no-training", action="store_true",
                        help="train nothing: list the unfinished runs and collect the finished ones")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=JSON",
                        help="override a TrainConfig field (runs then differ from the profile's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = parse_set_arguments(args.set)
    if args.device is not None and overrides.get("device", args.device) != args.device:
        parser.error(f"--device {args.device} and --set device={overrides['device']} disagree: give one of them")
    device = overrides.pop("device", args.device)
    try:
        run_models(args.profile, args.dataset, args.targets, args.seeds, models=args.models,
                   data_dir=args.data_dir, results_dir=args.results_dir, device=device, progress=False,
                   reuse_committed=args.reuse_committed, train_missing=not args.no_training, **overrides)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


def config_from_arguments(args) -> TrainConfig:
    overrides = parse_set_arguments(args.set)
    if args.device is not None and overrides.get("device", args.device) != args.device:
        raise ValueError(f"--device {args.device} and --set device={overrides['device']} disagree: give one of them")
    for key in ("device", "out_dir", "data_dir"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    return profile_config(args.profile, args.dataset, args.target, zbl=not args.no_zbl,
                          seed=args.seed, **overrides)  # fmt: skip


# =============================================================================================
# --- Reporting: the paper's Tables 1 and 2, quoted verbatim ---
# =============================================================================================
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
PAPER_TABLE1_UNIT_NOTE = ("units: a0^3 and a0^2 of the paper are bohr^3 and bohr^2; Cv is in "
                          "cal/(mol K), printed '(K*cal)/mol' in the paper")

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
MD17_LABELS = {"aspirin": "Aspirin", "benzene": "Benzene", "ethanol": "Ethanol",
               "malonaldehyde": "Malonaldehyde", "naphthalene": "Naphthalene",
               "salicylic_acid": "Salicylic acid", "toluene": "Toluene", "uracil": "Uracil"}
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


# =============================================================================================
# --- Reporting: the results directory ---
# =============================================================================================

def results_path(results_dir=None, *parts) -> Path:
    """<results_dir>/<parts>: None is <repository>/results; a relative path is taken from the
    repository root (as TrainConfig.out_dir), so notebooks and `make` agree whatever their cwd."""
    root = Path(results_dir) if results_dir is not None else Path("results")
    if not root.is_absolute():
        root = REPOSITORY_ROOT / root
    return root.joinpath(*parts)


def _relative_to_results(path, results_dir=None) -> str:
    """A run directory as written in tables: relative to the results directory when inside it."""
    path, root = Path(path).resolve(), results_path(results_dir).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


# =============================================================================================
# --- Reporting: training every (target, model, seed) ---
# =============================================================================================

# The models a profile can train: name -> profile_config overrides. The ZBL recipes (docs/fair.md):
# (a) "dimezblnet", the literal Eq. 8 added with weight 1 (enveloped at the model cutoff only);
# (b) "dimezblnet_switched", the same switched off beyond 0.75 x the sum of covalent radii (MACE's
#     reach, shortened so that it is zero at every bond length of the QM9 and generated MD17 data:
#     their smallest r / (rcov_i + rcov_j) is 0.78, C-N triple bonds of QM9);
# (c) "dimezblnet_interpolated", DeePMD-kit's DP+ZBL blend (network off, ZBL on, below 0.4-0.7 A).
MODEL_RECIPES = {
    "dimenet": {"zbl": False},
    "dimezblnet": {"zbl": True},
    "dimezblnet_switched": {"zbl": True, "name": "dimezblnet_switched", "model.zbl_reach": "covalent",
                            "model.zbl_covalent_factor": 0.75},
    "dimezblnet_interpolated": {"zbl": True, "name": "dimezblnet_interpolated", "model.zbl_combine": "interpolate"},
}
MODEL_ZBL = {name: recipe["zbl"] for name, recipe in MODEL_RECIPES.items()}  # model name -> TrainConfig.zbl
MODEL_LABELS = {"dimenet": "DimeNet", "dimezblnet": "DimezblNet", "dimezblnet_switched": "DimezblNet (switched)",
                "dimezblnet_interpolated": "DimezblNet (interpolated)"}
# Config fields that do not change what a finished run measured (out_dir: results may move).
_IGNORED_WHEN_REUSING = ("device", "out_dir")
# Safety stops: a run that did not stop by one is the same run under any other value of it, so a
# finished run is reused, and an unfinished one resumed, when only these differ.
_SAFETY_LIMITS = ("max_wall_s",)


def generated_md17_path(molecule: str, profile: str, data_dir=None) -> Path:
    """<data_dir>/md17/generated/<profile>/<molecule>.npz: one GFN2-xTB data set per profile."""
    return md17_default_path(molecule, "generated", data_dir).parent / profile / f"{molecule}.npz"


def profile_seeds(profile: str) -> tuple:
    """The seeds a profile trains every model with."""
    if profile not in PROFILE_SEEDS:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILE_SEEDS)}")
    return PROFILE_SEEDS[profile]


def _md17_configs_needed(config: TrainConfig) -> int:
    """The fewest configurations RunData can split for this config (n_train + n_valid + test)."""
    n_train = config.n_train or 1000
    n_valid = config.n_valid if config.n_valid is not None else 1000
    return n_train + n_valid + (config.n_test or 1)


# The generator settings that shape the data (recorded in the data set's JSON sidecar).
_MD17_GENERATION_DEFAULTS = {
    name: parameter.default for name, parameter in inspect.signature(generate_md17).parameters.items()
    if name in ("temperature_k", "timestep_fs", "sample_every", "seed", "equilibration_steps", "friction_per_fs")
}


def ensure_md17_data(molecule: str, n_configs: int, data_dir=None, progress: bool = True,
                     path=None, **generation) -> Path:
    """The generated (GFN2-xTB) data file of `molecule` with at least `n_configs` configurations,
    made with the generator settings `generation` (generate_md17 keywords, e.g. sample_every):
    used as it is when large enough and made with those settings (never shrunk), else generated
    or extended (resumable; other settings start over)."""
    path = Path(path) if path is not None else md17_default_path(molecule, "generated", data_dir)
    sidecar = path.with_suffix(".json")
    if path.is_file():
        with np.load(path) as npz:
            available = int(npz["E"].shape[0])
        made_with = json.loads(sidecar.read_text()) if sidecar.exists() else {}
        wanted = {**_MD17_GENERATION_DEFAULTS, **generation}
        changed = sorted(k for k, v in wanted.items() if k in made_with and made_with[k] != v)
        if available >= n_configs and not changed:
            return path
        why = (f"made with other settings ({', '.join(changed)})" if changed
               else f"{available} configurations, {n_configs} needed")
        print(f"{molecule}: regenerating {path}: {why}", flush=True)
    torch_threads = torch.get_num_threads()
    try:
        return generate_md17(molecule, n_configs, out_path=path, data_dir=data_dir, progress=progress,
                             **generation)
    finally:  # the generator pins OpenMP (shared with torch) to one thread for tblite
        torch.set_num_threads(torch_threads)


def _config_mismatch(stored: dict, config: TrainConfig, stop_reason: Optional[str] = None) -> list:
    """Fields in which a run directory's config.json differs from `config`. A safety limit
    (_SAFETY_LIMITS: max_wall_s) counts only for a run that stopped by it (stop_reason)."""
    ignored = _IGNORED_WHEN_REUSING + (() if stop_reason in _SAFETY_LIMITS else _SAFETY_LIMITS)
    return _fields_differing(stored, config.to_dict(), ignored)


def _fields_differing(stored: dict, wanted: dict, ignored: Sequence[str]) -> list:
    """Sorted config fields whose values differ between two config dicts, `ignored` aside."""
    return sorted(key for key in set(stored) | set(wanted)
                  if key not in ignored and stored.get(key) != wanted.get(key))


def run_models(profile: str, dataset: str, targets: Sequence[str], seeds: Optional[Sequence[int]] = None,
               models: Sequence[str] = ("dimenet", "dimezblnet"), data_dir=None, results_dir=None,
               progress: bool = True, overwrite: bool = False, md17_configs: Optional[int] = None,
               reuse_committed: bool = False, train_missing: bool = True, **overrides) -> pd.DataFrame:
    """Train every (target, model, seed) of a profile; return their metrics (`collect_runs`).

    targets: QM9 targets (QM9_TARGETS) or MD17 molecules (MD17_MOLECULES). seeds: None is
    the profile's (PROFILE_SEEDS). Each model gets the same data, splits, budget and seed.
    overrides: TrainConfig fields (e.g. max_steps=20, n_train=64, device="cpu"); None values
    mean "the profile's". Runs go to <results_dir>/runs/<profile>/<dataset>/<target>/.

    Resumable: a run whose metrics.json and checkpoint_best.pt exist with the same config (device
    and out_dir aside) is reused without training; an interrupted run resumes from its checkpoint
    (train). reuse_committed=True also reuses a finished run whose checkpoint is not here
    (metrics.json and config.json only: runs committed by an earlier session, whose checkpoints are
    not committed), so that a long profile can be assembled over several sessions; such runs enter
    the tables and learning curves, not the plots that need the model (predict_runs skips them).
    train_missing=False trains nothing: unfinished or absent runs are named and left out (e.g. to
    rebuild tables and figures from finished runs while another process trains the rest).
    A run directory holding another config is an error unless overwrite=True (then it is trained
    again from scratch). Runs are trained seed by seed, both models of a seed together. Prints one
    line per run (reused, or trained: time, MAE).
    MD17 (source "generated"): when a run needs training, the GFN2-xTB data are generated first
    where missing, with md17_configs configurations (None: the profile's, PROFILE_MD17_GENERATION).
    """
    if dataset not in ("qm9", "md17"):
        raise ValueError(f"unknown dataset {dataset!r}: use 'qm9' or 'md17'")
    targets = [str(t) for t in ([targets] if isinstance(targets, str) else targets)]
    if not targets:
        raise ValueError("no targets given: name QM9 targets or MD17 molecules")
    if dataset == "qm9":
        unknown = [t for t in targets if t not in QM9_TARGETS]
        if unknown:
            raise ValueError(f"unknown QM9 targets {unknown}: use some of {QM9_TARGETS}")
    else:
        targets = [md17_molecule_name(t) for t in targets]
    unknown = [m for m in models if m not in MODEL_ZBL]
    if unknown:
        raise ValueError(f"unknown models {unknown}: use some of {tuple(MODEL_ZBL)}")
    seeds = [int(s) for s in (profile_seeds(profile) if seeds is None else seeds)]
    if not seeds:
        raise ValueError("no seeds given (None: the profile's seeds)")
    fields = {key: value for key, value in overrides.items() if value is not None}
    fields["out_dir"] = str(results_path(results_dir, "runs"))
    if data_dir is not None:
        fields["data_dir"] = str(data_dir)

    for target in targets:
        if dataset == "md17" and fields.get("md17_source", "generated") == "generated":
            # one generated data set per profile, so profiles never overwrite each other's data
            fields["md17_path"] = portable_path(generated_md17_path(target, PROFILE_MD17_DATA.get(profile, profile),
                                                                    data_dir))
        # seed by seed, both models of a seed together: an interrupted profile leaves complete pairs
        configs = [profile_config(profile, dataset, target, seed=seed, **{**MODEL_RECIPES[model], **fields})
                   for seed in seeds for model in models]
        to_train = []  # (config, resume) of the runs that are not finished
        for config in configs:
            run_dir = config.run_dir
            stored_path, metrics_path = run_dir / "config.json", run_dir / "metrics.json"
            resume = True
            if stored_path.exists():
                stop_reason = (_read_run_file(metrics_path, "restore it from git or train the run again").get(
                    "stop_reason") if metrics_path.exists() else None)
                mismatch = _config_mismatch(json.loads(stored_path.read_text()), config, stop_reason)
                if mismatch and set(mismatch) <= set(_SAFETY_LIMITS) and (run_dir / "checkpoint_last.pt").exists():
                    # stopped by the old safety limit: continue it from its last checkpoint under the new one
                    print(f"continuing {_relative_to_results(run_dir, results_dir)} (stopped by {stop_reason}) "
                          f"with {stop_reason}={getattr(config, stop_reason)}", flush=True)
                    to_train.append((config, True))
                    continue
                if mismatch and not overwrite:
                    raise ValueError(
                        f"{run_dir} holds a run with another config (differs in {', '.join(mismatch)}); "
                        "pass overwrite=True to train it again, or use another results_dir")
                if not mismatch and metrics_path.exists():
                    has_best = (run_dir / "checkpoint_best.pt").exists()
                    stale = has_best and stale_best_checkpoint(run_dir)
                    if has_best and not stale:
                        print(f"reusing {_relative_to_results(run_dir, results_dir)} (same config)", flush=True)
                        continue
                    if reuse_committed:
                        why = f"{stale}, not used" if stale else "its checkpoint is not here"
                        print(f"reusing {_relative_to_results(run_dir, results_dir)} (same config; metrics "
                              f"only: {why})", flush=True)
                        continue
                    if stale:
                        raise ValueError(f"{stale}; delete the checkpoints of {run_dir} to train it again, "
                                         "or pass reuse_committed=True to use its metrics only")
                resume = not mismatch
            to_train.append((config, resume))
        if to_train and not train_missing:
            print(f"not training {len(to_train)} unfinished run(s) (train_missing=False), left out: "
                  + ", ".join(_relative_to_results(c.run_dir, results_dir) for c, _ in to_train), flush=True)
            to_train = []
        if to_train and dataset == "md17" and configs[0].md17_source == "generated":  # data only when needed
            generation = dict(PROFILE_MD17_GENERATION.get(profile, {}))
            wanted = md17_configs or generation.pop("n_configs", 0)
            generation.pop("n_configs", None)
            ensure_md17_data(target, max(wanted, _md17_configs_needed(configs[0])), data_dir, progress,
                             path=repository_path(configs[0].md17_path), **generation)
        for config, resume in to_train:
            start = time.perf_counter()
            metrics = train(config, resume=resume, progress=progress)
            test = ", ".join(f"{k} {v:.4g} {metrics['units'][k.split('_')[0]]}"
                             for k, v in metrics["test"].items() if k.endswith("_mae"))
            print(f"trained {_relative_to_results(config.run_dir, results_dir)} in "
                  f"{time.perf_counter() - start:.0f} s: test MAE {test}", flush=True)
    runs = collect_runs(profile, dataset, results_dir)
    keep = runs["target"].isin(targets) & runs["model"].isin(list(models)) & runs["seed"].isin(seeds)
    return runs[keep].reset_index(drop=True)


RUN_COLUMNS = (
    "profile", "dataset", "target", "model", "seed", "run_dir",
    "test_energy_mae", "test_forces_mae", "valid_energy_mae", "valid_forces_mae",
    "mean_predictor_energy_mae", "mean_predictor_forces_mae", "energy_unit", "forces_unit",
    "n_train", "n_valid", "n_test", "steps", "best_step", "stop_reason", "batch_size", "model_overrides",
    "num_parameters", "train_wall_time_s", "git_commit", "git_dirty", "hardware", "md17_source",
    "data_dir",
)  # fmt: skip


def _hardware_text(hardware: dict) -> str:
    if not hardware:
        return "unknown"
    chip = hardware.get("gpu") or hardware.get("cpu") or "?"
    return (f"{hardware.get('device', '?')} ({chip}), {hardware.get('cpu_count', '?')} CPU cores, "
            f"{hardware.get('torch_threads', '?')} torch threads")


def _in_order_once(texts) -> str:
    """Distinct texts in their first-seen order, joined by " + " (one per training segment)."""
    return " + ".join(dict.fromkeys(texts))


def _run_hardware_text(provenance: dict) -> str:
    """The hardware of a run: that of the process that finished it, preceded by any other hardware
    an earlier segment trained on (a run started on a GPU and resumed on a CPU names both)."""
    texts = [_hardware_text(segment["hardware"]) for segment in provenance.get("segments", [])
             if segment.get("hardware")]
    return _in_order_once([*texts, _hardware_text(provenance.get("hardware", {}))])


def _run_git(provenance: dict) -> Tuple[Optional[str], Optional[bool]]:
    """(commit, dirty) of a run: the commits of every process that trained it, in order, joined
    by " + " (a run started on a GPU copy and resumed here names both); dirty is True if any
    process ran with uncommitted changes, else None if any had no git (a declared commit)."""
    states = [segment for segment in provenance.get("segments", []) if "commit" in segment]
    states = states or [provenance.get("git", {})]
    commits = _in_order_once(state.get("commit") or "?" for state in states)  # "?": no git, none declared
    flags = [state.get("dirty") for state in states]
    dirty = True if True in flags else (None if None in flags else False)
    return commits, dirty


def _read_run_file(path: Path, fix: str) -> dict:
    """A JSON file of a run directory; unreadable or not JSON: an error naming the file and `fix`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is corrupt ({error}): {fix}") from None


def stale_best_checkpoint(run_dir) -> Optional[str]:
    """Why <run_dir>/checkpoint_best.pt does not belong to the finished run recorded beside it
    (config.json, metrics.json), or None when it does. A checkpoint is an ignored file, so it can
    outlive the committed files of its run (a pull or checkout that replaces them): its stored
    config must equal config.json (device, out_dir and safety limits aside) and its step the
    best_step of metrics.json."""
    run_dir = Path(run_dir)
    path = run_dir / "checkpoint_best.pt"
    checkpoint = load_checkpoint(path)
    retrain = _retrain_hint(run_dir)
    stored = _read_run_file(run_dir / "config.json", retrain)
    differs = _fields_differing(stored, checkpoint.get("config", {}), _IGNORED_WHEN_REUSING + _SAFETY_LIMITS)
    if differs:
        return f"{path} was written by a run with another config (differs in {', '.join(differs)})"
    metrics_path = run_dir / "metrics.json"
    if metrics_path.exists() and "step" in checkpoint:
        best_step = _read_run_file(metrics_path, retrain).get("best_step")
        if best_step is not None and int(checkpoint["step"]) != int(best_step):
            return (f"{path} holds step {int(checkpoint['step'])}, but metrics.json's best step is "
                    f"{best_step}: it is from another training of this run")
    return None


def _retrain_hint(run_dir) -> str:
    """The fix named when a run directory's files are corrupt or do not belong together."""
    return (f"restore it from git (git checkout -- {run_dir}) or train the run again (delete {run_dir}, "
            "then run_models)")


def _run_row(run_dir: Path, results_dir) -> dict:
    """One run's record from its metrics.json, config.json and provenance.json."""
    retrain = _retrain_hint(run_dir)
    metrics = _read_run_file(run_dir / "metrics.json", retrain)
    config = _read_run_file(run_dir / "config.json", retrain)
    provenance_path = run_dir / "provenance.json"
    provenance = _read_run_file(provenance_path, retrain) if provenance_path.exists() else {}
    model = TrainConfig.from_dict(config).model_name  # dimenet, dimezblnet (+ _pp for DimeNet++)
    test, valid = metrics["test"], metrics["valid"]
    baseline, units = metrics.get("test_mean_predictor", {}), metrics.get("units", {})
    commit, dirty = _run_git(provenance)
    return {
        "profile": config["profile"], "dataset": config["dataset"], "target": config["target"],
        "model": model, "seed": int(config["seed"]), "run_dir": _relative_to_results(run_dir, results_dir),
        "test_energy_mae": test["energy_mae"], "test_forces_mae": test.get("forces_mae", math.nan),
        "valid_energy_mae": valid["energy_mae"], "valid_forces_mae": valid.get("forces_mae", math.nan),
        "mean_predictor_energy_mae": baseline.get("energy_mae", math.nan),
        "mean_predictor_forces_mae": baseline.get("forces_mae", math.nan),
        "energy_unit": units.get("energy"), "forces_unit": units.get("forces"),
        "n_train": metrics["n_train"], "n_valid": metrics["n_valid"], "n_test": metrics["n_test"],
        "steps": metrics["steps"], "best_step": metrics["best_step"], "stop_reason": metrics["stop_reason"],
        "batch_size": config["batch_size"], "model_overrides": json.dumps(config["model"], sort_keys=True),
        "num_parameters": provenance.get("num_parameters"),
        "train_wall_time_s": provenance.get("train_wall_time_s"),
        "git_commit": commit, "git_dirty": dirty,
        "hardware": _run_hardware_text(provenance),
        "md17_source": config.get("md17_source") if config["dataset"] == "md17" else None,
        "data_dir": config.get("data_dir"),
    }  # fmt: skip


def collect_runs(profile: str, dataset: Optional[str] = None, results_dir=None) -> pd.DataFrame:
    """Every finished run (a metrics.json) of a profile under <results_dir>/runs, one row per run
    (RUN_COLUMNS); run_dir is relative to the results directory. Sorted in the tables' order."""
    root = results_path(results_dir, "runs", profile)
    datasets = [dataset] if dataset is not None else ["qm9", "md17"]
    rows = [_run_row(path.parent, results_dir)
            for name in datasets for path in sorted(root.glob(f"{name}/*/*_seed*/metrics.json"))]
    runs = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    if runs.empty:
        return runs
    order = {name: i for i, name in enumerate(QM9_TARGETS + MD17_MOLECULES)}
    runs = runs.assign(_order=runs["target"].map(order).fillna(len(order)))
    return runs.sort_values(["dataset", "_order", "model", "seed"]).drop(columns="_order").reset_index(drop=True)


def checkpoint_path(runs: pd.DataFrame, target: str, model: str, seed: Optional[int] = None,
                    results_dir=None) -> Path:
    """checkpoint_best.pt of one run in a `collect_runs` table (seed None: the lowest seed)."""
    rows = runs[(runs["target"] == target) & (runs["model"] == model)]
    if seed is not None:
        rows = rows[rows["seed"] == seed]
    if rows.empty:
        raise ValueError(f"no finished {model} run for {target!r}"
                         f"{'' if seed is None else f' with seed {seed}'} in these runs; train it first "
                         "(run_models)")
    run_dir = rows.sort_values("seed")["run_dir"].iloc[0]
    path = results_path(results_dir, run_dir, "checkpoint_best.pt")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the run has a metrics.json but no best checkpoint")
    stale = stale_best_checkpoint(path.parent)
    if stale:  # a FileNotFoundError: callers that leave out runs without checkpoints leave it out too
        raise FileNotFoundError(f"{stale}; delete it, or train the run again, to plot its predictions")
    return path


# =============================================================================================
# --- Reporting: Tables 1 and 2 (quoted columns beside this run's) ---
# =============================================================================================

CHANGE_METHOD = ("relative change = 100 (DimezblNet - DimeNet) / DimeNet of the test MAE per seed "
                 "(same seed, data, split and budget), negative = DimezblNet better; the mean over "
                 "seeds, with a 95% paired Student-t interval (n - 1 degrees of freedom) where there "
                 "are at least 2 seeds")


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
            cells["Mean predictor (this run)"] = (float(rows[f"mean_predictor_{quantity}_mae"].iloc[0])
                                                  if values.size else math.nan)
    if set(models) >= {"dimenet", "dimezblnet"}:
        seeds = sorted(set(by_seed["dimenet"]) & set(by_seed["dimezblnet"]))
        change = relative_change([by_seed["dimenet"][s] for s in seeds],
                                 [by_seed["dimezblnet"][s] for s in seeds])
        cells.update({"Change (this run, %)": change[0], "Change 95% low (this run, %)": change[1],
                      "Change 95% high (this run, %)": change[2]})
    return cells


def _paper_change(cells: Sequence[Optional[str]], columns: Sequence[str]) -> float:
    """100 (DimezblNet - DimeNet) / DimeNet from the paper's quoted cells (NaN where missing)."""
    values = dict(zip(columns, cells))
    try:
        dimenet, dimezblnet = float(values["DimeNet"]), float(values["DimezblNet"])
    except (TypeError, ValueError):
        return math.nan
    return 100.0 * (dimezblnet - dimenet) / dimenet


def build_table1(runs: pd.DataFrame, profile: Optional[str] = None,
                 models: Sequence[str] = ("dimenet", "dimezblnet")) -> pd.DataFrame:
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
        row.update(_this_run_cells(runs, "qm9", target, "energy", models))
        rows.append(row)
    return pd.DataFrame(rows)


def build_table2(runs: pd.DataFrame, profile: Optional[str] = None,
                 models: Sequence[str] = ("dimenet", "dimezblnet")) -> pd.DataFrame:
    """Table 2 (MD17 test MAE of energies and forces) in the paper's layout: two rows (Energy,
    Forces) per molecule in the paper's order, the paper's four columns quoted (uracil's forces:
    NOT_REPORTED), then the "this run" columns as in `build_table1`."""
    runs = _select_runs(runs, "md17", profile)
    rows = []
    for (molecule, quantity), cells in PAPER_TABLE2.items():
        row = {"Molecule": MD17_LABELS[molecule], "Quantity": quantity.capitalize(),
               "Unit": MD17_UNITS[quantity]}
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
    table's fullest one, e.g. while a profile is part-way through), changes in percent with their 95% interval. The machine
    columns (std, seeds, run directories, interval bounds) stay in the CSV only."""
    shown = {}
    seed_columns = [c for c in table.columns if c.endswith("(this run) seeds")]
    expected_seeds = max((n for c in seed_columns for n in _seed_counts(table[c])), default=0)
    for column in table.columns:
        if column.startswith("Change 95%") or column.endswith((" std", " seeds", " runs")) \
                or column.startswith("Mean predictor"):
            continue
        if column == "Change (this run, %)":
            shown["Change, this run"] = [
                _format_change(m, lo, hi) for m, lo, hi in zip(
                    table[column], table["Change 95% low (this run, %)"], table["Change 95% high (this run, %)"])]
        elif column == "Change (paper, %)":
            shown["Change, paper"] = [_format_change(v) for v in table[column]]
        elif column.endswith("(this run)"):
            counts = (_seed_counts(table[f"{column} seeds"]) if f"{column} seeds" in table.columns
                      else [0] * len(table))
            shown[column] = [_format_mae(m, s, n, expected_seeds)
                             for m, s, n in zip(table[column], table[f"{column} std"], counts)]
        elif column.endswith("(paper)"):
            shown[column] = ["–" if cell is None or (isinstance(cell, float) and math.isnan(cell)) else str(cell)
                             for cell in table[column]]
        elif column == "Molecule":  # the paper names each molecule once, on its energy row
            shown[column] = [name if k == 0 or name != table[column].iloc[k - 1] else ""
                             for k, name in enumerate(table[column])]
        else:
            shown[column] = [str(v) for v in table[column]]
    order = [c for c in shown if c != "Change, paper"] + ["Change, paper"]
    return pd.DataFrame(shown)[order]


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table of `display_table(table)`."""
    shown = display_table(table)
    lines = [_markdown_row(shown.columns), _markdown_row(["---"] * len(shown.columns))]
    lines += [_markdown_row(row) for row in shown.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _markdown_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


_LATEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                  "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
                  "±": r"$\pm$", "–": "--"}


def _latex_escape(text) -> str:
    return "".join(_LATEX_ESCAPES.get(char, char) for char in str(text))


def latex_table(table: pd.DataFrame) -> str:
    """A booktabs tabular of `display_table(table)` (needs \\usepackage{booktabs})."""
    shown = display_table(table)
    text_columns = sum(c in ("Target", "Molecule", "Quantity", "Unit") for c in shown.columns)
    spec = "l" * text_columns + "r" * (len(shown.columns) - text_columns)
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
             " & ".join(_latex_escape(c) for c in shown.columns) + r" \\", r"\midrule"]
    lines += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in shown.itertuples(index=False)]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _range_text(values) -> str:
    values = sorted({v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))})
    if not values:
        return "?"
    if len(values) == 1:
        return f"{values[0]:,}" if isinstance(values[0], (int, np.integer)) else str(values[0])
    return f"{values[0]:,}-{values[-1]:,}" if all(isinstance(v, (int, np.integer)) for v in values) \
        else ", ".join(map(str, values))


def _commits_text(runs: pd.DataFrame) -> str:
    """The commits that trained these runs, each marked where some of its runs ran with
    uncommitted changes, or on a copy without git whose commit was declared (dirty unknown)."""
    texts = []
    for commit, group in runs.groupby(runs["git_commit"].fillna("?"), sort=True):
        flags = list(group["git_dirty"])
        notes = [note for note, present in (
            ("uncommitted changes", any(flag is True for flag in flags)),
            ("declared, no git repository where it ran",
             commit != "?" and any(flag is None or flag != flag for flag in flags)),
        ) if present]
        texts.append(f"{commit} ({'; '.join(notes)})" if notes else str(commit))
    return ", ".join(texts) or "?"


def _md17_data_text(runs: pd.DataFrame) -> str:
    """Where the MD17 data of these runs came from, in words."""
    sources = sorted(set(runs["md17_source"].dropna()))
    if sources != ["generated"]:
        return (f"MD17 from {', '.join(sources) or '?'} (sGDML/rMD17 npz files; DFT, PBE+vdW-TS, the "
                "data of the paper)")
    details, spacing_fs = [], set()
    for (molecule, profile, data_dir), rows in runs.groupby(
            [runs["target"], runs["profile"], runs["data_dir"].fillna("")], sort=True):
        # the size of the data set the splits were taken from, from the runs themselves (the data
        # file need not be here: runs committed by an earlier session)
        sizes = sorted(set((rows["n_train"] + rows["n_valid"] + rows["n_test"]).astype(int)))
        details.append(f"{molecule} {'/'.join(str(n) for n in sizes)}")
        sidecar = generated_md17_path(molecule, profile, data_dir or None).with_suffix(".json")
        # the generator's settings: from the data set's sidecar, else the ones the profile uses
        info = (json.loads(sidecar.read_text()) if sidecar.exists()
                else {**_MD17_GENERATION_DEFAULTS, **PROFILE_MD17_GENERATION.get(profile, {})})
        spacing_fs.add(info.get("sample_every", MD17_SAMPLE_EVERY) * info.get("timestep_fs", MD17_TIMESTEP_FS))
    counts = f" ({', '.join(details)} configurations)" if details else ""
    spacing = ", ".join(f"{s:g}" for s in sorted(spacing_fs)) or f"{MD17_SAMPLE_EVERY * MD17_TIMESTEP_FS:g}"
    return ("MD17-style data generated here with GFN2-xTB (semi-empirical tight binding, tblite), "
            f"Langevin MD at {MD17_TEMPERATURE_K:g} K, one configuration every "
            f"{spacing} fs{counts}. This is NOT the DFT "
            "(PBE+vdW-TS) data of MD17 that the paper used: only the two 'this run' columns are "
            "comparable with each other, not with the paper's columns")


def table_header(runs: pd.DataFrame, table: int, profile: str) -> list:
    """The provenance block of a table: profile, budget (sizes, steps), data source and level of
    theory, seeds, git commits, hardware and how the change is computed."""
    dataset = {1: "qm9", 2: "md17"}[table]
    runs = _select_runs(runs, dataset, profile)
    if table == 1:
        lines = ["Table 1: MAE of the QM9 targets on the test set (Tao & Wan), regenerated",
                 f"Data: QM9 from qm9pack (B3LYP/6-31G(2df,p)), DimeNet's split (RandomState(42)), "
                 f"{PAPER_TABLE1_UNIT_NOTE}"]
    else:
        lines = ["Table 2: MAE of MD17 energies (kcal/mol) and forces (kcal/mol/A) on the test set "
                 "(Tao & Wan), regenerated",
                 f"Data: {_md17_data_text(runs) if not runs.empty else 'no MD17 runs'}"]
    paper_columns = PAPER_TABLE1_COLUMNS if table == 1 else PAPER_TABLE2_COLUMNS
    lines.append(f"Columns '(paper)': {', '.join(paper_columns)} quoted verbatim from the paper's Table "
                 f"{table} (not re-run here); 'Change, paper' is computed from those quoted numbers")
    lines.append("Columns '(this run)': test MAE of the models trained here, mean ± sample std over seeds; "
                 + CHANGE_METHOD)
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
            f"Hardware: {hardware}; training wall time per model "
            f"{_range_text([int(round(w)) for w in wall])} s" if len(wall) else f"Hardware: {hardware}",
        ]
    lines.append(f"Written: {time.strftime('%Y-%m-%d %H:%M:%S %z')} on {platform.node() or '?'}")
    return lines


def write_table(table: pd.DataFrame, header_lines: Sequence[str], basename: str,
                results_dir=None) -> dict:
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
    header = ["test MAE", "unit", "seeds", "DimeNet (this run)", "DimezblNet (this run)",
              "change, this run", "change, paper"]
    lines = [_markdown_row(header), _markdown_row(["---"] * len(header))]
    for table, label in ((table1, lambda row: f"QM9 {row['Target']}"),
                         (table2, lambda row: f"{row['Molecule']} {row['Quantity'].lower()}")):
        for _, row in table.iterrows():
            if not (np.isfinite(row["DimeNet (this run)"]) and np.isfinite(row["DimezblNet (this run)"])):
                continue
            seeds = row["DimeNet (this run) seeds"]
            if seeds != row["DimezblNet (this run) seeds"]:
                seeds = f"{seeds} / {row['DimezblNet (this run) seeds']}"
            cells = [label(row), row["Unit"], seeds,
                     _format_mae(row["DimeNet (this run)"], row["DimeNet (this run) std"]),
                     _format_mae(row["DimezblNet (this run)"], row["DimezblNet (this run) std"]),
                     _format_change(row["Change (this run, %)"], row["Change 95% low (this run, %)"],
                                    row["Change 95% high (this run, %)"]),
                     _format_change(row["Change (paper, %)"])]
            lines.append(_markdown_row(cells))
    return "\n".join(lines) + "\n"


# README.md shows these committed tables between <!-- name:begin --> and <!-- name:end -->
README_TABLES = {"table1_qm9": "results/tables/table1_qm9.md", "table2_md17": "results/tables/table2_md17.md",
                 "cpu_summary": "results/cpu/tables/summary.md", "fair_headline": "results/fair/tables/headline.md"}


def readme_with_tables(readme: str, root=None) -> str:
    """`readme` (README.md's text) with each README_TABLES block replaced by the table rows (the
    lines starting with "|") of its committed file under `root` (the repository by default).
    Raises ValueError naming a block whose markers are missing or a file that is missing."""
    root = Path(root) if root is not None else REPOSITORY_ROOT
    for name, relative in README_TABLES.items():
        begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
        if readme.count(begin) != 1 or readme.count(end) != 1 or readme.index(begin) > readme.index(end):
            raise ValueError(f"README lacks one '{begin}' ... '{end}' block: add the two markers where "
                             f"{relative} should be shown")
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
    summary = (f"<!-- written by make_tables for profile {profile!r} from table1_qm9.csv and table2_md17.csv "
               "(their headers give the provenance); negative change = DimezblNet better -->\n\n"
               + summary_markdown(table1, table2))
    _atomic_write_bytes(results_path(results_dir, "tables", "summary.md"), summary.encode("utf-8"))
    return {"table1": table1, "table2": table2}


# =============================================================================================
# --- Reporting: predictions and the compression (dimer) curve ---
# =============================================================================================

def load_trained_model(path, device: str = "cpu", data_dir=None):
    """(model in eval mode with the best checkpoint's EMA weights, its TrainConfig)."""
    checkpoint = load_checkpoint(path)
    config = TrainConfig.from_dict(checkpoint["config"])
    if data_dir is not None:
        config = dataclasses.replace(config, data_dir=str(data_dir))
    model = build_model(config).to(device=select_device(device), dtype=getattr(torch, config.dtype))
    model.load_state_dict(checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"])
    return model.eval(), config


def predict(checkpoint, subset: str = "test", device: str = "auto", data_dir=None) -> dict:
    """Targets and predictions of a trained model on the train, valid or test set of its own
    config (same split, offsets and units as its metrics.json).

    Returns numpy float64 arrays: energy_true, energy_pred [molecules] (QM9: Table 1's units;
    MD17: absolute energies, kcal/mol), forces_true, forces_pred [atoms, 3] (MD17, kcal/mol/A;
    None for QM9), and energy_unit, forces_unit, target, model, seed, subset.
    """
    if subset not in ("train", "valid", "test"):
        raise ValueError(f"unknown subset {subset!r}: use 'train', 'valid' or 'test'")
    model, config = load_trained_model(checkpoint, device, data_dir)
    device = next(model.parameters()).device
    data = RunData(config, model.zbl)
    parts = {"energy_true": [], "energy_pred": [], "forces_true": [], "forces_pred": []}
    for batch in data.batches(getattr(data, subset)):
        batch = batch.to(device)
        need_forces = batch.forces is not None
        with torch.set_grad_enabled(need_forces):
            energy, forces = _energy_and_forces(model, batch, need_forces, create_graph=False)
        offset = batch.offset_energy  # float64, training units
        parts["energy_true"].append(batch.target.double().cpu() + offset.cpu())
        parts["energy_pred"].append(energy.detach().double().cpu() + offset.cpu())
        if need_forces:
            parts["forces_true"].append(batch.forces.detach().double().cpu())
            parts["forces_pred"].append(forces.detach().double().cpu())
    result = {key: (torch.cat(values).numpy() if values else None) for key, values in parts.items()}
    if config.dataset == "qm9":
        for key in ("energy_true", "energy_pred"):
            result[key] = qm9_to_reporting_units(result[key], config.target)
    units = reporting_unit(config)
    result.update(energy_unit=units["energy"], forces_unit=units.get("forces"), target=config.target,
                  dataset=config.dataset, model=config.model_name, seed=config.seed, subset=subset)
    return result


def predict_runs(runs: pd.DataFrame, subset: str = "test", device: str = "auto", seed: Optional[int] = None,
                 results_dir=None, data_dir=None) -> dict:
    """`predict` for every (target, model) of a runs table (seed None: each run's lowest seed):
    {(target, model): prediction}. A run without its best checkpoint (reused from its metrics
    only, see run_models' reuse_committed) is left out, with a message naming it."""
    predictions = {}
    for target, model in runs[["target", "model"]].drop_duplicates().itertuples(index=False):
        try:
            path = checkpoint_path(runs, target, model, seed, results_dir)
        except FileNotFoundError as missing:
            print(f"left out of the predictions: {missing}", flush=True)
            continue
        predictions[(target, model)] = predict(path, subset, device, data_dir)
    if not predictions and not runs.empty:
        raise FileNotFoundError("none of these runs has its best checkpoint here: train them (run_models "
                                "without reuse_committed) to plot their predictions")
    return predictions


COMPRESSION_DISTANCES_A = np.round(np.arange(0.30, 3.0001, 0.025), 3)  # Angstrom


def _bond_atoms(atoms, bond) -> tuple:
    """(i, j) atom indices of a bond given as indices or as two element symbols (the closest
    such pair); atom j is the one that moves."""
    if all(isinstance(b, (int, np.integer)) for b in bond):
        i, j = int(bond[0]), int(bond[1])
        if not (0 <= i < len(atoms) and 0 <= j < len(atoms) and i != j):
            raise ValueError(f"bond {bond} must name two different atoms of 0..{len(atoms) - 1}")
        return i, j
    symbols = np.asarray(atoms.get_chemical_symbols())
    first, second = (np.nonzero(symbols == s)[0] for s in bond)
    if not first.size or not second.size:
        raise ValueError(f"bond {bond}: {atoms.get_chemical_formula()} has no {bond[0]}-{bond[1]} pair")
    distance = np.linalg.norm(atoms.positions[first][:, None] - atoms.positions[second][None], axis=-1)
    distance[first[:, None] == second[None]] = np.inf
    a, b = np.unravel_index(np.argmin(distance), distance.shape)
    return int(first[a]), int(second[b])


def _energy_model(config: TrainConfig) -> None:
    if not (config.dataset == "md17" or config.target in QM9_ENERGY_TARGETS):
        raise ValueError(f"a compression curve needs an energy model (MD17, or QM9 "
                         f"{', '.join(QM9_ENERGY_TARGETS)}); this checkpoint predicts {config.target!r}")


def compression_curve(checkpoint, bond=("C", "H"), atoms=None, distances_a=None, dimenet_checkpoint=None,
                      device: str = "cpu", other_checkpoints: Optional[Mapping[str, str]] = None) -> pd.DataFrame:
    """E(r) of a bond of a real molecule compressed and stretched: atom j moves along the bond
    i -> j so that d_ij = r (distances_a, Angstrom; default 0.3 to 3 A), all other atoms fixed.

    Columns (energy unit of the model, relative to the molecule as built, r = r0): distance_a,
    "DimezblNet" (the trained model with its ZBL), "learned part" (the same network, ZBL removed:
    model.zbl = None), "ZBL" (the ZBL term alone, Eq. 8-10, as the model switches it) and, with
    dimenet_checkpoint, "DimeNet", and a column per other_checkpoints entry (label -> checkpoint of the
    same target, e.g. other ZBL recipes). DimezblNet = learned part + ZBL. atoms: an ase.Atoms
    (default: MD17's starting geometry for MD17 models, ase's ethanol for QM9 models).
    `attrs` hold unit, bond, r0_a, molecule and checkpoints.
    """
    from ase.build import molecule as ase_molecule
    from torch_geometric.data import Data

    model, config = load_trained_model(checkpoint, device)
    _energy_model(config)
    if model.zbl is None:
        raise ValueError(f"{checkpoint} is a DimeNet checkpoint (no ZBL): give a DimezblNet one, and the "
                         "DimeNet one as dimenet_checkpoint")
    if atoms is None:
        atoms = (md17_start_geometry(config.target)[0] if config.dataset == "md17"
                 else ase_molecule("CH3CH2OH"))
    i, j = _bond_atoms(atoms, bond)
    base = torch.tensor(atoms.positions, dtype=torch.float64)
    r0 = float((base[j] - base[i]).norm())
    distances = np.asarray(COMPRESSION_DISTANCES_A if distances_a is None else distances_a, dtype=np.float64)
    radii = torch.tensor(np.append(distances, r0))  # the last geometry is the reference, r = r0
    unit_vector = (base[j] - base[i]) / r0
    positions = base.expand(len(radii), -1, -1).clone()  # [R, N, 3]
    positions[:, j] = base[i] + radii[:, None] * unit_vector
    n_atoms = len(atoms)
    z = torch.tensor(atoms.numbers, dtype=torch.long).repeat(len(radii))
    batch = torch.arange(len(radii)).repeat_interleave(n_atoms)
    device_ = next(model.parameters()).device
    flat = positions.reshape(-1, 3).to(device_, next(model.parameters()).dtype)

    learned = copy.deepcopy(model)
    learned.zbl = None
    curves = {}
    with torch.no_grad():
        curves["DimezblNet"] = model(z.to(device_), flat, batch.to(device_)).double().cpu()
        curves["learned part"] = learned(z.to(device_), flat, batch.to(device_)).double().cpu()
        samples = [Data(z=torch.tensor(atoms.numbers), pos=p) for p in positions]
        curves["ZBL"] = molecule_zbl_energies(samples, model.zbl)  # includes the ZBL weight
        if dimenet_checkpoint is not None:
            dimenet, dimenet_config = load_trained_model(dimenet_checkpoint, device)
            if (dimenet_config.dataset, dimenet_config.target) != (config.dataset, config.target):
                raise ValueError(f"the DimeNet checkpoint is for {dimenet_config.dataset}/{dimenet_config.target}, "
                                 f"the DimezblNet one for {config.dataset}/{config.target}: use the same target")
            curves["DimeNet"] = dimenet(z.to(device_), flat, batch.to(device_)).double().cpu()
        for label, other_checkpoint in (other_checkpoints or {}).items():
            other, other_config = load_trained_model(other_checkpoint, device)
            if (other_config.dataset, other_config.target) != (config.dataset, config.target):
                raise ValueError(f"the {label} checkpoint is for {other_config.dataset}/{other_config.target}, "
                                 f"the DimezblNet one for {config.dataset}/{config.target}: use the same target")
            curves[label] = other(z.to(device_), flat, batch.to(device_)).double().cpu()
    frame = pd.DataFrame({"distance_a": distances,
                          **{name: (values[:-1] - values[-1]).numpy() for name, values in curves.items()}})
    symbols = atoms.get_chemical_symbols()
    frame.attrs.update(unit=reporting_unit(config)["energy"] if config.dataset == "md17" else "eV",
                       bond=f"{symbols[i]}-{symbols[j]} (atoms {i}-{j}, atom {j} moves)", r0_a=r0,
                       molecule=atoms.get_chemical_formula(), target=f"{config.dataset}/{config.target}",
                       checkpoint=str(checkpoint), dimenet_checkpoint=str(dimenet_checkpoint))
    return frame


def compression_curves(runs: pd.DataFrame, target: str, bonds, seed: Optional[int] = None,
                       results_dir=None, device: str = "cpu") -> list:
    """`compression_curve` of each bond for the DimezblNet run of `target` in a runs table, with
    the DimeNet run of the same seed beside it (seed None: the lowest)."""
    of_target = runs[runs["target"] == target]
    if seed is None and (of_target["model"] == "dimezblnet").any():
        seed = int(of_target.loc[of_target["model"] == "dimezblnet", "seed"].min())
    dimezblnet = checkpoint_path(runs, target, "dimezblnet", seed, results_dir)
    has_dimenet = ((of_target["model"] == "dimenet") & (of_target["seed"] == seed)).any()
    dimenet = checkpoint_path(runs, target, "dimenet", seed, results_dir) if has_dimenet else None
    return [compression_curve(dimezblnet, tuple(bond), dimenet_checkpoint=dimenet, device=device)
            for bond in bonds]


# =============================================================================================
# --- Reporting: figures (PNG in results/figures/, returned for inline display) ---
# =============================================================================================
# Figures are matplotlib.figure.Figure objects, not pyplot state: a notebook shows the returned
# figure once (with %matplotlib inline), and nothing accumulates between calls.

MODEL_COLORS = {"dimenet": "tab:blue", "dimezblnet": "tab:red", "dimezblnet_switched": "tab:orange",
                "dimezblnet_interpolated": "tab:green"}
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


def plot_radial_basis(num_radial: int = 6, cutoff_a: float = 5.0, envelope_exponent: int = 5,
                      results_dir=None):
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
    axes[0, 0].set(xlabel="distance d (Å)", ylabel=r"$e_{\mathrm{RBF},n}(d)\;u(d/c)$  (Å$^{-3/2}$)",
                   title=f"Radial Bessel basis (Eq. 4), c = {cutoff_a:g} Å")
    axes[0, 1].plot(d, u, color="k", label=f"u(d/c), p = {p} (Eq. 6)")
    axes[0, 1].plot(d, Envelope(envelope_exponent)(d / cutoff_a).clamp(max=5.0), color="tab:gray",
                    linestyle="--", label="u(d/c)/(d/c) (DimeNet's code, clipped at 5)")
    axes[0, 1].set(xlabel="distance d (Å)", ylabel="envelope (dimensionless)",
                   title="Polynomial envelope (Eq. 6)")
    for ax in axes[0]:
        ax.axvline(cutoff_a, color="k", linewidth=0.8, linestyle=":")
        ax.axhline(0.0, color="k", linewidth=0.5)
        ax.legend(fontsize=8)
    return save_figure(fig, "basis_radial_envelope", results_dir)


def plot_spherical_basis(num_spherical: int = 7, num_radial: int = 6, cutoff_a: float = 5.0,
                         envelope_exponent: int = 5, radial_index: int = 0, results_dir=None):
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
    axes[0, 0].set(xlabel=r"distance $d_{kj}$ (Å)", ylabel="radial factor (dimensionless)",
                   title=rf"Eq. 5 radial factor $j_l(z_{{ln}} d/c)\,u(d/c)$, n = {radial_index + 1}")
    axes[0, 1].set(xlabel="angle α (degrees)", ylabel=r"$Y_l^0(\alpha)$ (dimensionless)",
                   title=r"Eq. 5 angular factor $Y_l^0(\alpha)$", xticks=range(0, 181, 30))
    for ax in axes[0]:
        ax.axhline(0.0, color="k", linewidth=0.5)
        ax.legend(fontsize=8, ncols=2)
    return save_figure(fig, "basis_spherical", results_dir)


def plot_sbf_heatmap(l: int = 2, n: int = 1, num_spherical: int = 7, num_radial: int = 6,
                     cutoff_a: float = 5.0, envelope_exponent: int = 5, results_dir=None):
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
    image = axes[0, 0].pcolormesh(torch.rad2deg(alpha), d, values, cmap="RdBu_r", vmin=-limit, vmax=limit,
                                  shading="auto")
    fig.colorbar(image, ax=axes[0, 0], label=rf"$a_{{\mathrm{{SBF}},ln}}$ with envelope u(x)/x (dimensionless)")
    axes[0, 0].set(xlabel="angle α (degrees)", ylabel="distance d (Å)", xticks=range(0, 181, 30),
                   title=f"2D spherical Fourier-Bessel basis (Eq. 5), l = {l}, n = {n}")
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
    ax.set(yscale="log", xlabel="reduced distance x = r / a  (dimensionless, Eq. 10)",
           ylabel="screening function φ(x) (dimensionless)", title="ZBL screening function (Eq. 9)")
    ax.legend(fontsize=8)
    return save_figure(fig, "zbl_screening_function", results_dir)


def plot_zbl_pair_energies(elements: Sequence[str] = ("H", "C", "N", "O", "F"), unit: str = "eV",
                           cutoff_a: float = 5.0, results_dir=None):
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
        title = {"cutoff": f"reach 'cutoff': enveloped at {cutoff_a:g} Å",
                 "covalent": "reach 'covalent': off at r_cov,i + r_cov,j",
                 "lammps": f"reach 'lammps': switch {zbl.inner_a:g}-{zbl.outer_a:g} Å"}[reach]
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
                raise ValueError(f"{row.run_dir}/learning_curve.csv has no {column}: {quantity!r} is not "
                                 f"a quantity of {row.dataset}")
            ax.plot(curve["step"], curve[column], color=MODEL_COLORS.get(row.model), marker=".",
                    linestyle=["-", "--", ":", "-."][row.seed % 4],
                    label=f"{MODEL_LABELS.get(row.model, row.model)} seed {row.seed}")
            values += curve[column].tolist()
        unit = rows[f"{quantity}_unit"].iloc[0]
        spans_a_decade = min(values) > 0 and max(values) / min(values) > 10
        ax.set(yscale="log" if spans_a_decade else "linear", xlabel="training step",
               ylabel=f"valid MAE ({unit})", title=str(target))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(targets):]:
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
            ax.scatter(true, pred, s=4, alpha=0.5, color=MODEL_COLORS.get(model),
                       label=f"{MODEL_LABELS.get(model, model)}: MAE {mae:.3g}")
            low, high = min(low, true.min(), pred.min()), max(high, true.max(), pred.max())
            unit = result[f"{quantity}_unit"]
        ax.plot([low, high], [low, high], color="k", linewidth=0.8, label="y = x")
        what = "E − ⟨E⟩" if quantity == "energy" else "F component"
        ax.set(xlabel=f"reference {what} ({unit})", ylabel=f"predicted {what} ({unit})", title=str(target))
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(targets):]:
        ax.set_visible(False)
    dataset = next(iter(predictions.values()))["dataset"]
    return save_figure(fig, name or f"parity_{dataset}_{quantity}", results_dir)


def plot_compression_curves(curves: Sequence[pd.DataFrame], results_dir=None, name=None):
    """E(r) - E(r0) of `compression_curve` results side by side (symmetric log scale):
    DimezblNet, its learned part, ZBL alone and DimeNet, the bond length r0 as built marked."""
    curves = [curves] if isinstance(curves, pd.DataFrame) else list(curves)
    if not curves:
        raise ValueError("no compression curves to plot")
    styles = {"DimezblNet": ("tab:red", "-", "DimezblNet"),
              "learned part": ("tab:purple", "--", "learned part (DimezblNet without ZBL)"),
              "ZBL": ("k", ":", "ZBL alone (Eq. 8-10)"), "DimeNet": ("tab:blue", "-.", "DimeNet"),
              **{MODEL_LABELS[m]: (MODEL_COLORS[m], "-", MODEL_LABELS[m])
                 for m in ("dimezblnet_switched", "dimezblnet_interpolated")},
              "GFN2-xTB": ("tab:green", "-", "GFN2-xTB (reference)")}
    fig, axes = _figure(len(curves), width=5.2, height=4.3)
    for ax, curve in zip(axes[0], curves):
        for column, (color, linestyle, label) in styles.items():
            if column in curve:
                ax.plot(curve["distance_a"], curve[column], color=color, linestyle=linestyle, label=label)
        ax.axvline(curve.attrs["r0_a"], color="tab:gray", linewidth=0.8,
                   label=f"r0 = {curve.attrs['r0_a']:.3f} Å (as built)")
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set(xlabel="bond length r (Å)", ylabel=f"E(r) − E(r0) ({curve.attrs['unit']}, symlog)",
               title=f"{curve.attrs['molecule']}: {curve.attrs['bond']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"Bond compression, models trained on {curves[0].attrs['target']}")
    target = curves[0].attrs["target"].replace("/", "_")
    return save_figure(fig, name or f"compression_curves_{target}", results_dir)


# =============================================================================================
# --- Reporting: notebooks 01-05 through papermill (make reproduce) ---
# =============================================================================================

NOTEBOOK_DIR = REPOSITORY_ROOT / "notebooks"
NOTEBOOKS = ("01_basis_visualization.ipynb", "02_zbl_curves.ipynb", "03_qm9_training.ipynb",
             "04_md17_training.ipynb", "05_tables.ipynb")
KERNEL_NAME = "python3"  # jupyter_client runs the kernel "python3" with the interpreter running papermill


class NotebookFailed(RuntimeError):
    """A notebook of `reproduce` raised: names the notebook, the cell and the error."""

    def __init__(self, notebook: str, cell: Optional[int], message: str, executed: Path):
        self.notebook, self.cell, self.executed = notebook, cell, executed
        where = f"cell {cell}" if cell is not None else "before any cell ran (kernel start?)"
        super().__init__(f"{notebook} failed in {where}: {message}; executed copy with the "
                         f"traceback: {executed}")


def _failed_cell(executed: Path, cell_index: int) -> tuple:
    """(1-based number of the failing cell in the source notebook, its first line): the executed
    copy holds papermill's injected-parameters cell, which the source notebook does not."""
    import nbformat

    cells = nbformat.read(executed, as_version=4).cells
    injected = [k for k, c in enumerate(cells) if "injected-parameters" in c.metadata.get("tags", [])]
    number = cell_index + 1 - sum(1 for k in injected if k < cell_index)
    first_line = cells[cell_index].source.strip().splitlines()[0] if cells[cell_index].source.strip() else ""
    return number, first_line


def reproduce(profile: str = "smoke", results_dir=None, data_dir=None, device: str = "auto",
              parameters: Optional[dict] = None, notebooks: Sequence[str] = NOTEBOOKS,
              kernel_name: str = KERNEL_NAME, progress: bool = True) -> list:
    """Run the notebooks in order with papermill, executed copies to <results_dir>/executed/.

    Every notebook gets profile, data_dir, device, results_dir and progress_bars=False, plus
    `parameters` (e.g. targets, molecules, seeds, train_overrides, md17_configs), each only where
    its parameters cell declares it; a parameter no notebook declares is an error. Notebooks run with cwd
    notebooks/ (as in JupyterLab). Raises NotebookFailed naming the notebook and cell.
    Returns the executed notebooks' paths.
    """
    import papermill

    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(PROFILES)}")
    values = {"profile": profile, "data_dir": None if data_dir is None else str(Path(data_dir).resolve()),
              "device": device, "results_dir": str(results_path(results_dir)),
              "progress_bars": False,  # nobody watches them here; they would fill the executed copies
              **(parameters or {})}
    declared = {name: set(papermill.inspect_notebook(str(NOTEBOOK_DIR / name))) for name in notebooks}
    unused = sorted(set(parameters or {}) - set().union(*declared.values()))
    if unused:
        raise ValueError(f"parameters {unused} are declared by none of the notebooks {list(notebooks)}")
    executed_dir = results_path(results_dir, "executed")
    executed_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name in notebooks:
        executed = executed_dir / name
        start = time.perf_counter()
        if progress:
            print(f"reproduce: {name} ...", flush=True)
        try:
            papermill.execute_notebook(
                str(NOTEBOOK_DIR / name), str(executed),
                parameters={k: v for k, v in values.items() if k in declared[name]},
                kernel_name=kernel_name, cwd=str(NOTEBOOK_DIR), progress_bar=False, log_output=False)
        except papermill.PapermillExecutionError as error:
            number, first_line = _failed_cell(executed, error.cell_index)
            raise NotebookFailed(name, number, f"{error.ename}: {error.evalue} (cell starts "
                                 f"{first_line[:80]!r})", executed) from None
        except Exception as error:  # kernel died or did not start, notebook unreadable, ...
            raise NotebookFailed(name, None, f"{type(error).__name__}: {error}", executed) from error
        if progress:
            print(f"reproduce: {name} done in {time.perf_counter() - start:.0f} s", flush=True)
        done.append(executed)
    return done


def reproduce_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python dimezbl_core.py reproduce [--profile smoke] [--set NAME=JSON ...]`: exit status 0,
    or 1 with the failing notebook and cell named on stderr."""
    import argparse

    parser = argparse.ArgumentParser(prog="python dimezbl_core.py reproduce",
                                     description="Run notebooks 01-05 with papermill (Tables 1 and 2, figures).")
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES))
    parser.add_argument("--results-dir", default=None, help="default <repository>/results")
    parser.add_argument("--data-dir", default=None, help="default $DIMEZBL_DATA_DIR or <repository>/data")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--kernel", default=KERNEL_NAME, help="Jupyter kernel (default python3: this interpreter)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=JSON",
                        help="a notebook parameter, e.g. --set 'targets=[\"U0\"]' --set 'seeds=[0, 1]'")
    parser.add_argument("--notebooks", nargs="+", default=None, metavar="NN",
                        help="run only these notebooks, by number or name (e.g. --notebooks 03 04 05); "
                             "default all five in order")
    args = parser.parse_args(argv)
    parameters = parse_set_arguments(args.set)
    notebooks = NOTEBOOKS
    if args.notebooks:
        chosen = [[name for name in NOTEBOOKS if name == wanted or name.startswith(f"{wanted}_")]
                  for wanted in args.notebooks]
        unknown = [wanted for wanted, names in zip(args.notebooks, chosen) if len(names) != 1]
        if unknown:
            parser.error(f"unknown notebooks {unknown}: use numbers or names of {list(NOTEBOOKS)}")
        notebooks = [name for names in chosen for name in names]
    start = time.perf_counter()
    try:
        reproduce(args.profile, args.results_dir, args.data_dir, args.device, parameters, notebooks,
                  kernel_name=args.kernel)
    except (NotebookFailed, ValueError) as error:
        print(f"reproduce: FAILED: {error}", file=sys.stderr, flush=True)
        return 1
    print(f"reproduce: all notebooks ran in {time.perf_counter() - start:.0f} s; tables in "
          f"{results_path(args.results_dir, 'tables')}, figures in {results_path(args.results_dir, 'figures')}")
    return 0


# =============================================================================================
# --- ASE calculator ---
# =============================================================================================


def energy_unit_in_ev(unit: str) -> float:
    """One `unit` of energy in eV: the single place where model units meet ASE's eV."""
    if unit == "eV":
        return 1.0
    if unit == "kcal/mol":
        return 1.0 / _ev_to_kcal_per_mol()
    raise ValueError(f"unknown energy unit {unit!r}: use 'eV' or 'kcal/mol'")


def _ase_calculator_base():
    from ase.calculators.calculator import Calculator

    return Calculator


class DimezblCalculator(_ase_calculator_base()):
    """ASE calculator for a trained DimezblNet / DimeNet: energy (eV), forces (eV/A) and per-atom
    energies (eV). `DimezblCalculator.from_checkpoint(path)` loads a best checkpoint safely;
    the model's energy unit (kcal/mol for MD17, eV for QM9 energies) is converted to ASE's eV
    here and nowhere else. Inference runs in float64 by default (energy conservation in MD).

    `offset` (`offset_atomic_energies`'s layout) in the model's unit is added back to the energy (the
    training target offsets); `elements` limits the calculator to the trained elements.
    """

    implemented_properties = ["energy", "free_energy", "forces", "energies"]

    def __init__(self, model: DimezblNet, energy_unit: Optional[str] = None, offset=(0.0, 0.0),
                 elements=None, device: str = "cpu", dtype=torch.float64, **kwargs):
        super().__init__(**kwargs)
        if model.out_channels != 1:
            raise ValueError("the calculator needs an energy model (out_channels = 1)")
        self.device = select_device(device)
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        unit = energy_unit or (model.zbl.unit if model.zbl is not None else model.hparams["zbl_unit"])
        self.energy_unit, self.ev_per_unit = unit, energy_unit_in_ev(unit)
        self.offset = tuple(offset)
        self.elements = None if elements is None else sorted(int(e) for e in elements)
        self.dtype = dtype

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", **kwargs) -> "DimezblCalculator":
        checkpoint = load_checkpoint(path)
        config = TrainConfig.from_dict(checkpoint["config"])
        if config.dataset == "qm9" and config.target not in QM9_ENERGY_TARGETS:
            raise ValueError(f"checkpoint {path} predicts {config.target}, not an energy: the "
                             f"calculator needs a model of U0, U, H, G or an MD17 molecule")
        model = build_model(config)
        model.load_state_dict(checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"])
        return cls(model, offset=checkpoint.get("offset", (0.0, 0.0)),
                   elements=checkpoint.get("elements"), device=device, **kwargs)

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        from ase.calculators.calculator import all_changes

        super().calculate(atoms, properties, system_changes or all_changes)
        if self.atoms.pbc.any():
            raise ValueError(f"periodic boundary conditions (pbc={self.atoms.pbc.tolist()}) are not supported: "
                             "DimezblNet is a potential for isolated molecules and would ignore the cell; set "
                             "atoms.pbc = False for a molecule in vacuum")
        numbers = self.atoms.get_atomic_numbers()
        if self.elements is not None:
            unknown = sorted(set(numbers.tolist()) - set(self.elements))
            if unknown:
                raise ValueError(f"elements {unknown} were not in the training data of this model "
                                 f"(trained on Z = {self.elements})")
        z = torch.as_tensor(numbers, dtype=torch.long, device=self.device)
        pos = torch.as_tensor(self.atoms.get_positions(), dtype=self.dtype, device=self.device)
        pos.requires_grad_(True)
        atomic = self.model.atomic_energies(z, pos)  # model unit
        (grad,) = torch.autograd.grad(atomic.sum(), pos)
        atomic = atomic.detach().cpu().double() + offset_atomic_energies(self.offset, z) + self.offset[0] / len(numbers)
        energies = atomic.cpu().double().numpy() * self.ev_per_unit
        self.results["energies"] = energies
        self.results["energy"] = self.results["free_energy"] = float(energies.sum())
        self.results["forces"] = -grad.cpu().double().numpy() * self.ev_per_unit


# =============================================================================================
# --- Using the potential: TorchScript export, bond compression vs GFN2-xTB, MD stability ---
# =============================================================================================
# The export is a TorchScript module holding the trained weights and the model's own functions:
# radius_graph, triplets, the basis (`_sbf_radial`, `_sbf_angular`, `_sbf_combine`), the blocks'
# `edge_inputs` and `update`, the ZBL term (`_zbl_switched`), all scriptable; only the triplet sum
# differs: gather + index_add (`_triplet_sum`, the reference formula that `triplet_aggregate`'s
# sparse products equal; tests/test_fast_paths.py), since the custom autograd Functions and the
# CSR `TripletPlan` do not script and tracing would freeze the data-dependent shapes of the graph.
# Constants kept in ConstantTables by the model are buffers here. tests/test_export.py checks the
# file against the Python model.

EXPORT_FORMAT = "dimezbl-torchscript/1"
EXPORT_METADATA_FILE = "metadata.json"


class _ScriptSphericalBasis(nn.Module):
    """`SphericalBasisLayer` (the same `_sbf_radial`, `_sbf_angular`, `_sbf_combine`) with its
    constants as buffers."""

    def __init__(self, sbf: SphericalBasisLayer, dtype: torch.dtype):
        super().__init__()
        self.cutoff, self.envelope_p = float(sbf.cutoff), int(sbf.envelope.p)
        arrays = sbf.constants.arrays
        self.register_buffer("zeros", torch.tensor(arrays["zeros"], dtype=dtype))
        self.register_buffer("normalizer", torch.tensor(arrays["normalizer"], dtype=dtype))
        self.register_buffer("sph_prefactor", torch.tensor(arrays["sph_prefactor"], dtype=dtype))
        coefficients = _series_coefficients(sbf.num_spherical, torch.empty(0, dtype=dtype)).unsqueeze(-1)
        self.register_buffer("series_coefficients", coefficients)  # [K + 1, L, 1]

    def forward(self, dist: Tensor, cos_angle: Tensor, idx_kj: Tensor) -> Tensor:
        radial = _sbf_radial(dist / self.cutoff, self.zeros, self.normalizer, self.series_coefficients,
                             self.envelope_p)
        return _sbf_combine(radial, _sbf_angular(cos_angle, self.sph_prefactor), idx_kj)


class _ScriptZBL(nn.Module):
    """`ZBL.forward` (the same `_zbl_switched`) with its constants as attributes and buffers:
    per-atom energies [N]."""

    def __init__(self, zbl: ZBL, dtype: torch.dtype):
        super().__init__()
        self.reach, self.unit = zbl.reach, zbl.unit
        self.coulomb = coulomb_constant(zbl.unit)
        self.cutoff_a, self.inner_a, self.outer_a = float(zbl.cutoff_a), float(zbl.inner_a), float(zbl.outer_a)
        self.envelope_p = int(zbl.envelope_p)
        self.screening_length_a, self.screening_exponent = ZBL_SCREENING_LENGTH_A, ZBL_SCREENING_EXPONENT
        self.coefficients = [float(c) for c in ZBL_PHI_COEFFICIENTS]
        self.exponents = [float(d) for d in ZBL_PHI_EXPONENTS]
        self.register_buffer("scale", zbl.scale.detach().to(dtype).clone())
        self.register_buffer("covalent_radii", torch.tensor(zbl.constants.arrays["covalent_radii"], dtype=dtype))

    def forward(self, z: Tensor, source: Tensor, target: Tensor, dist: Tensor) -> Tensor:
        pair = _zbl_switched(z[target], z[source], dist, self.reach, self.coulomb, self.cutoff_a, self.inner_a,
                             self.outer_a, self.envelope_p, self.covalent_radii, self.screening_length_a,
                             self.screening_exponent, self.coefficients, self.exponents)
        return self.scale * scatter_sum(0.5 * pair, target, z.numel())


def _triplet_sum(s: Tensor, x: Tensor, idx_kj: Tensor, idx_ji: Tensor, num_edges: int) -> Tensor:
    """A[ji, b, :] = sum_k s[t, b] x[kj, :]: [E, B, H], by gather + index_add (the formula that
    `triplet_aggregate` evaluates as sparse products)."""
    per_triplet = s.unsqueeze(-1) * x[idx_kj].unsqueeze(1)  # [T, B, H]
    out = x.new_zeros([num_edges, per_triplet.size(1), per_triplet.size(2)])
    return out.index_add_(0, idx_ji, per_triplet)


class _ScriptBlock(nn.Module):
    """An interaction block (either variant) with `_triplet_sum` for the triplet sum (its own
    `edge_inputs` and `update` are scripted), and its output block."""

    def __init__(self, block: nn.Module, output: OutputBlock):
        super().__init__()
        self.block, self.output = block, output

    def forward(self, x: Tensor, rbf: Tensor, sbf: Tensor, idx_kj: Tensor, idx_ji: Tensor) -> Tensor:
        x_ji, x_kj, s = self.block.edge_inputs(x, rbf, sbf)
        return self.block.update(x, x_ji, _triplet_sum(s, x_kj, idx_kj, idx_ji, x.size(0)))


class ExportedPotential(nn.Module):
    """What `export_model` scripts: forward(z int64 [N], pos [N, 3] Angstrom, batch int64 [N]
    sorted) -> (energy [B], forces [N, 3] = -dE/dpos), in `energy_unit` and energy_unit/Angstrom,
    without the training offset (the metadata's "offset" says how to add it back). `energy(z, pos, batch)` gives the energies alone. The same checks as
    `DimezblNet` (shapes, Z = 1..94, finite positions, sorted batch, coincident atoms) and, when
    `elements` is not empty, only the trained elements."""

    def __init__(self, model: DimezblNet, energy_unit: str, offset, elements, dtype: torch.dtype):
        super().__init__()
        model = copy.deepcopy(model).to(dtype=dtype, device="cpu").eval()
        self.cutoff, self.dimenet_angle = float(model.cutoff), model.variant == "dimenet"
        self.energy_unit = energy_unit
        self.max_atomic_number, self.min_pair_distance_a = MAX_ATOMIC_NUMBER, MIN_PAIR_DISTANCE_A
        self.offset_per_molecule, self.offset_per_atom = float(offset[0]), float(offset[1])
        per_element = offset[2] if len(offset) > 2 else [0.0] * (MAX_ATOMIC_NUMBER + 1)
        self.register_buffer("offset_per_element", torch.tensor(per_element, dtype=torch.float64))
        self.register_buffer("elements", torch.tensor([int(e) for e in (elements or [])], dtype=torch.long))
        self.rbf, self.emb, self.output0 = model.rbf, model.emb, model.output_blocks[0]
        self.sbf = _ScriptSphericalBasis(model.sbf, dtype)
        self.blocks = nn.ModuleList([_ScriptBlock(block, output) for block, output in
                                     zip(model.interaction_blocks, model.output_blocks[1:])])
        self.has_zbl = model.zbl is not None
        self.zbl_interpolate = model.zbl is not None and model.zbl.combine_mode == "interpolate"
        self.zbl_switch_inner_a = model.zbl.switch_inner_a if model.zbl is not None else 0.0
        self.zbl_switch_outer_a = model.zbl.switch_outer_a if model.zbl is not None else 0.0
        self.zbl_softmin_length_a = ZBL_SOFTMIN_LENGTH_A
        self.zbl = _ScriptZBL(model.zbl, dtype) if model.zbl is not None else _ScriptZBL(ZBL(energy_unit), dtype)

    def check(self, z: Tensor, pos: Tensor, batch: Tensor) -> int:
        """Raise on bad input (as DimezblNet does); returns the number of molecules."""
        if z.dim() != 1 or z.numel() == 0 or z.dtype != torch.long:
            raise ValueError("z must be a non-empty int64 tensor [num_atoms] of atomic numbers")
        if pos.dim() != 2 or pos.size(0) != z.size(0) or pos.size(1) != 3 or not pos.is_floating_point():
            raise ValueError("pos must be a floating point tensor [num_atoms, 3] (Angstrom) matching z")
        if batch.shape != z.shape or batch.dtype != torch.long:
            raise ValueError("batch must be an int64 tensor [num_atoms] (molecule index of each atom)")
        if bool(((z < 1) | (z > self.max_atomic_number)).any()):
            raise ValueError("atomic numbers must be in 1..94")
        if self.elements.numel() > 0:
            if not bool(torch.isin(z, self.elements.to(z.device)).all()):
                raise ValueError("an element was not in the training data of this model (see its elements)")
        if not bool(torch.isfinite(pos).all()):
            raise ValueError("pos holds NaN or inf")
        if int(batch[0]) < 0 or bool((batch[1:] < batch[:-1]).any()):
            raise ValueError("batch must be non-negative and sorted (atoms of each molecule contiguous)")
        num_molecules = int(batch[-1]) + 1
        if bool((torch.bincount(batch, minlength=num_molecules) == 0).any()):
            raise ValueError("a molecule of the batch has no atoms")
        return num_molecules

    def _energy(self, z: Tensor, pos: Tensor, batch: Tensor, num_molecules: int) -> Tensor:
        num_atoms = z.numel()
        with torch.no_grad():
            edge_index = radius_graph(pos.detach(), batch, self.cutoff)  # the model's own functions,
            i, j, _, _, idx_k, idx_kj, idx_ji = triplets(edge_index, num_atoms)  # TorchScript-compatible
        vec = pos[i] - pos[j]  # R_i - R_j, [E, 3]
        dist = torch.linalg.vector_norm(vec, dim=-1)
        if bool((dist < self.min_pair_distance_a).any()):
            raise ValueError("coincident atoms: a distance is below 0.01 Angstrom")
        if self.dimenet_angle:  # between R_j - R_i and R_k - R_i
            vec_ki = pos[idx_k] - pos[i[idx_ji]]
            cos_angle = -(vec[idx_ji] * vec_ki).sum(-1) / (dist[idx_ji] * torch.linalg.vector_norm(vec_ki, dim=-1))
        else:  # DimeNet++: between R_i - R_j and R_j - R_k
            cos_angle = (vec[idx_ji] * vec[idx_kj]).sum(-1) / (dist[idx_ji] * dist[idx_kj])
        rbf = self.rbf(dist)
        sbf = self.sbf(dist, cos_angle, idx_kj)
        x = self.emb(z, rbf, i, j)
        out = self.output0(x, rbf, i, num_atoms)
        for block in self.blocks:
            x = block(x, rbf, sbf, idx_kj, idx_ji)
            out = out + block.output(x, rbf, i, num_atoms)
        out = out.squeeze(-1)
        if self.has_zbl:
            repulsion = self.zbl(z, j, i, dist)
            if self.zbl_interpolate:
                w = zbl_interpolation_weights(dist, i, num_atoms, self.zbl_switch_inner_a, self.zbl_switch_outer_a,
                                              self.zbl_softmin_length_a)
                out = (1 - w) * out + w * repulsion
            else:
                out = out + repulsion
        return scatter_sum(out, batch, num_molecules)

    @torch.jit.export
    def energy(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        """Energies [B] (energy_unit, without the offset)."""
        num_molecules = self.check(z, pos, batch)
        return self._energy(z, pos.to(self.rbf.freq.dtype), batch, num_molecules)

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tuple[Tensor, Tensor]:
        num_molecules = self.check(z, pos, batch)
        if not torch.is_grad_enabled():  # TorchScript has no enable_grad()
            raise RuntimeError("forces are -dE/dpos: call the exported model with gradients enabled (not "
                               "under torch.no_grad() or torch.inference_mode()); .energy() works under both")
        position = pos.detach().to(self.rbf.freq.dtype).requires_grad_(True)
        energy = self._energy(z, position, batch, num_molecules)
        forces = torch.zeros_like(position)
        if energy.requires_grad:  # a lone atom has no edges and so no forces
            gradient = torch.autograd.grad([energy.sum()], [position], allow_unused=True)[0]
            if gradient is not None:
                forces = -gradient
        return energy.detach(), forces.detach()


def export_model(source, path, dtype=None, restrict_elements: bool = True) -> dict:
    """Write a trained model as one self-contained TorchScript file, loadable with plain
    `torch.jit.load(path)` (no dimezbl_core needed): forward(z int64 [N], pos [N, 3] in Angstrom,
    batch int64 [N]) -> (energy [B], forces [N, 3]) in the model's unit (kcal/mol and kcal/mol/A
    for MD17, eV for QM9 energies), see `ExportedPotential`.

    source: a checkpoint path (its EMA weights, training offset and elements) or a DimezblNet
    (offset 0, all elements). dtype: float32 or float64; None keeps the checkpoint's training
    dtype (a model object's parameter dtype). restrict_elements: the file refuses elements the
    checkpoint was not trained on (as DimezblCalculator). The file's extra file metadata.json (read it with
    torch.jit.load(path, _extra_files={"metadata.json": ""})) and the module attributes
    energy_unit, offset_per_molecule, offset_per_atom, elements record the unit and the
    offset. Returns the metadata.
    """
    path = Path(path)
    if isinstance(source, DimezblNet):
        model, offset, elements, origin = source, (0.0, 0.0), None, {"source": "DimezblNet object"}
        unit = model.zbl.unit if model.zbl is not None else model.hparams["zbl_unit"]
        dtype = dtype or next(model.parameters()).dtype
    elif isinstance(source, (str, os.PathLike)):
        checkpoint = load_checkpoint(source)
        config = TrainConfig.from_dict(checkpoint["config"])
        if config.dataset == "qm9" and config.target not in QM9_ENERGY_TARGETS:
            raise ValueError(f"checkpoint {source} predicts {config.target}, not an energy: export needs a "
                             f"model of {', '.join(QM9_ENERGY_TARGETS)} or an MD17 molecule")
        model = build_model(config)
        model.load_state_dict(checkpoint["ema"] if "ema" in checkpoint else checkpoint["model"])
        offset, elements = checkpoint.get("offset", (0.0, 0.0)), checkpoint.get("elements")
        unit = reporting_unit(config)["energy"] if config.dataset == "md17" else "eV"
        dtype = dtype or getattr(torch, config.dtype)
        origin = {"source": str(source), "dataset": config.dataset, "target": config.target,
                  "model": config.model_name, "profile": config.profile, "seed": config.seed}
    else:
        raise TypeError(f"export_model needs a checkpoint path or a DimezblNet, got {type(source).__name__}")
    if model.out_channels != 1:
        raise ValueError("export needs an energy model (out_channels = 1): forces are -dE/dpos")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype {dtype} is not supported: use torch.float32 or torch.float64")
    elements = [int(e) for e in elements] if (restrict_elements and elements is not None) else []
    per_element = {int(z): float(e) for z, e in enumerate(offset[2]) if e != 0.0} if len(offset) > 2 else {}
    with warnings.catch_warnings():  # torch 2.13 deprecates TorchScript; torch.export cannot hold the
        warnings.simplefilter("ignore", DeprecationWarning)  # data-dependent graph with autograd.grad inside
        scripted = torch.jit.script(ExportedPotential(model, unit, offset, elements, dtype))
    metadata = {"format": EXPORT_FORMAT, "energy_unit": unit, "forces_unit": f"{unit}/Angstrom",
                "position_unit": "Angstrom", "dtype": str(dtype).replace("torch.", ""),
                "offset": {"per_molecule": float(offset[0]), "per_atom": float(offset[1]), "per_element": per_element,
                           "unit": unit, "meaning": "absolute energy = energy + per_molecule + per_atom * "
                                                    "n_atoms + sum over atoms of per_element[Z]"},
                "elements": elements, "hparams": model.hparams, **origin, "git": git_state(),
                "torch": torch.__version__, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "usage": "energy, forces = torch.jit.load(path)(z_int64[N], pos[N, 3]_angstrom, batch_int64[N])"}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(scripted, buffer, _extra_files={EXPORT_METADATA_FILE: json.dumps(metadata, indent=2,
                                                                                         default=str)})
    _atomic_write_bytes(path, buffer.getvalue())
    return metadata


def load_exported(path) -> tuple:
    """(TorchScript module, metadata dict) of a file written by `export_model`."""
    extra = {EXPORT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return module, json.loads(extra[EXPORT_METADATA_FILE])


# --- the short-range experiment (Sec. 3.3's motivation for ZBL) ---
# Two questions about the trained models away from the training data: (a) does compressing a bond
# raise the energy as the reference method does (no spurious hole at short range)? (b) do molecular
# dynamics trajectories at 500-1500 K stay physical? GFN2-xTB (tblite), the method that generated
# the offline MD17 data, is the reference for both. Budgets are per profile (SHORTRANGE_BUDGETS).

SHORTRANGE_LOG = logging.getLogger("dimezbl.shortrange")
SHORTRANGE_TEMPERATURES_K = (500.0, 1000.0, 1500.0)
SHORTRANGE_ENSEMBLES = ("langevin", "nve")
SHORTRANGE_MODELS = ("dimenet", "dimezblnet")
REFERENCE_MODEL = "gfn2-xtb"  # the reference method's rows in the MD tables
MODEL_LABELS_SHORTRANGE = {**MODEL_LABELS, REFERENCE_MODEL: "GFN2-xTB"}
CLOSE_CONTACT_A = 0.5  # Angstrom: two atoms closer than this are an unphysical state
BOND_BREAK_FACTOR = 2.0  # a starting bond longer than 2x its starting length is broken
SHORTRANGE_TIMESTEP_FS = 0.5  # MD17's time step
SHORTRANGE_CHECK_EVERY = 10  # MD steps between checks of the state (5 fs at 0.5 fs)
# Per profile: MD steps per trajectory, seeds per (molecule, ensemble, temperature, model), and the
# spacing of the bond-compression grid (0.3 to 3 A). smoke: ~10 min on 2 CPU cores with the smoke
# models (100 fs per trajectory: a check of the pipeline more than of the models).
SHORTRANGE_BUDGETS = {
    "smoke": dict(n_steps=200, seeds=(0, 1), compression_step_a=0.05),
    "cpu": dict(n_steps=4000, seeds=(0, 1, 2, 3, 4), compression_step_a=0.025),
    "paper": dict(n_steps=20000, seeds=tuple(range(10)), compression_step_a=0.025),
}


def shortrange_checkpoints(profile: str = "smoke", molecules: Sequence[str] = MD17_MOLECULES,
                           seed: Optional[int] = None, results_dir=None) -> pd.DataFrame:
    """The best checkpoints of the MD17 DimeNet and DimezblNet runs of a profile (those of
    `make reproduce PROFILE=profile`), one row per (molecule, model): molecule, model, seed,
    checkpoint, run_dir, profile, git_commit. Raises FileNotFoundError naming the command when a
    run is missing (checkpoints are not committed: they exist where `make reproduce` ran)."""
    runs = collect_runs(profile, "md17", results_dir)
    rows = []
    for molecule in molecules:
        molecule = md17_molecule_name(molecule)
        for model in SHORTRANGE_MODELS:
            try:
                path = checkpoint_path(runs, molecule, model, seed, results_dir)
            except (ValueError, FileNotFoundError) as error:
                raise FileNotFoundError(
                    f"no {profile}-profile MD17 {model} checkpoint for {molecule} under "
                    f"{results_path(results_dir, 'runs', profile)} ({error}): run `make reproduce "
                    f"PROFILE={profile}` first (it trains the models; checkpoints are not committed)") from None
            row = runs[(runs["target"] == molecule) & (runs["model"] == model)].sort_values("seed")
            row = row[row["seed"] == seed].iloc[0] if seed is not None else row.iloc[0]
            rows.append({"molecule": molecule, "model": model, "seed": int(row["seed"]), "checkpoint": str(path),
                         "run_dir": row["run_dir"], "profile": profile, "git_commit": row["git_commit"]})
    return pd.DataFrame(rows)


def _shortrange_models(checkpoints: pd.DataFrame) -> list:
    """The models of a checkpoints table in MODEL_RECIPES order (DimeNet, then the ZBL recipes)."""
    present = set(checkpoints["model"])
    return [m for m in MODEL_RECIPES if m in present]


def _checkpoint_of(checkpoints: pd.DataFrame, molecule: str, model: str) -> str:
    rows = checkpoints[(checkpoints["molecule"] == molecule) & (checkpoints["model"] == model)]
    if rows.empty:
        raise ValueError(f"no {model} checkpoint for {molecule} in the checkpoints table "
                         "(see shortrange_checkpoints)")
    return rows["checkpoint"].iloc[0]


def unphysical_state(positions, reference) -> Optional[str]:
    """Why the positions [N, 3] (Angstrom) of the molecule `reference` (ase.Atoms, the starting
    geometry) are an unphysical state, or None. Checked in this order:

    - "not finite": a position is NaN or inf;
    - "close contact": two atoms closer than CLOSE_CONTACT_A = 0.5 A (no covalent bond is shorter:
      H-H is 0.74 A);
    - "bond broken": a bond of `bond_graph(reference)` is longer than BOND_BREAK_FACTOR = 2 x its
      length in `reference`;
    - "new bond": two atoms that are not bonded in `reference` come closer than `bond_graph`'s own
      criterion, 1.2 x the sum of their covalent radii (this also flags real chemistry such as a
      proton transfer; the GFN2-xTB rows of the MD tables show how often the reference does it).

    The reason names the atoms and the distance, e.g. "close contact: atoms 2-5 at 0.41 A".
    """
    from ase.data import covalent_radii

    positions = np.asarray(positions, dtype=np.float64)
    if not np.isfinite(positions).all():
        return "not finite: a position is NaN or inf"
    numbers, start = reference.numbers, reference.get_positions()
    n = len(numbers)
    distance = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    start_distance = np.linalg.norm(start[:, None] - start[None], axis=-1)
    bonded = np.zeros((n, n), dtype=bool)
    for i, j in bond_graph(reference):
        bonded[i, j] = True
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    radii = covalent_radii[numbers]
    checks = (
        ("close contact", upper & (distance < CLOSE_CONTACT_A)),
        ("bond broken", bonded & (distance > BOND_BREAK_FACTOR * start_distance)),
        ("new bond", upper & ~bonded & (distance < BOND_CUTOFF_FACTOR * (radii[:, None] + radii[None]))),
    )
    for name, flagged in checks:
        if flagged.any():
            i, j = np.argwhere(flagged)[0]
            return (f"{name}: atoms {i}-{j} ({reference.get_chemical_symbols()[i]}-"
                    f"{reference.get_chemical_symbols()[j]}) at {distance[i, j]:.2f} A "
                    f"(start {start_distance[i, j]:.2f} A)")
    return None


def md_trajectory(atoms, calculator, ensemble: str = "langevin", temperature_k: float = 500.0, seed: int = 0,
                  n_steps: int = 200, timestep_fs: float = SHORTRANGE_TIMESTEP_FS,
                  friction_per_fs: float = LANGEVIN_FRICTION_PER_FS,
                  check_every: int = SHORTRANGE_CHECK_EVERY) -> dict:
    """One MD trajectory of `atoms` (its positions are the start and the reference of
    `unphysical_state`) with an ASE calculator, stopped at the first unphysical state.

    ensemble "langevin": ase.md.langevin.Langevin at temperature_k (K), friction_per_fs (1/fs);
    "nve": ase.md.verlet.VelocityVerlet. Both start from Maxwell-Boltzmann momenta at
    temperature_k (rng seed `seed`, no centre-of-mass motion or rotation); timestep_fs (fs). The
    state is checked every `check_every` steps; a calculator error (e.g. coincident atoms) also
    ends the trajectory as unphysical. Returns: steps, time_fs, unphysical, reason,
    failure_time_fs (NaN if none), energy_drift_ev_atom_ps (NVE: least-squares slope of the total
    energy over the physical part, eV/atom/ps; NaN for Langevin or under 3 samples),
    max_energy_error_ev_atom (NVE: max |E_total - E_total(0)| per atom, eV), wall_s.
    """
    from ase import units
    from ase.constraints import FixCom
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    if ensemble not in SHORTRANGE_ENSEMBLES:
        raise ValueError(f"unknown ensemble {ensemble!r}: use one of {SHORTRANGE_ENSEMBLES}")
    if n_steps < 1 or check_every < 1 or timestep_fs <= 0 or temperature_k <= 0:
        raise ValueError(f"need n_steps >= 1, check_every >= 1, timestep_fs > 0, temperature_k > 0; got "
                         f"{n_steps}, {check_every}, {timestep_fs}, {temperature_k}")
    reference = atoms.copy()
    atoms = atoms.copy()
    atoms.calc = calculator
    rng = np.random.default_rng(seed)
    _thermalize_momenta(atoms, temperature_k, rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    if ensemble == "langevin":
        atoms.set_constraint(FixCom())  # as generate_md17: no drift of the centre of mass
        dynamics = Langevin(atoms, timestep=timestep_fs * units.fs, temperature_K=temperature_k,
                            friction=friction_per_fs / units.fs, fixcm=False, rng=rng)
    else:
        dynamics = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    start = time.perf_counter()
    times_fs, totals_ev, steps, reason = [], [], 0, None
    try:
        times_fs.append(0.0)
        totals_ev.append(atoms.get_total_energy())
        while steps < n_steps and reason is None:
            block = min(check_every, n_steps - steps)
            dynamics.run(block)
            steps += block
            reason = unphysical_state(atoms.get_positions(), reference)
            total = atoms.get_total_energy()
            if reason is None and not np.isfinite(total):
                reason = "not finite: the energy is NaN or inf"
            if reason is None:
                times_fs.append(steps * timestep_fs)
                totals_ev.append(total)
    except Exception as error:  # an outcome of the trajectory (coincident atoms, SCF failure), recorded
        reason = f"calculator error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    n_atoms = len(atoms)
    times_ps, totals = np.asarray(times_fs) / 1000.0, np.asarray(totals_ev) / n_atoms
    nve = ensemble == "nve"
    drift = float(np.polyfit(times_ps, totals, 1)[0]) if nve and len(totals) >= 3 else math.nan
    return {"steps": steps, "time_fs": steps * timestep_fs, "unphysical": reason is not None,
            "reason": reason or "", "failure_time_fs": steps * timestep_fs if reason else math.nan,
            "energy_drift_ev_atom_ps": drift,
            "max_energy_error_ev_atom": float(np.abs(totals - totals[0]).max()) if nve and len(totals) else math.nan,
            "wall_s": round(time.perf_counter() - start, 3)}


def md_stability(checkpoints: pd.DataFrame, molecules: Optional[Sequence[str]] = None,
                 temperatures_k: Sequence[float] = SHORTRANGE_TEMPERATURES_K,
                 ensembles: Sequence[str] = SHORTRANGE_ENSEMBLES, seeds: Sequence[int] = (0, 1),
                 n_steps: int = 200, timestep_fs: float = SHORTRANGE_TIMESTEP_FS,
                 check_every: int = SHORTRANGE_CHECK_EVERY, reference: bool = True, device: str = "cpu",
                 progress: bool = True) -> pd.DataFrame:
    """`md_trajectory` for every molecule x ensemble x temperature x seed x model (the models of
    `checkpoints`, see `shortrange_checkpoints`, through `DimezblCalculator` in float64; with
    reference=True also GFN2-xTB). Every trajectory starts from the GFN2-xTB optimised geometry
    of the molecule (`optimise_md17_geometry`), the same for all models. One row per trajectory:
    molecule, n_atoms, model, ensemble, temperature_k, seed, n_steps_budget and `md_trajectory`'s
    results."""
    from tqdm.auto import tqdm

    molecules = list(dict.fromkeys(checkpoints["molecule"])) if molecules is None else \
        [md17_molecule_name(m) for m in molecules]
    for ensemble in ensembles:
        if ensemble not in SHORTRANGE_ENSEMBLES:
            raise ValueError(f"unknown ensemble {ensemble!r}: use one of {SHORTRANGE_ENSEMBLES}")
    models = _shortrange_models(checkpoints)
    tasks = [(molecule, ensemble, float(t), int(s)) for molecule in molecules for ensemble in ensembles
             for t in temperatures_k for s in seeds]
    rows = []
    bar = tqdm(total=len(tasks) * (len(models) + bool(reference)), desc="MD stability", unit="trajectory",
               disable=not progress)
    for molecule in molecules:
        atoms, _ = optimise_md17_geometry(molecule)
        calculators = {model: DimezblCalculator.from_checkpoint(_checkpoint_of(checkpoints, molecule, model),
                                                                device=device) for model in models}
        if reference:
            calculators[REFERENCE_MODEL] = xtb_calculator()
        for _, ensemble, temperature_k, seed in (task for task in tasks if task[0] == molecule):
            for model, calculator in calculators.items():
                bar.set_postfix_str(f"{molecule} {ensemble} {temperature_k:g} K seed {seed} {model}")
                result = md_trajectory(atoms, calculator, ensemble, temperature_k, seed, n_steps, timestep_fs,
                                       check_every=check_every)
                rows.append({"molecule": molecule, "n_atoms": len(atoms), "model": model, "ensemble": ensemble,
                             "temperature_k": temperature_k, "seed": seed, "n_steps_budget": n_steps,
                             "timestep_fs": timestep_fs, **result})
                if result["unphysical"]:
                    SHORTRANGE_LOG.info("%s %s %s %g K seed %d: unphysical after %g fs (%s)", molecule, model, ensemble,
                             temperature_k, seed, result["failure_time_fs"], result["reason"])
                bar.update()
    bar.close()
    return pd.DataFrame(rows)


def summarize_md_stability(trajectories: pd.DataFrame) -> pd.DataFrame:
    """Per (model, ensemble, temperature_k) over all molecules and seeds: trajectories,
    unphysical (count), unphysical_percent, median failure time (fs), the reasons counted, and
    for NVE the median |energy drift| (eV/atom/ps) and max |E_total - E_total(0)| (eV/atom) of
    the trajectories that stayed physical."""
    rows = []
    order = {name: k for k, name in enumerate((*MODEL_RECIPES, REFERENCE_MODEL))}
    for (model, ensemble, temperature), group in trajectories.groupby(["model", "ensemble", "temperature_k"]):
        failed, physical = group[group["unphysical"]], group[~group["unphysical"]]
        reasons = failed["reason"].str.split(":").str[0].value_counts()
        nve = ensemble == "nve" and len(physical)
        rows.append({
            "model": MODEL_LABELS_SHORTRANGE.get(model, model), "ensemble": ensemble,
            "temperature_k": temperature, "molecules": group["molecule"].nunique(), "trajectories": len(group),
            "unphysical": len(failed), "unphysical_percent": round(100.0 * len(failed) / len(group), 1),
            "median_failure_time_fs": failed["failure_time_fs"].median() if len(failed) else math.nan,
            "reasons": "; ".join(f"{name} {count}" for name, count in reasons.items()) or "none",
            "median_abs_drift_ev_atom_ps": physical["energy_drift_ev_atom_ps"].abs().median() if nve else math.nan,
            "max_energy_error_ev_atom": physical["max_energy_error_ev_atom"].max() if nve else math.nan,
            "simulated_time_fs": group["n_steps_budget"].iloc[0] * group["timestep_fs"].iloc[0],
            "_order": order.get(model, len(order)),
        })  # fmt: skip
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    return table.sort_values(["ensemble", "temperature_k", "_order"]).drop(columns="_order").reset_index(drop=True)


# --- bond compression against GFN2-xTB ---

def element_pair_bonds(atoms) -> list:
    """One bond (i, j) per element pair of `bond_graph(atoms)` (C-H, C-C, C-O, O-H, N-H, C-N, ...):
    the lowest-index bond of each pair; j, the atom that moves in a compression curve, is the H
    where there is one, else the higher index. Sorted by the pair's symbols."""
    symbols = atoms.get_chemical_symbols()
    chosen = {}
    for i, j in sorted(bond_graph(atoms)):
        if symbols[i] == "H" and symbols[j] != "H":
            i, j = j, i
        pair = tuple(sorted((symbols[i], symbols[j])))
        chosen.setdefault(pair, (i, j))
    return [chosen[pair] for pair in sorted(chosen)]


def xtb_bond_scan(atoms, bond, distances_a, unit: str = "kcal/mol", num_threads: int = 1) -> np.ndarray:
    """GFN2-xTB energies E(r) - E(r0) in `unit` of `atoms` with atom j of bond (i, j) moved
    along the bond to d_ij = r (distances_a, Angstrom), as `compression_curve` moves it; r0 is
    the bond length in `atoms`. NaN (logged) where tblite does not converge."""
    i, j = _bond_atoms(atoms, bond)
    base = atoms.get_positions()
    r0 = float(np.linalg.norm(base[j] - base[i]))
    unit_vector = (base[j] - base[i]) / r0
    probe = atoms.copy()
    probe.calc = xtb_calculator(num_threads)
    per_ev = 1.0 / energy_unit_in_ev(unit)
    energies = []
    for r in np.append(np.asarray(distances_a, dtype=np.float64), r0):  # the last one is the reference
        positions = base.copy()
        positions[j] = base[i] + r * unit_vector
        probe.set_positions(positions)
        try:
            energies.append(probe.get_potential_energy() * per_ev)
        except Exception as error:  # tblite's SCF at extreme compression
            SHORTRANGE_LOG.warning("GFN2-xTB failed at r = %.3f A for bond %d-%d: %s", r, i, j, error)
            energies.append(math.nan)
    energies = np.asarray(energies)
    return energies[:-1] - energies[-1]


def compression_curve_with_reference(checkpoint, bond, atoms=None, distances_a=None, dimenet_checkpoint=None,
                                     device: str = "cpu", other_checkpoints=None) -> pd.DataFrame:
    """`compression_curve` with a "GFN2-xTB" column: the reference method on the same
    geometries (`xtb_bond_scan`), relative to r0, in the model's unit (kcal/mol for MD17)."""
    curve = compression_curve(checkpoint, bond, atoms, distances_a, dimenet_checkpoint, device, other_checkpoints)
    if atoms is None:
        config = TrainConfig.from_dict(load_checkpoint(checkpoint)["config"])
        atoms = md17_start_geometry(config.target)[0] if config.dataset == "md17" else None
        if atoms is None:
            raise ValueError("give `atoms` for a QM9 model's compression curve with the GFN2-xTB reference")
    curve["GFN2-xTB"] = xtb_bond_scan(atoms, bond, curve["distance_a"].to_numpy(), curve.attrs["unit"])
    return curve


def shortrange_compression(checkpoints: pd.DataFrame, molecules: Optional[Sequence[str]] = None,
                           distances_a=None, device: str = "cpu", progress: bool = True) -> list:
    """`compression_curve_with_reference` for each molecule and each of its `element_pair_bonds`,
    on the GFN2-xTB optimised geometry (r0 = GFN2-xTB's bond length), DimezblNet and DimeNet of
    `checkpoints` side by side. Returns the curves (attrs: molecule_name, bond, r0_a, unit)."""
    from tqdm.auto import tqdm

    molecules = list(dict.fromkeys(checkpoints["molecule"])) if molecules is None else \
        [md17_molecule_name(m) for m in molecules]
    curves = []
    for molecule in tqdm(molecules, desc="bond compression", unit="molecule", disable=not progress):
        atoms, _ = optimise_md17_geometry(molecule)
        dimezblnet = _checkpoint_of(checkpoints, molecule, "dimezblnet")
        dimenet = _checkpoint_of(checkpoints, molecule, "dimenet") \
            if (checkpoints["model"] == "dimenet").any() else None
        others = {MODEL_LABELS.get(m, m): _checkpoint_of(checkpoints, molecule, m)
                  for m in _shortrange_models(checkpoints) if m not in ("dimenet", "dimezblnet")}
        for bond in element_pair_bonds(atoms):
            curve = compression_curve_with_reference(dimezblnet, bond, atoms, distances_a, dimenet, device, others)
            curve.attrs["molecule_name"] = molecule
            curves.append(curve)
    return curves


def _first_at_or_below(curve: pd.DataFrame, column: str, distance_a: float) -> float:
    rows = curve[curve["distance_a"] <= distance_a + 1e-9]
    return float(rows[column].iloc[-1]) if len(rows) else math.nan


def summarize_compression(curves: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """One row per curve: molecule, bond, r0_a, E(r) - E(r0) at r = 0.5 A and r = 0.8 A (the grid
    point at or below) for GFN2-xTB, DimeNet, DimezblNet, and each model's "hole": the minimum of
    E(r) - E(r0) over r < r0 (negative: the model puts a compressed bond below equilibrium,
    which the reference never does), in the curves' unit."""
    rows = []
    for curve in curves:
        models = ["GFN2-xTB"] + [c for c in curve.columns if c not in ("distance_a", "learned part", "ZBL", "GFN2-xTB")]
        unit = curve.attrs["unit"]
        row = {"molecule": curve.attrs.get("molecule_name", curve.attrs["molecule"]),
               "bond": curve.attrs["bond"].split(" (")[0], "atoms": curve.attrs["bond"].split("(atoms ")[-1][:-1],
               "r0_a": round(curve.attrs["r0_a"], 3), "unit": unit}
        compressed = curve[curve["distance_a"] < curve.attrs["r0_a"]]
        for r in (0.5, 0.8):
            for model in models:
                if model in curve:
                    row[f"{model} E({r} A)"] = _first_at_or_below(curve, model, r)
        for model in models:
            if model in curve:
                row[f"{model} hole"] = float(compressed[model].min()) if len(compressed) else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# --- tables, figures and the whole experiment (make shortrange) ---

def _markdown_grid(table: pd.DataFrame, digits: int = 3) -> str:
    """A plain GitHub-flavoured Markdown table (floats to `digits` significant digits)."""
    def cell(value):
        if isinstance(value, (float, np.floating)):
            return "–" if math.isnan(value) else f"{value:.{digits}g}"
        return str(value).replace("|", "\\|")
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_shortrange_table(table: pd.DataFrame, header_lines: Sequence[str], basename: str,
                           results_dir=None) -> dict:
    """<results_dir>/shortrange/<basename>.csv and .md, each opening with the provenance block
    (CSV: '# ' lines, read with pandas.read_csv(path, comment='#'); Markdown: a list), each
    written to a temporary name and renamed."""
    folder = results_path(results_dir, "shortrange")
    header = [str(line).replace("\n", " ") for line in header_lines]
    contents = {"csv": "".join(f"# {line}\n" for line in header) + table.to_csv(index=False),
                "md": "".join(f"- {line}\n" for line in header) + "\n" + _markdown_grid(table)}
    paths = {}
    for suffix, text in contents.items():
        paths[suffix] = folder / f"{basename}.{suffix}"
        _atomic_write_bytes(paths[suffix], text.encode("utf-8"))
    return paths


def shortrange_header(title: str, checkpoints: pd.DataFrame, budget: Mapping) -> list:
    """The provenance block of a short-range table: what it is, the checkpoints (profile, run
    directories, git commits of their training), the budget and seeds, reference method,
    software, hardware, the commit the table was written at, and the date."""
    runs = checkpoints.drop_duplicates(["molecule", "model"])
    commits = sorted({str(c) for c in runs.get("git_commit", pd.Series(dtype=str)).dropna()}) or ["unknown"]
    profiles = sorted({str(p) for p in runs.get("profile", pd.Series(dtype=str)).dropna()}) or ["custom"]
    where = runs["run_dir"] if "run_dir" in runs else runs["checkpoint"]
    software = _software_versions()
    git = git_state()
    return [
        title,
        f"Checkpoints: {len(runs)} best (EMA) checkpoints, profile {', '.join(profiles)}, trained at git commit "
        f"{', '.join(commits)}: " + "; ".join(f"{m} {model}: {w}" for m, model, w in
                                              zip(runs["molecule"], runs["model"], where)),
        "Budget: " + ", ".join(f"{key} {value}" for key, value in budget.items()),
        f"Reference: {XTB_METHOD} (tblite {software.get('tblite')}), the method that generated the offline MD17 "
        "data; start geometries: GFN2-xTB optimised (optimise_md17_geometry)",
        f"Unphysical state: a distance below {CLOSE_CONTACT_A} A, a starting bond stretched beyond "
        f"{BOND_BREAK_FACTOR:g}x, a new bond (d < {BOND_CUTOFF_FACTOR} x sum of covalent radii), a non-finite "
        "value or a calculator error (dimezbl_core.unphysical_state)",
        f"Software: torch {software.get('torch')}, ase {software.get('ase')}, numpy {software.get('numpy')}",
        f"Hardware: {_hardware_text(hardware_description(torch.device('cpu')))}",
        f"Written at git commit {git.get('commit')}{' (uncommitted changes)' if git.get('dirty') else ''}, "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %z')} on {platform.node() or '?'}",
    ]


def plot_md_stability(summary: pd.DataFrame, results_dir=None, name: str = "shortrange_md_stability"):
    """Percent of unphysical trajectories against temperature (K) per model, Langevin and NVE
    panels, and the NVE energy drift (eV/atom/ps, log scale) of the physical trajectories."""
    if summary.empty:
        raise ValueError("no MD stability results to plot")
    colors = {**{MODEL_LABELS[m]: color for m, color in MODEL_COLORS.items()}, "GFN2-xTB": "k"}
    models = list(dict.fromkeys(summary["model"]))
    fig, axes = _figure(3, width=4.2, height=3.4)
    width = 0.8 / len(models)
    for ax, ensemble in zip(axes[0][:2], SHORTRANGE_ENSEMBLES):
        rows = summary[summary["ensemble"] == ensemble]
        temperatures = sorted(set(rows["temperature_k"]))
        for k, model in enumerate(models):
            of_model = rows[rows["model"] == model].set_index("temperature_k")
            values = [of_model["unphysical_percent"].get(t, math.nan) for t in temperatures]
            ax.bar(np.arange(len(temperatures)) + (k - (len(models) - 1) / 2) * width, values, width,
                   color=colors.get(model), label=model)
        ax.set_xticks(np.arange(len(temperatures)), [f"{t:g}" for t in temperatures])
        ax.set(xlabel="temperature (K)", ylabel="unphysical trajectories (%)", ylim=(0, 130),
               yticks=np.arange(0, 101, 20),
               title=f"{'Langevin' if ensemble == 'langevin' else 'NVE (velocity Verlet)'}, "
                     f"{rows['simulated_time_fs'].max():g} fs" if len(rows) else ensemble)
        ax.legend(fontsize=7, loc="upper center", ncol=len(models))  # above the 100% bars
    ax = axes[0][2]
    nve = summary[(summary["ensemble"] == "nve") & summary["median_abs_drift_ev_atom_ps"].notna()]
    for model in models:
        of_model = nve[nve["model"] == model]
        ax.plot(of_model["temperature_k"], of_model["median_abs_drift_ev_atom_ps"], marker="o",
                color=colors.get(model), label=model)
    ax.set(xlabel="start temperature (K)", ylabel="median |energy drift| (eV/atom/ps)",
           title="NVE drift, physical trajectories")
    if len(nve) and (nve["median_abs_drift_ev_atom_ps"] > 0).all():
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.suptitle(f"MD stability over {summary['molecules'].max()} MD17 molecule(s)")
    return save_figure(fig, name, results_dir)


def shortrange_experiment(profile: str = "smoke", molecules: Optional[Sequence[str]] = None,
                          checkpoints: Optional[pd.DataFrame] = None, seeds: Optional[Sequence[int]] = None,
                          n_steps: Optional[int] = None, temperatures_k: Sequence[float] = SHORTRANGE_TEMPERATURES_K,
                          ensembles: Sequence[str] = SHORTRANGE_ENSEMBLES, timestep_fs: float = SHORTRANGE_TIMESTEP_FS,
                          compression_step_a: Optional[float] = None, compression: bool = True,
                          reference: bool = True, results_dir=None, device: str = "cpu",
                          progress: bool = True) -> dict:
    """The short-range experiment (`make shortrange`): bond compression against GFN2-xTB and MD
    stability for the MD17 DimeNet and DimezblNet models of `profile` (or `checkpoints`, a
    `shortrange_checkpoints`-like table). Budget: SHORTRANGE_BUDGETS[profile] unless given
    (n_steps MD steps of timestep_fs per trajectory, seeds, compression grid spacing in A).

    Writes results/shortrange/{compression_curves.csv, compression_summary.{csv,md},
    md_stability.{csv,md} (summary), md_trajectories.csv (every trajectory)} with provenance
    headers, and results/figures/shortrange_compression_<molecule>.png and
    shortrange_md_stability.png. Returns the tables and curves."""
    if profile not in SHORTRANGE_BUDGETS:
        raise ValueError(f"unknown profile {profile!r}: use one of {sorted(SHORTRANGE_BUDGETS)}")
    budget = dict(SHORTRANGE_BUDGETS[profile])
    budget.update({k: v for k, v in dict(n_steps=n_steps, seeds=seeds, compression_step_a=compression_step_a).items()
                   if v is not None})
    molecules = list(MD17_MOLECULES if molecules is None else [md17_molecule_name(m) for m in molecules])
    if checkpoints is None:
        checkpoints = shortrange_checkpoints(profile, molecules, results_dir=results_dir)
    result = {"checkpoints": checkpoints}
    if compression:
        distances = np.round(np.arange(COMPRESSION_DISTANCES_A[0], COMPRESSION_DISTANCES_A[-1] + 1e-9,
                                       budget["compression_step_a"]), 3)
        curves = shortrange_compression(checkpoints, molecules, distances, device, progress)
        summary = summarize_compression(curves)
        header = shortrange_header(
            f"Bond compression E(r) - E(r0) ({curves[0].attrs['unit']}), one bond per element pair of each MD17 "
            "molecule, atom j moved along the bond, all others fixed; 'hole' = min over r < r0 (negative is "
            "unphysical)", checkpoints,
            {"distances": f"{distances[0]:g}-{distances[-1]:g} A every {budget['compression_step_a']:g} A",
             "molecules": " ".join(molecules)})
        long = pd.concat([curve.assign(molecule=curve.attrs["molecule_name"],
                                       bond=curve.attrs["bond"], r0_a=curve.attrs["r0_a"]) for curve in curves])
        write_shortrange_table(long, header, "compression_curves", results_dir)
        write_shortrange_table(summary, header, "compression_summary", results_dir)
        for molecule in dict.fromkeys(summary["molecule"]):
            plot_compression_curves([c for c in curves if c.attrs["molecule_name"] == molecule], results_dir,
                                    name=f"shortrange_compression_{molecule}")
        result.update(curves=curves, compression_summary=summary)
    trajectories = md_stability(checkpoints, molecules, temperatures_k, ensembles, budget["seeds"],
                                budget["n_steps"], timestep_fs, reference=reference, device=device,
                                progress=progress)
    summary = summarize_md_stability(trajectories)
    header = shortrange_header(
        "MD stability: trajectories that reach an unphysical state within the simulated time, and NVE energy "
        "drift, per model, ensemble and temperature, over all molecules and seeds", checkpoints,
        {"molecules": " ".join(molecules), "ensembles": " ".join(ensembles),
         "temperatures": " ".join(f"{t:g} K" for t in temperatures_k),
         "seeds": " ".join(map(str, budget["seeds"])), "steps": budget["n_steps"], "timestep": f"{timestep_fs:g} fs",
         "simulated time": f"{budget['n_steps'] * timestep_fs:g} fs per trajectory",
         "Langevin friction": f"{LANGEVIN_FRICTION_PER_FS:g} 1/fs", "state checked every": f"{SHORTRANGE_CHECK_EVERY} steps",
         "model precision": "float64 (DimezblCalculator)"})
    write_shortrange_table(summary, header, "md_stability", results_dir)
    write_shortrange_table(trajectories, header, "md_trajectories", results_dir)
    plot_md_stability(summary, results_dir)
    result.update(trajectories=trajectories, md_summary=summary)
    return result


def shortrange_main(argv: Optional[Sequence[str]] = None) -> int:
    """`python dimezbl_core.py shortrange [--profile smoke] ...` (make shortrange)."""
    parser = argparse.ArgumentParser(
        prog="python dimezbl_core.py shortrange",
        description="Bond compression against GFN2-xTB and MD stability (Langevin and NVE at 500-1500 K) of the "
                    "MD17 DimeNet and DimezblNet models trained by `make reproduce`; results/shortrange/ and "
                    "results/figures/.")
    parser.add_argument("--profile", default="smoke", choices=sorted(PROFILES),
                        help="whose models, and the budget of SHORTRANGE_BUDGETS")
    parser.add_argument("--molecules", nargs="+", default=None, help="default: the 8 MD17 molecules")
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--n-steps", type=int, default=None, help="MD steps per trajectory (0.5 fs)")
    parser.add_argument("--temperatures", nargs="+", type=float, default=list(SHORTRANGE_TEMPERATURES_K),
                        help="K")
    parser.add_argument("--ensembles", nargs="+", choices=SHORTRANGE_ENSEMBLES, default=list(SHORTRANGE_ENSEMBLES))
    parser.add_argument("--no-compression", action="store_true", help="skip the bond-compression curves")
    parser.add_argument("--no-reference", action="store_true", help="skip the GFN2-xTB MD trajectories")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        result = shortrange_experiment(args.profile, args.molecules, seeds=args.seeds, n_steps=args.n_steps,
                                       temperatures_k=args.temperatures, ensembles=args.ensembles,
                                       compression=not args.no_compression, reference=not args.no_reference,
                                       results_dir=args.results_dir, progress=not args.no_progress)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_markdown_grid(result["md_summary"]))
    print(f"tables in {results_path(args.results_dir, 'shortrange')}, figures in "
          f"{results_path(args.results_dir, 'figures')}")
    return 0


# =============================================================================================
# --- Command-line entry ---
# =============================================================================================


def main(argv=None) -> int:
    """`python dimezbl_core.py {train,evaluate,export,shortrange,generate-md17,run-models,reproduce,zbl-term,readme-tables} ...`
    (see --help)."""
    import argparse
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["generate-md17"]:
        return generate_md17_main(argv[1:])
    if argv[:1] == ["reproduce"]:
        return reproduce_main(argv[1:])
    if argv[:1] == ["shortrange"]:
        return shortrange_main(argv[1:])
    if argv[:1] == ["run-models"]:
        return run_models_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="python dimezbl_core.py", description="DimezblNet companion (DimeNet + ZBL)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train_parser = sub.add_parser("train", help="train one model (resumes from its checkpoint)")
    add_train_arguments(train_parser)
    evaluate_parser = sub.add_parser("evaluate", help="evaluate a checkpoint")
    evaluate_parser.add_argument("--checkpoint", required=True)
    evaluate_parser.add_argument("--subset", choices=("valid", "test"), default="test")
    evaluate_parser.add_argument("--device", default="auto")
    export_parser = sub.add_parser("export", help="write a checkpoint as a self-contained TorchScript file "
                                   "(energy and forces; load with torch.jit.load, no dimezbl_core needed)")
    export_parser.add_argument("checkpoint", help="a checkpoint_best.pt of an energy model")
    export_parser.add_argument("out", help="the TorchScript file to write, e.g. model.pt")
    export_parser.add_argument("--dtype", choices=("float32", "float64"), default=None,
                               help="default: the checkpoint's training dtype")
    sub.add_parser("shortrange", help="bond compression against GFN2-xTB and MD stability of the MD17 models "
                   "(make shortrange; see its --help)")
    sub.add_parser("generate-md17", help="generate MD17-style data with GFN2-xTB (see its --help)")
    sub.add_parser("run-models", help="train every (target, model, seed) of a profile without the notebooks, "
                   "resumable (see its --help)")
    sub.add_parser("reproduce", help="regenerate Tables 1 and 2 and the figures (notebooks 01-05, "
                   "see its --help)")
    zbl_parser = sub.add_parser("zbl-term", help="write zbl_term.json (learned ZBL weight and what the term "
                                "adds) for finished DimezblNet runs from their best checkpoints")
    zbl_parser.add_argument("run_dirs", nargs="+", help="run directories holding checkpoint_best.pt")
    zbl_parser.add_argument("--subset", choices=("train", "valid", "test"), default="test")
    zbl_parser.add_argument("--data-dir", default=None)
    sub.add_parser("readme-tables", help="copy the committed tables (README_TABLES) into README.md's "
                   "marked blocks, after a rebuild of the tables")
    args = parser.parse_args(argv)
    if args.command == "train":
        config = config_from_arguments(args)
        try:
            metrics = train(config, resume=not args.no_resume, progress=not args.no_progress)
        except TrainingDiverged as error:
            print(f"error: {error}", file=sys.stderr)
            return 3
        print(json.dumps(metrics, indent=2))
    elif args.command == "evaluate":
        print(json.dumps(evaluate_checkpoint(args.checkpoint, args.subset, args.device), indent=2))
    elif args.command == "export":
        metadata = export_model(args.checkpoint, args.out, getattr(torch, args.dtype) if args.dtype else None)
        print(f"wrote {args.out}: energy in {metadata['energy_unit']}, forces in {metadata['forces_unit']}, "
              f"{metadata['dtype']}; training offset {metadata['offset']}")
    elif args.command == "zbl-term":
        for run_dir in args.run_dirs:
            term = write_zbl_term(run_dir, args.subset, data_dir=args.data_dir)
            print(f"{Path(run_dir) / ZBL_TERM_FILE}: weight {term['zbl_weight']:.5g}, contribution "
                  f"{term['contribution']['mean']:.4g} +- {term['contribution']['std']:.3g} "
                  f"{term['contribution']['unit']} over {term['n_molecules']} {term['subset']} molecules")
    elif args.command == "readme-tables":
        path = REPOSITORY_ROOT / "README.md"
        text = path.read_text(encoding="utf-8")
        updated = readme_with_tables(text)
        if updated != text:
            _atomic_write_bytes(path, updated.encode("utf-8"))
        print(f"{path}: {'updated' if updated != text else 'already up to date'} "
              f"({', '.join(README_TABLES.values())})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
