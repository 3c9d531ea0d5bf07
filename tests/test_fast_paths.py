"""The reordered computations of dimezbl_core equal the straightforward formulas they replace."""
import torch

import dimezbl_core as dc


def _graph(num_atoms=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(num_atoms, 3, generator=g, dtype=torch.float64) * 4.0
    batch = torch.zeros(num_atoms, dtype=torch.long)
    edge_index = dc.radius_graph(pos, batch, 5.0)
    return pos, edge_index, dc.triplets(edge_index, num_atoms)


def test_interaction_block_equals_per_triplet_bilinear_einsum():
    torch.manual_seed(0)
    pos, edge_index, (i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji) = _graph()
    hidden, num_bilinear, num_spherical, num_radial = 16, 4, 3, 4
    block = dc.InteractionBlock(hidden, num_bilinear, num_spherical, num_radial, 1, 2).double()
    num_edges, num_triplets = edge_index.size(1), idx_kj.numel()
    assert num_triplets > num_edges  # a dense cluster: many triplets per edge
    x = torch.randn(num_edges, hidden, dtype=torch.float64)
    rbf = torch.randn(num_edges, num_radial, dtype=torch.float64)
    sbf = torch.randn(num_triplets, num_spherical * num_radial, dtype=torch.float64)
    out = block(x, rbf, sbf, idx_kj, idx_ji)

    # DimeNet's formula, one triplet at a time (PyG: einsum("wj,wl,ijl->wi", sbf, x_kj[idx_kj], W))
    x_ji = block.act(block.lin_ji(x))
    x_kj = block.act(block.lin_kj(x)) * block.lin_rbf(rbf)
    per_triplet = torch.einsum("wj,wl,ijl->wi", block.lin_sbf(sbf), x_kj[idx_kj], block.W)
    h = x_ji + torch.zeros_like(x).index_add_(0, idx_ji, per_triplet)
    for layer in block.layers_before_skip:
        h = layer(h)
    h = block.act(block.lin(h)) + x
    for layer in block.layers_after_skip:
        h = layer(h)
    torch.testing.assert_close(out, h, rtol=1e-12, atol=1e-12)


def test_embedding_block_equals_dense_layer_on_concatenation():
    torch.manual_seed(1)
    pos, edge_index, (i, j, *_rest) = _graph(seed=1)
    block = dc.EmbeddingBlock(num_radial=6, hidden_channels=8).double()
    z = torch.randint(1, 10, (pos.size(0),))
    rbf = torch.randn(edge_index.size(1), 6, dtype=torch.float64)
    atoms = block.emb(z)
    reference = block.act(block.lin(torch.cat([atoms[i], atoms[j], block.act(block.lin_rbf(rbf))], dim=-1)))
    torch.testing.assert_close(block(z, rbf, i, j), reference, rtol=1e-12, atol=1e-12)


def test_triplets_pair_each_edge_with_the_edges_into_its_source():
    pos, edge_index, (i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji) = _graph(seed=2)
    source, target = edge_index
    assert torch.equal(target[idx_kj], source[idx_ji])  # k->j ends where j->i starts
    assert torch.equal(idx_i, target[idx_ji]) and torch.equal(idx_k, source[idx_kj])
    assert bool((idx_i != idx_k).all())
    in_degree = torch.bincount(target, minlength=pos.size(0))
    assert idx_kj.numel() == int((in_degree[source] - 1).sum())  # every k != i, once
