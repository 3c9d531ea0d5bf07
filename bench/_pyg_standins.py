"""Small pure-torch stand-ins for the two graph functions PyG's DimeNet calls, written for the tests only.

PyG 2.8.1's ``torch_geometric.nn.models.dimenet`` calls ``radius_graph`` (needs pyg-lib or torch-cluster) and
``triplets`` (needs torch-sparse's ``SparseTensor``); neither extension is installable here. These replacements are
deliberately naive (dense O(N^2) / O(E^2) matching, obviously correct) and independent of ``dimezbl_core``: they are
the reference against which ``dimezbl_core.radius_graph`` / ``dimezbl_core.triplets`` are tested, and they are
monkeypatched into PyG's module so that PyG's own ``DimeNet.forward`` runs unchanged otherwise.
"""

import torch


def radius_graph_reference(
    x, r, batch=None, loop=False, max_num_neighbors=32, flow="source_to_target", num_workers=1, batch_size=None
):
    """All ordered pairs (j -> i) of atoms of the same molecule with |x_i - x_j| <= r, without self loops.

    Returns edge_index [2, E] with row = source j, col = target i (PyG's ``flow="source_to_target"``), sorted by
    target then source. Refuses (rather than silently truncates) when an atom has more than ``max_num_neighbors``
    neighbours, since torch-cluster would then drop some and the comparison would be meaningless.
    """
    assert flow == "source_to_target"
    n = x.size(0)
    if batch is None:
        batch = torch.zeros(n, dtype=torch.long, device=x.device)
    dist = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1).sqrt()  # [N, N], explicit (not cdist's mm path)
    mask = (dist <= r) & (batch.unsqueeze(1) == batch.unsqueeze(0))
    if not loop:
        mask &= ~torch.eye(n, dtype=torch.bool, device=x.device)
    assert int(mask.sum(1).max()) <= max_num_neighbors if n else True, "stand-in would differ from torch-cluster"
    target, source = mask.nonzero(as_tuple=True)  # row-major: sorted by target, then source
    return torch.stack([source, target], dim=0)


def triplets_reference(edge_index, num_nodes):
    """PyG's ``triplets`` semantics with a dense edge-edge match instead of a SparseTensor.

    For each edge ji = (j -> i) (in edge order) every edge kj = (k -> j) with k != i, ordered by k ascending
    (the order PyG's CSR ``adj_t[row]`` produces). Returns (i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji) where
    i = col (target), j = row (source) of each edge.
    """
    row, col = edge_index  # j -> i
    # match[b, a]: edge a = (k -> j) ends at the source j of edge b = (j -> i), and k != i
    match = (col.unsqueeze(0) == row.unsqueeze(1)) & (row.unsqueeze(0) != col.unsqueeze(1))
    idx_ji, idx_kj = match.nonzero(as_tuple=True)  # sorted by ji, then by kj edge index
    # within one ji edge, order by k (PyG's CSR column order), ties impossible (no duplicate edges)
    key = idx_ji * max(int(num_nodes), 1) + row[idx_kj]
    order = torch.argsort(key, stable=True)
    idx_ji, idx_kj = idx_ji[order], idx_kj[order]
    idx_i = col[idx_ji]
    idx_j = row[idx_ji]
    idx_k = row[idx_kj]
    return col, row, idx_i, idx_j, idx_k, idx_kj, idx_ji


def memoize_pyg_basis_forms():
    """PyG's SphericalBasisLayer rebuilds its sympy closed forms (``bessel_basis``: ~12 s for 7 x 6) in every
    constructor. They are pure functions of (num_spherical, num_radial), so cache them once per process (the layer
    imports them from ``dimenet_utils`` at construction time, so patching the module attributes suffices)."""
    import functools

    from torch_geometric.nn.models import dimenet_utils

    for name in ("bessel_basis", "real_sph_harm"):
        fn = getattr(dimenet_utils, name)
        if not hasattr(fn, "cache_info"):
            setattr(dimenet_utils, name, functools.lru_cache(maxsize=None)(fn))


# DimeNet's and DimeNet++'s published hyperparameters (shared by the equivalence test and the benchmark).
DIMENET_KW = dict(
    hidden_channels=128,
    out_channels=1,
    num_blocks=6,
    num_bilinear=8,
    num_spherical=7,
    num_radial=6,
    cutoff=5.0,
    envelope_exponent=5,
    num_before_skip=1,
    num_after_skip=2,
    num_output_layers=3,
)
DIMENETPP_KW = dict(
    hidden_channels=128,
    out_channels=1,
    num_blocks=4,
    int_emb_size=64,
    basis_emb_size=8,
    out_emb_channels=256,
    num_spherical=7,
    num_radial=6,
    cutoff=5.0,
    envelope_exponent=5,
    num_before_skip=1,
    num_after_skip=2,
    num_output_layers=3,
)
