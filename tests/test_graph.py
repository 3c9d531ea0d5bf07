"""Graph construction (DESIGN.md section 2: all pairs within the cutoff, no self loops, per molecule; triplets
k -> j -> i with k != i, PyG's semantics), against the naive references of bench/_pyg_standins.py and brute force."""

import itertools

import numpy as np
import torch
from ase.build import molecule

import dimezbl_core as dc
from bench._pyg_standins import radius_graph_reference, triplets_reference


def batch_of(names, spread=0.0):
    zs, ps, bs = [], [], []
    for b, name in enumerate(names):
        atoms = molecule(name)
        zs.append(torch.as_tensor(atoms.numbers, dtype=torch.long))
        ps.append(torch.as_tensor(atoms.positions + spread * b, dtype=torch.float64))
        bs.append(torch.full((len(atoms),), b, dtype=torch.long))
    return torch.cat(zs), torch.cat(ps), torch.cat(bs)


def edge_set(ei):
    return sorted(map(tuple, ei.t().tolist()))


def test_radius_graph_all_pairs_within_cutoff_per_molecule():
    z, pos, batch = batch_of(["CH3CH2OH", "C6H6", "H2O", "CH4"])  # overlapping in space
    for cutoff in (1.2, 2.5, 5.0):
        ei = dc.radius_graph(pos, batch, cutoff)
        assert ei.dtype == torch.long and ei.shape[0] == 2
        # brute force: (j, i) for i != j in the same molecule with |x_i - x_j| <= cutoff
        p = pos.numpy()
        expected = [
            (j, i)
            for j, i in itertools.permutations(range(len(z)), 2)
            if batch[i] == batch[j] and np.linalg.norm(p[i] - p[j]) <= cutoff
        ]
        assert edge_set(ei) == sorted(expected), cutoff
        assert edge_set(ei) == edge_set(radius_graph_reference(pos, cutoff, batch, max_num_neighbors=10**6))


def test_radius_graph_no_neighbour_cap():
    # a dense 4x4x4 cube of 64 atoms 0.5 A apart: many atoms have > 32 neighbours within 5 A
    g = torch.arange(4, dtype=torch.float64) * 0.5
    pos = torch.cartesian_prod(g, g, g)
    batch = torch.zeros(64, dtype=torch.long)
    ei = dc.radius_graph(pos, batch, 5.0)
    assert ei.shape[1] == 64 * 63


def test_radius_graph_boundary_is_inclusive():
    pos = torch.tensor([[0.0, 0, 0], [5.0, 0, 0], [0.0, 5.0 + 1e-9, 0]], dtype=torch.float64)
    ei = dc.radius_graph(pos, torch.zeros(3, dtype=torch.long), 5.0)
    assert edge_set(ei) == [(0, 1), (1, 0)]


def test_triplets_match_pyg_semantics():
    z, pos, batch = batch_of(["CH3CH2OH", "H2O", "C6H6"])
    ei = radius_graph_reference(pos, 3.0, batch, max_num_neighbors=10**6)
    ours = dc.triplets(ei, num_nodes=len(z))
    ref = triplets_reference(ei, len(z))
    assert len(ours) == 7
    i, j = ours[0], ours[1]
    assert torch.equal(i, ei[1]) and torch.equal(j, ei[0]), "i = col (target), j = row (source)"
    # as a set of (idx_i, idx_j, idx_k, idx_kj, idx_ji) rows (the order within is free)
    rows_ours = sorted(zip(*[t.tolist() for t in ours[2:]]))
    rows_ref = sorted(zip(*[t.tolist() for t in ref[2:]]))
    assert rows_ours == rows_ref
    # consistency: edge kj is k -> j and edge ji is j -> i, k != i
    idx_i, idx_j, idx_k, idx_kj, idx_ji = ours[2:]
    assert torch.equal(ei[0, idx_kj], idx_k) and torch.equal(ei[1, idx_kj], idx_j)
    assert torch.equal(ei[0, idx_ji], idx_j) and torch.equal(ei[1, idx_ji], idx_i)
    assert bool((idx_i != idx_k).all())
    assert all(t.dtype == torch.long for t in ours)


def test_triplets_count_fully_connected():
    # n atoms all within the cutoff: n(n-1) edges, each with n-2 triplets
    n = 6
    pos = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ei = dc.radius_graph(pos, torch.zeros(n, dtype=torch.long), 100.0)
    out = dc.triplets(ei, num_nodes=n)
    assert out[5].numel() == n * (n - 1) * (n - 2)
