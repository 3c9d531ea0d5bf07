"""Equivalence with the reference implementation, PyG 2.8.1's ``DimeNet`` and ``DimeNetPlusPlus``.

HOW PyG's MODEL IS RUN HERE. PyG's ``DimeNet.forward`` calls two module-level functions of
``torch_geometric.nn.models.dimenet`` that need compiled extensions which cannot be installed from the registries
here: ``radius_graph`` (pyg-lib or torch-cluster) and ``triplets`` (torch-sparse's ``SparseTensor``). This test
monkeypatches exactly those two names with small pure-torch stand-ins (bench/_pyg_standins.py: a dense
same-molecule distance mask, and a dense edge-edge match with PyG's ordering), written independently of
dimezbl_core. Everything else in PyG's model (bases, embedding, interaction and output blocks) runs unchanged.

Protocol: float64; PyG models with output_initializer="glorot_orthogonal" and then every parameter randomised
(seeded), so that no output is trivially zero and every parameter (biases, Bessel frequencies) matters; their state
dict is loaded into ``DimezblNet(zbl=False)`` with ``dimezbl_core.load_pyg_dimenet_state_dict``; energies must agree
to rtol 1e-6 on 21 real QM9 molecules of 21 distinct sizes (3 to 26 atoms), batched and one at a time. The ZBL
term is then checked to add exactly the independently computed sum over unordered pairs.
"""

import itertools

import numpy as np
import pytest
import torch

import dimezbl_core as dc
from bench._pyg_standins import memoize_pyg_basis_forms, radius_graph_reference, triplets_reference

pyg_dimenet = pytest.importorskip("torch_geometric.nn.models.dimenet")
memoize_pyg_basis_forms()

from bench._pyg_standins import DIMENET_KW, DIMENETPP_KW  # noqa: E402 (after the PyG import check above)


@pytest.fixture(autouse=True)
def _pyg_without_extensions(monkeypatch):
    monkeypatch.setattr(pyg_dimenet, "radius_graph", radius_graph_reference)
    monkeypatch.setattr(pyg_dimenet, "triplets", triplets_reference)


def randomise_(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            # noise relative to each tensor's spread, so that six blocks do not blow the energies up
            # to ~1e15 (where perturbing one output block would fall below double precision)
            spread = float(p.std()) if p.numel() > 1 and float(p.std()) > 0 else 1.0
            p.add_(0.1 * spread * torch.randn(p.shape, generator=g, dtype=p.dtype))


def build_pair(variant, zbl=False, seed=0, **zbl_kw):
    torch.manual_seed(seed)
    if variant == "dimenet":
        ref = pyg_dimenet.DimeNet(output_initializer="glorot_orthogonal", **DIMENET_KW)
        kw = dict(DIMENET_KW)
    else:
        ref = pyg_dimenet.DimeNetPlusPlus(output_initializer="glorot_orthogonal", **DIMENETPP_KW)
        kw = dict(DIMENETPP_KW)
    ref = ref.double().eval()
    randomise_(ref, seed + 100)
    ours = dc.DimezblNet(zbl=zbl, variant=variant, **kw, **zbl_kw).double().eval()
    dc.load_pyg_dimenet_state_dict(ours, ref.state_dict())
    return ref, ours


def concat(molecules):
    z = torch.cat([m["z"] for m in molecules])
    pos = torch.cat([m["pos"] for m in molecules])
    batch = torch.cat([torch.full((len(m["z"]),), b, dtype=torch.long) for b, m in enumerate(molecules)])
    return z, pos, batch


_PAIRS = {}


def cached_pair(variant):
    if variant not in _PAIRS:
        _PAIRS[variant] = build_pair(variant)
    return _PAIRS[variant]


def equivalence_set(molecules):
    """21 molecules of 21 distinct sizes: every size from 3 to 22 atoms, and the largest sample (26 atoms). (PyG's
    bilinear einsum costs ~10-15 s per float64 pass over all 23 sample molecules on 2 cores, dominated by the
    largest; dimezbl_core is ~10x faster.)"""
    largest = max(len(m["z"]) for m in molecules)
    return [m for m in molecules if len(m["z"]) <= 22 or len(m["z"]) == largest]


def test_standins_reproduce_pyg_semantics_on_a_tiny_graph():
    """Sanity check of the stand-ins themselves (hand-enumerated triplets of a 3-atom chain 0-1-2)."""
    pos = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [2.0, 0, 0]], dtype=torch.float64)
    ei = radius_graph_reference(pos, r=1.5)
    assert ei.tolist() == [[1, 0, 2, 1], [0, 1, 1, 2]]  # edges (j -> i): 1->0, 0->1, 2->1, 1->2
    i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji = triplets_reference(ei, 3)
    # ji = 1->0 (edge 0): kj with target 1 and k != 0: 2->1 (edge 2); ji = 1->2 (edge 3): kj = 0->1 (edge 1)
    assert idx_ji.tolist() == [0, 3] and idx_kj.tolist() == [2, 1]
    assert idx_k.tolist() == [2, 0] and idx_j.tolist() == [1, 1] and idx_i.tolist() == [0, 2]


@pytest.mark.parametrize("variant", ["dimenet", "dimenet++"])
def test_same_energies_as_pyg_batched_and_one_at_a_time(variant, qm9_sample_molecules):
    mols = equivalence_set(qm9_sample_molecules)
    assert len(mols) >= 20 and len({len(m["z"]) for m in mols}) >= 20
    ref, ours = cached_pair(variant)
    z, pos, batch = concat(mols)
    with torch.no_grad():
        e_ref = ref(z, pos, batch).reshape(-1)
        e_ours = ours(z, pos, batch).reshape(-1)
    assert e_ref.shape == (len(mols),)
    assert float(e_ref.abs().min()) > 1e-3, "reference energies must be non-trivial"
    torch.testing.assert_close(e_ours, e_ref, rtol=1e-6, atol=0)
    # one molecule at a time (batch=None) against the same reference energies (PyG's batched energies are per
    # molecule of disconnected graphs; running PyG again per molecule would double the cost of this file)
    with torch.no_grad():
        e_ours_single = torch.cat([ours(m["z"], m["pos"]).reshape(-1) for m in mols])
    torch.testing.assert_close(e_ours_single, e_ref, rtol=1e-6, atol=0)
    # and PyG itself one molecule at a time on two of them (consistency of the stand-ins with batching)
    with torch.no_grad():
        for b in (0, len(mols) // 2):
            e1 = ref(mols[b]["z"], mols[b]["pos"]).reshape(-1)
            torch.testing.assert_close(e1, e_ref[b : b + 1], rtol=1e-10, atol=0)


@pytest.mark.parametrize("variant", ["dimenet", "dimenet++"])
def test_pyg_state_dict_keys_all_used(variant):
    """Loading must not silently ignore parameters: perturbing any loaded tensor changes our output."""
    ref, ours = cached_pair(variant)
    sd = ref.state_dict()
    z = torch.tensor([6, 8, 1, 1, 1, 1], dtype=torch.long)
    pos = torch.tensor(
        [[0.0, 0, 0], [1.43, 0, 0], [-0.36, 1.03, 0.0], [-0.36, -0.51, 0.89], [-0.36, -0.51, -0.89], [1.75, 0.9, 0.0]],
        dtype=torch.float64,
    )
    with torch.no_grad():
        base = ours(z, pos).clone()
        torch.testing.assert_close(base.reshape(-1), ref(z, pos).reshape(-1), rtol=1e-6, atol=0)
    # spot-check a few kinds of tensors: frequencies, embedding-block bias, last output layer, an interaction W
    keys = [
        k
        for k in sd
        if k.endswith("rbf.freq")
        or k.startswith("emb.lin.bias")
        or k.endswith("output_blocks.1.lin.weight")
        or k.endswith("interaction_blocks.0.lin_ji.bias")
    ]
    assert len(keys) >= 3, keys
    for k in keys:
        sd2 = {kk: v.clone() for kk, v in sd.items()}
        sd2[k] = sd2[k] + 0.05
        tmp = (
            dc.DimezblNet(zbl=False, variant=variant, **(DIMENET_KW if variant == "dimenet" else DIMENETPP_KW))
            .double()
            .eval()
        )
        dc.load_pyg_dimenet_state_dict(tmp, sd2)
        with torch.no_grad():
            assert not torch.allclose(tmp(z, pos), base, rtol=1e-9, atol=0), f"{k} has no effect after loading"


# ----------------------------------------------------------------------------------------------------------------
# the ZBL term adds exactly the sum over unordered pairs
# ----------------------------------------------------------------------------------------------------------------
C = np.array([0.18175, 0.50986, 0.28022, 0.02817])
D = np.array([3.19980, 0.94229, 0.40290, 0.20162])


def zbl_sum_reference(z, pos, reach, k, cutoff=5.0):
    from ase.data import covalent_radii

    z, pos = z.numpy(), pos.numpy()
    total = 0.0
    for i, j in itertools.combinations(range(len(z)), 2):
        r = float(np.linalg.norm(pos[i] - pos[j]))
        if r > cutoff:
            continue
        a = 0.46850 / (z[i] ** 0.23 + z[j] ** 0.23)
        e = k * z[i] * z[j] / r * float(C @ np.exp(-D * r / a))
        s = cutoff if reach == "cutoff" else covalent_radii[z[i]] + covalent_radii[z[j]]
        x = r / s
        u = 1 - 28 * x**6 + 48 * x**7 - 21 * x**8 if x < 1 else 0.0  # Eq. 6, p = 6
        total += e * u
    return total


@pytest.mark.parametrize(
    "variant,reach,unit,k",
    [
        ("dimenet", "cutoff", "eV", 14.399645),
        ("dimenet++", "cutoff", "kcal/mol", 332.06371),
        ("dimenet", "covalent", "eV", 14.399645),
    ],
)
def test_zbl_adds_exactly_the_pair_sum(variant, reach, unit, k, qm9_sample_molecules):
    mols = [m for m in qm9_sample_molecules if len(m["z"]) <= 14][::2]  # a spread of small sizes (cheap)
    ref, plain = cached_pair(variant)
    kw = DIMENET_KW if variant == "dimenet" else DIMENETPP_KW
    withzbl = dc.DimezblNet(zbl=True, zbl_unit=unit, zbl_reach=reach, variant=variant, **kw).double().eval()
    dc.load_pyg_dimenet_state_dict(withzbl, ref.state_dict())
    z, pos, batch = concat(mols)
    with torch.no_grad():
        diff = (withzbl(z, pos, batch) - plain(z, pos, batch)).reshape(-1)
    expected = torch.tensor([zbl_sum_reference(m["z"], m["pos"], reach, k) for m in mols], dtype=torch.float64)
    if reach == "cutoff":
        assert float(expected.min()) > 1.0
    # the DimeNet part is O(1..100) here, so compare with an absolute tolerance relative to its magnitude
    scale = float(plain(z, pos, batch).abs().max().detach()) + float(expected.abs().max())
    torch.testing.assert_close(diff, expected, rtol=1e-9, atol=1e-11 * scale)


@pytest.mark.parametrize("variant", ["dimenet", "dimenet++"])
def test_force_training_gradients_equal_pyg(variant, qm9_sample_molecules):
    """The force-training step (forces with create_graph, loss MAE(E) + 100 MAE(F), backward) gives PyG's
    parameter gradients: this exercises the second derivatives of our sparse triplet aggregation, which PyG
    computes with plain gather / einsum / scatter; also through `energy_and_forces` (geometry to first order)."""
    mols = [m for m in qm9_sample_molecules if 8 <= len(m["z"]) <= 12][:3]
    assert len(mols) == 3
    ref, ours = cached_pair(variant)
    z, pos, batch = concat(mols)
    g = torch.Generator().manual_seed(7)
    energy_target = torch.randn(len(mols), generator=g, dtype=torch.float64)
    force_target = torch.randn(pos.shape, generator=g, dtype=torch.float64)
    gradients = []
    # PyG's full graph, ours on the full graph, ours through energy_and_forces (geometry to first order)
    for model, own_path in ((ref, False), (ours, False), (ours, True)):
        model.zero_grad(set_to_none=True)
        if own_path:
            energy, forces = model.energy_and_forces(z, pos, batch, create_graph=True)
        else:
            p = pos.clone().requires_grad_(True)
            energy = model(z, p, batch).reshape(-1)
            (grad_pos,) = torch.autograd.grad(energy.sum(), p, create_graph=True)
            forces = -grad_pos
        loss = (energy - energy_target).abs().mean() + 100 * (forces - force_target).abs().mean()
        loss.backward()
        gradients.append({k: v.grad.clone() for k, v in model.named_parameters() if v.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() == gradients[2].keys() and len(gradients[0]) > 20
    nonzero = 0
    for key, expected in gradients[0].items():
        for ours_grad in (gradients[1][key], gradients[2][key]):
            torch.testing.assert_close(
                ours_grad,
                expected,
                rtol=1e-7,
                atol=1e-9 * float(expected.abs().max()),
                msg=lambda m, key=key: f"{key}: {m}",
            )
        nonzero += int(float(expected.abs().max()) > 0)
    assert nonzero > 20, "the gradients compared must be non-trivial"
    model_grad = gradients[1]
    w = "interaction_blocks.0.W" if variant == "dimenet" else "interaction_blocks.0.lin_sbf1.weight"
    assert float(model_grad[w].abs().max()) > 0  # the triplet path is part of the comparison
