"""DimezblNet: DimeNet with an explicit ZBL screened nuclear repulsion, the model core in one module.

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
=====================================  ===================================================

It imports only the standard library, numpy and torch. What drives the model (data, training,
profiles, tables, figures, notebooks, the ASE calculator, export, experiments, the `dimezbl`
command line) is the package `dimezbl` beside it, which imports this module and never the reverse.

Units: positions in Angstrom everywhere. Energies are in the unit of the target the model is
trained on (eV for QM9 energies, kcal/mol for MD17); the ZBL term is evaluated in that unit
(`zbl_unit`). Forces are in energy unit per Angstrom.

The DimeNet part follows the original implementation (klicperajo/dimenet) and PyTorch
Geometric's `torch_geometric.nn.models.DimeNet` exactly, including its quirks (see
`DimezblNet`), so that PyG state dicts load with `load_pyg_dimenet_state_dict`.
"""

from __future__ import annotations

import ctypes
import math
import os
import shlex
import shutil
import subprocess
import tempfile
import warnings
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


# Covalent radii in Angstrom by atomic number 0..94 (Cordero et al. 2008, the table of ase.data.covalent_radii,
# which MACE uses too; index 0 is ase's placeholder 0.2). tests/test_zbl.py checks it against ase.
COVALENT_RADII_A = (
    0.2, 0.31, 0.28, 1.28, 0.96, 0.84, 0.76, 0.71, 0.66, 0.57, 0.58, 1.66, 1.41, 1.21, 1.11, 1.07, 1.05, 1.02, 1.06,
    2.03, 1.76, 1.7, 1.6, 1.53, 1.39, 1.39, 1.32, 1.26, 1.24, 1.32, 1.22, 1.22, 1.2, 1.19, 1.2, 1.2, 1.16, 2.2, 1.95,
    1.9, 1.75, 1.64, 1.54, 1.47, 1.46, 1.42, 1.39, 1.45, 1.44, 1.42, 1.39, 1.39, 1.38, 1.39, 1.4, 2.44, 2.15, 2.07,
    2.04, 2.03, 2.01, 1.99, 1.98, 1.98, 1.96, 1.94, 1.92, 1.92, 1.89, 1.9, 1.87, 1.87, 1.75, 1.7, 1.62, 1.51, 1.44,
    1.41, 1.36, 1.36, 1.32, 1.45, 1.46, 1.48, 1.4, 1.5, 1.5, 2.6, 2.21, 2.15, 2.06, 2.0, 1.96, 1.9, 1.87,
)  # fmt: skip


def covalent_radii_a() -> np.ndarray:
    """Covalent radii in Angstrom indexed by atomic number (COVALENT_RADII_A): H 0.31, C 0.76, N 0.71, O 0.66,
    F 0.57."""
    return np.asarray(COVALENT_RADII_A, dtype=np.float64)


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
    local = torch.arange(target.numel(), device=device) - torch.repeat_interleave(pair_start, pairs_per_atom)
    source = first_atom[batch[target]] + local
    with torch.no_grad():
        dist = torch.linalg.vector_norm(pos[target] - pos[source], dim=-1)
    keep = (target != source) & (dist <= cutoff)
    return torch.stack([source[keep], target[keep]])


def triplets(edge_index: Tensor, num_nodes: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
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
    local = torch.arange(idx_ji.numel(), device=device) - torch.repeat_interleave(triplet_start, num_triplets)
    # index_select, not advanced indexing: several times faster for these 1-D gathers on the CPU
    idx_j = source.index_select(0, idx_ji)
    idx_kj = first_in_edge.index_select(0, idx_j) + local
    idx_i, idx_k = target.index_select(0, idx_ji), source.index_select(0, idx_kj)
    keep = (idx_i != idx_k).nonzero().squeeze(1)
    return (
        target,
        source,
        idx_i.index_select(0, keep),
        idx_j.index_select(0, keep),
        idx_k.index_select(0, keep),
        idx_kj.index_select(0, keep),
        idx_ji.index_select(0, keep),
    )


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
                0, flat_position, torch.arange(flat_position.numel(), device=device)
            )
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
    def transposed(cls, idx_kj: Tensor, idx_ji: Tensor, num_edges: int, num_weights: int) -> TripletPlan:
        """The plan of `triplet_contract`: the roles of kj and ji swapped."""
        return cls(idx_ji, idx_kj, num_edges, num_weights)

    def matrix(self, values: Tensor, transpose: bool = False) -> Tensor:
        """M(values) [E*B, E] in CSR, or its transpose [E, E*B]; values [T, B]."""
        n, nb = self.num_edges, self.num_edges * self.num_weights
        if transpose:
            return torch.sparse_csr_tensor(
                self.crow_t, self.col_t, self._csr_values(values, True), (n, nb), check_invariants=False
            )
        return torch.sparse_csr_tensor(
            self.crow, self.col, self._csr_values(values, False), (nb, n), check_invariants=False
        )

    def share_values(self, values: Tensor) -> TripletPlan:
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
            pattern = torch.sparse_csr_tensor(
                crow, col, rows.new_zeros(col.numel()), (rows.size(0), columns.size(0)), check_invariants=False
            )
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
            "aggregate": (
                lambda: apply(grad, b, plan, "sampled"),  # s: <g[ji B + b], x[kj]>
                lambda: apply(a, grad, plan, "transpose"),
            ),  # x: M(s)^T g
            "transpose": (
                lambda: apply(b, grad, plan, "sampled"),  # s: <y[ji B + b], g[kj]>
                lambda: apply(a, grad, plan, "aggregate"),
            ),  # y: M(s) g
            "sampled": (
                lambda: apply(grad, b, plan, "aggregate"),  # y: M(g) x
                lambda: apply(grad, a, plan, "transpose"),
            ),  # x: M(g)^T y
        }[ctx.kind]
        return tuple(f() if needed else None for f, needed in zip(gradients, ctx.needs_input_grad[:2])) + (None, None)


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
        j_prev, j_cur = (
            j_cur[..., start:, :],
            ((2 * order + 1) / xr[..., order + 1 :, :] * j_cur[..., start:, :] - j_prev[..., start:, :]),
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
    zeros = np.zeros((num_spherical, num_radial))
    points = np.arange(1, num_radial + num_spherical) * np.pi  # zeros of j_0
    zeros[0] = points[:num_radial]
    for order in range(1, num_spherical):
        roots = _bisect_roots(order, points[:-1], points[1:])
        zeros[order], points = roots[:num_radial], roots
    return zeros


def _spherical_jn_float64(order: int, x: np.ndarray) -> np.ndarray:
    """j_order(x) in float64 (`spherical_bessel_jn`), for the constants of the bases."""
    values = spherical_bessel_jn(torch.as_tensor(x, dtype=torch.float64), order + 1)
    return values[..., order].numpy()


def _bisect_roots(order: int, low: np.ndarray, high: np.ndarray, iterations: int = 100) -> np.ndarray:
    """The root of j_order in each bracket [low, high] (a sign change), by bisection of all brackets at once
    until the brackets stop shrinking in float64."""
    low, high = np.array(low, dtype=np.float64), np.array(high, dtype=np.float64)
    f_low = _spherical_jn_float64(order, low)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if np.all((middle == low) | (middle == high)):
            break
        f_middle = _spherical_jn_float64(order, middle)
        left = np.sign(f_middle) == np.sign(f_low)  # the root lies above the middle
        low, f_low = np.where(left, middle, low), np.where(left, f_middle, f_low)
        high = np.where(left, high, middle)
    return 0.5 * (low + high)


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

    def __init__(self, num_spherical: int, num_radial: int, cutoff: float = 5.0, envelope_exponent: int = 5):
        super().__init__()
        self.num_spherical, self.num_radial, self.cutoff = num_spherical, num_radial, cutoff
        self.envelope = Envelope(envelope_exponent)
        # The original's Jn_zeros (kept by PyG) stores the zeros, and so the normaliser, in
        # float32; we keep that rounding (relative 1e-7) so that PyG/DimeNet weights give the
        # same energies to ~1e-12 instead of ~1e-6. `bessel_zeros` itself is float64.
        zeros = bessel_zeros(num_spherical, num_radial).astype(np.float32)
        # j_{l+1}(z) = sqrt(pi / (2 z)) J_{l+3/2}(z): J_{l+3/2} at the float32 zeros in float64, rounded to float32
        # (as scipy.special.jv returns it for float32 input), then the float32 product as DimeNet computes it
        j_next_exact = np.stack(
            [_spherical_jn_float64(l + 1, zeros[l].astype(np.float64)) for l in range(num_spherical)]
        )
        cylindrical = (j_next_exact / np.sqrt(np.pi / (2 * zeros.astype(np.float64)))).astype(np.float32)
        j_next = np.sqrt(np.float32(np.pi) / (2 * zeros)) * cylindrical
        normalizer = 1 / (np.float32(0.5) * j_next**2) ** np.float32(0.5)  # float32 as DimeNet
        sph_prefactor = np.sqrt((2 * np.arange(num_spherical) + 1) / (4 * np.pi))
        # Derived from the hyperparameters, so not in the state dict (as in PyG).
        self.constants = ConstantTable(zeros=zeros, normalizer=normalizer, sph_prefactor=sph_prefactor)

    def radial(self, dist: Tensor) -> Tensor:
        """Enveloped, normalised j_l(z_ln d/c) per edge: [E, num_spherical, num_radial]."""
        x = dist / self.cutoff
        coefficients = _series_coefficients(self.num_spherical, x).unsqueeze(-1)  # [K + 1, L, 1]
        return _sbf_radial(
            x, self.constants.get("zeros", x), self.constants.get("normalizer", x), coefficients, self.envelope.p
        )

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
    return _zbl_terms(
        z_i,
        z_j,
        r,
        coulomb_constant(unit),
        ZBL_SCREENING_LENGTH_A,
        ZBL_SCREENING_EXPONENT,
        [float(c) for c in ZBL_PHI_COEFFICIENTS],
        [float(d) for d in ZBL_PHI_EXPONENTS],
    )


def _zbl_terms(
    z_i: Tensor,
    z_j: Tensor,
    r: Tensor,
    coulomb: float,
    screening_length_a: float,
    screening_exponent: float,
    coefficients: List[float],
    exponents: List[float],
) -> Tuple[Tensor, Tensor, Tensor]:
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


def _zbl_switched(
    z_i: Tensor,
    z_j: Tensor,
    r: Tensor,
    reach: str,
    coulomb: float,
    cutoff_a: float,
    inner_a: float,
    outer_a: float,
    envelope_p: int,
    covalent_radii: Tensor,
    screening_length_a: float,
    screening_exponent: float,
    coefficients: List[float],
    exponents: List[float],
) -> Tensor:
    """`ZBL.pair_energy` with every constant given (TorchScript-compatible: the exported model
    calls it with its own copies): the pair energy of `_zbl_terms` switched off as `reach` says."""
    energy = _zbl_terms(z_i, z_j, r, coulomb, screening_length_a, screening_exponent, coefficients, exponents)[0]
    if reach == "cutoff":
        return energy * envelope_polynomial(r / cutoff_a, envelope_p)
    if reach == "covalent":
        return energy * envelope_polynomial(r / (covalent_radii[z_i] + covalent_radii[z_j]), envelope_p)
    # LAMMPS pair_style zbl inner outer
    fc, dfc, d2fc = _zbl_terms(
        z_i, z_j, torch.full_like(r, outer_a), coulomb, screening_length_a, screening_exponent, coefficients, exponents
    )
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


def zbl_interpolation_weights(
    dist: Tensor,
    target: Tensor,
    num_atoms: int,
    inner_a: float,
    outer_a: float,
    softmin_length_a: float = ZBL_SOFTMIN_LENGTH_A,
) -> Tensor:
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
            raise ValueError(
                f"the ZBL interpolation needs 0 < zbl_switch_inner_a < zbl_switch_outer_a < cutoff, "
                f"got {switch_inner_a}, {switch_outer_a}, {cutoff_a} (Angstrom)"
            )
        self.combine_mode, self.switch_inner_a, self.switch_outer_a = combine, switch_inner_a, switch_outer_a
        if reach not in ZBL_REACHES:
            raise ValueError(f"unknown ZBL reach {reach!r}: use one of {ZBL_REACHES}")
        if reach == "lammps" and not 0 < inner_a < outer_a <= cutoff_a:
            raise ValueError(
                f"ZBL switch needs 0 < inner_a < outer_a <= cutoff_a, got {inner_a}, {outer_a}, {cutoff_a} (Angstrom)"
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
        return _zbl_switched(
            z_i,
            z_j,
            r,
            self.reach,
            coulomb_constant(self.unit),
            self.cutoff_a,
            self.inner_a,
            self.outer_a,
            self.envelope_p,
            self.constants.get("covalent_radii", r),
            ZBL_SCREENING_LENGTH_A,
            ZBL_SCREENING_EXPONENT,
            [float(c) for c in ZBL_PHI_COEFFICIENTS],
            [float(d) for d in ZBL_PHI_EXPONENTS],
        )

    def forward(self, z: Tensor, edge_index: Tensor, dist: Tensor, pos_first_order: bool = False) -> Tensor:
        """Per-atom energies [N]; `pos_first_order`: see `first_order`."""
        source, target = edge_index
        z_i, z_j = z[target], z[source]
        if pos_first_order:
            pair = first_order(lambda r: self.pair_energy(z_i, z_j, r), dist)
        else:
            pair = self.pair_energy(z_i, z_j, dist)
        return self.scale * scatter_sum(0.5 * pair, target, z.numel())  # [N]

    def combine(
        self, network: Tensor, z: Tensor, edge_index: Tensor, dist: Tensor, pos_first_order: bool = False
    ) -> Tensor:
        """The atomic outputs [N, C] with the repulsion combined into the network's `network` [N, C]:
        network + v_zbl ("add", Sec. 3.4) or (1 - w) network + w v_zbl ("interpolate",
        `zbl_interpolation_weights`). With network = 0 it is the ZBL part of the model's energy."""
        repulsion = self(z, edge_index, dist, pos_first_order).unsqueeze(-1)  # [N, 1]
        if self.combine_mode == "add":
            return network + repulsion
        w = zbl_interpolation_weights(
            dist, edge_index[1], z.numel(), self.switch_inner_a, self.switch_outer_a
        ).unsqueeze(-1)
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
        (found for found in map(shutil.which, ("cc", "gcc", "clang")) if found), None
    )
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
    for name in (
        "dimezbl_sbf_messages_backward_ps",
        "dimezbl_sbf_messages_backward_pd",
        "dimezbl_sbf_messages_backward_ps8",
    ):
        getattr(lib, name).argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 4 + [ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.openmp = bool(openmp)
    return lib


class CompiledKernels:
    """Optional fused elementwise kernels: C (AVX2/FMA, OpenMP), compiled by the system's
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
    one more [E, 128] tensor per activation until the backward. (torch.compile of the same formulas
    was measured slower: its dynamo/Inductor wrapper costs ~0.2 ms a call, and its exp takes 2.0 vs
    1.3 ms for silu(x) and silu'(x) on the QM9 batch's [E, 128].)
    """

    enabled = os.environ.get("DIMEZBL_COMPILED_KERNELS", "0").strip().lower() in ("1", "true", "yes", "on")
    failure: Optional[str] = None
    _library: Optional[ctypes.CDLL] = None

    @classmethod
    def active_for(cls, x: Tensor) -> bool:
        """Whether `swish` takes the fused path for x: enabled, not failed, a CPU float tensor, and
        no Python dispatch mode (an op timer, FakeTensor tracing) active, under which the kernels'
        raw memory access would bypass it."""
        return (
            cls.enabled
            and cls.failure is None
            and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64)
            and not torch.jit.is_scripting()
            and _get_current_dispatch_mode() is None
        )

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
                    RuntimeWarning,
                    stacklevel=4,
                )
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
    def _run(
        cls, kernel: str, fallback, tensors: Tuple[Tensor, ...], optional: Optional[Tensor] = None, outputs: int = 1
    ):
        """kernel(tensors..., optional or NULL, outputs...) on contiguous copies of same-shaped CPU
        tensors of one float dtype; `fallback(*tensors[, optional])` where the kernels are off or failed."""
        args = tensors if optional is None else tensors + (optional,)
        x = tensors[0]
        function = cls._kernel(kernel, x.dtype)
        if function is None:
            return fallback(*args)
        for t in args:
            if t.shape != x.shape or t.dtype != x.dtype or t.device.type != "cpu":
                raise ValueError(
                    f"fused swish kernel {kernel}: tensors of shape {tuple(x.shape)}, {x.dtype} on the "
                    f"CPU expected, got {tuple(t.shape)}, {t.dtype} on {t.device}"
                )
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
        threads = (
            "built at the first call"
            if cls._library is None
            else "OpenMP"
            if cls._library.openmp
            else "one thread: built without OpenMP"
        )
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
        ok = (
            r.dim() == 3
            and weight.dim() == 2
            and r.size(2) == weight.size(1) <= 16
            and weight.size(0) <= 512
            and x.shape == (r.size(0), weight.size(0))
            and r.dtype == weight.dtype == x.dtype
            and (grad is None or (grad.shape == (r.size(0), r.size(1), weight.size(0)) and grad.dtype == r.dtype))
        )
        if not ok:
            raise ValueError(
                f"sbf_messages: r [E, L, B], weight [C, B] (B <= 16, C <= 512), x [E, C] (and grad "
                f"[E, L, C]) of one dtype expected, got {tuple(r.shape)}, {tuple(weight.shape)}, "
                f"{tuple(x.shape)}{'' if grad is None else ', ' + str(tuple(grad.shape))}"
            )

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
            r.data_ptr(),
            wt.data_ptr(),
            x.data_ptr(),
            g.data_ptr(),
            edges,
            width,
            basis,
            wt.shape[1],
            torch.get_num_threads(),
        )
        return g

    @classmethod
    def sbf_messages_backward(cls, grad: Tensor, r: Tensor, weight: Tensor, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
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
            grad.data_ptr(),
            r.data_ptr(),
            wt.data_ptr(),
            x.data_ptr(),
            grad_r.data_ptr(),
            grad_x.data_ptr(),
            grad_wt.data_ptr(),
            edges,
            width,
            basis,
            wt.shape[1],
            torch.get_num_threads(),
        )
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
            raise ValueError(
                f"message_backward: grad and q [E, L, C] and x [E, C] of one dtype expected, got "
                f"{tuple(grad.shape)}, {tuple(q.shape)}, {tuple(x.shape)}"
            )
        grad, q, x = grad.detach().contiguous(), q.detach().contiguous(), x.detach().contiguous()
        grad_q, grad_x = torch.empty_like(q), torch.empty_like(x)
        function(
            grad.data_ptr(),
            q.data_ptr(),
            x.data_ptr(),
            grad_q.data_ptr(),
            grad_x.data_ptr(),
            q.shape[0],
            q.shape[1],
            q.shape[2],
            torch.get_num_threads(),
        )
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
        self.layers_before_skip = nn.ModuleList([ResidualLayer(hidden_channels, act) for _ in range(num_before_skip)])
        self.lin = _dense(hidden_channels, hidden_channels)
        self.layers_after_skip = nn.ModuleList([ResidualLayer(hidden_channels, act) for _ in range(num_after_skip)])

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
        self.layers_before_skip = nn.ModuleList([ResidualLayer(hidden_channels, act) for _ in range(num_before_skip)])
        self.lin = _dense(hidden_channels, hidden_channels)
        self.layers_after_skip = nn.ModuleList([ResidualLayer(hidden_channels, act) for _ in range(num_after_skip)])

    def edge_features(self, x: Tensor, rbf: Tensor) -> Tuple[Tensor, Tensor]:
        """x_ji = act(h W_ji) [E, H], x_kj = act((e_RBF W_rbf1 W_rbf2 (.) act(h W_kj)) W_down)
        [E, int_emb]."""
        hidden = self.lin_ji.out_features
        if torch.jit.is_scripting():
            x_ji, x_kj = self.act(self.lin_ji(x)), self.act(self.lin_kj(x))
        else:  # both layers as one [E, H] x [H, 2H] product and one activation (fewer, larger passes)
            x_ji, x_kj = self.act(
                torch.addmm(
                    torch.cat([self.lin_ji.bias, self.lin_kj.bias]),
                    x,
                    torch.cat([self.lin_ji.weight, self.lin_kj.weight]).t(),
                )
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
        if (
            CompiledKernels.active_for(x_kj)
            and not radial.requires_grad
            and weight.size(0) <= 512
            and weight.size(1) <= 16
            and radial.dtype == x_kj.dtype == weight.dtype
        ):
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
            raise ValueError(f"unknown output_initializer {output_initializer!r}: use 'zeros' or 'glorot_orthogonal'")

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
                    num_radial,
                    hidden_channels,
                    out_channels,
                    num_output_layers,
                    act,
                    output_initializer,
                    out_emb_channels if plus else None,
                )  # fmt: skip
                for _ in range(num_blocks + 1)
            ]
        )
        if plus:
            blocks = [
                InteractionPPBlock(
                    hidden_channels,
                    int_emb_size,
                    basis_emb_size,
                    num_spherical,
                    num_radial,
                    num_before_skip,
                    num_after_skip,
                    act,
                )  # fmt: skip
                for _ in range(num_blocks)
            ]
        else:
            blocks = [
                InteractionBlock(
                    hidden_channels,
                    num_bilinear,
                    num_spherical,
                    num_radial,
                    num_before_skip,
                    num_after_skip,
                    act,
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
                f"pos must have shape [num_atoms, 3] = [{z.numel()}, 3] to match z, got shape {tuple(pos.shape)}"
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
            raise ValueError(f"pos of atom {int(bad[0])} is not finite (NaN or inf): {pos[bad[0]].tolist()}")
        if batch is None:
            return z.long(), torch.zeros_like(z, dtype=torch.long), 1
        if not torch.is_tensor(batch) or batch.dtype.is_floating_point:
            raise TypeError("batch must be an integer tensor (molecule index of each atom)")
        if batch.shape != z.shape:
            raise ValueError(f"batch must have shape [num_atoms] = [{z.numel()}], got {tuple(batch.shape)}")
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
            dist0, cos0, vec, a, b, norm_a, norm_b = self._geometry_parts(
                pos.detach(), i, j, idx_i, idx_k, idx_kj, idx_ji
            )
            # d cos(a, b) / da = b / (|a| |b|) - cos a / |a|^2, and the same with a and b swapped
            grad_a = b / (norm_a * norm_b)[:, None] - (cos0 / norm_a**2)[:, None] * a
            grad_b = a / (norm_a * norm_b)[:, None] - (cos0 / norm_b**2)[:, None] * b
            unit = vec / dist0[:, None]
        delta = pos - pos.detach()  # zero, with pos's graph
        delta_vec = delta.index_select(0, i) - delta.index_select(0, j)
        delta_b = (
            delta.index_select(0, idx_i) - delta.index_select(0, idx_k)
            if self.variant == "dimenet"
            else delta_vec.index_select(0, idx_kj)
        )
        dist = dist0 + (unit * delta_vec).sum(-1)
        cos_angle = cos0 + (grad_a * delta_vec.index_select(0, idx_ji)).sum(-1) + (grad_b * delta_b).sum(-1)
        return dist, cos_angle

    def atomic_outputs(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None, pos_first_order: bool = False):
        """Per-atom outputs sum_l v_i^(l) + v_zbl,i [N, out_channels] and the checked batch.

        pos_first_order: the bases and ZBL are linearised in the distances and angles
        (`first_order`): values and first derivatives in pos exact, second and higher derivatives
        in pos dropped, derivatives in the weights exact. Only for force training with a pos
        leaf nobody differentiates twice (`energy_and_forces` decides); never for Hessians."""
        z, pos, batch = _as_input_tensors(self, z, pos, batch)
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
            plan = (TripletPlan.transposed if plus else TripletPlan)(idx_kj, idx_ji, dist.numel(), self.triplet_weights)
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

    def forward(self, z: Tensor, pos: Tensor, batch: Optional[Tensor] = None, pos_first_order: bool = False) -> Tensor:
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
    z, pos, batch = _as_input_tensors(module, z, pos, batch)
    dtype = next(module.parameters()).dtype
    own_leaf = not pos.requires_grad
    if own_leaf:  # the forces come out in the model's precision, as the energies do
        pos = pos.detach().to(dtype).requires_grad_(True)
    elif pos.dtype != dtype:
        raise TypeError(
            f"pos is {pos.dtype} and requires grad, but the model computes in {dtype}: the energies would be "
            f"{dtype} and their gradient {pos.dtype}; call model.to({pos.dtype}) or pass pos.to({dtype})"
        )
    grad_enabled = torch.is_grad_enabled()
    with torch.enable_grad():  # forces are -dE/dpos, also when called under torch.no_grad()
        energy = module(z, pos, batch, pos_first_order=own_leaf and create_graph)
        (grad,) = torch.autograd.grad(energy.sum(), pos, create_graph=create_graph)
    if not grad_enabled:  # no graph leaves a no_grad block
        return energy.detach(), -grad.detach()
    return energy, -grad


def _as_input_tensors(module, z, pos, batch):
    """numpy arrays (or lists) of z, pos, batch as tensors on the model's device; tensors unchanged."""
    parameter = next(module.parameters())

    def tensor(value, dtype):
        if value is None or torch.is_tensor(value):
            return value
        array = np.asarray(value)
        if dtype is None and array.dtype.kind != "f":
            raise TypeError(f"pos must hold floating point positions in Angstrom, got a {array.dtype} array")
        if dtype is not None and array.dtype.kind not in "iu":
            raise TypeError(f"z and batch must hold integers, got a {array.dtype} array")
        return torch.as_tensor(array, dtype=dtype or parameter.dtype, device=parameter.device)

    return tensor(z, torch.long), tensor(pos, None), tensor(batch, torch.long)


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
            f"PyG state dict does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; {hint}"
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
