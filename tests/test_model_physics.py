"""Physical consistency of DimezblNet in float64 (paper Eq. 11; DESIGN.md sections 2-3).

Invariance of the energy under rotations, reflections, translations and permutations of atoms; equivariance of
the forces; forces = -dE/dR checked against central finite differences; batched == one-at-a-time; force training
(create_graph=True) gives parameter gradients. Small models (hidden 16, 2 blocks) with a non-zero output layer
(output_initializer="glorot_orthogonal") so that the DimeNet part contributes, both variants, ZBL on and off.
"""

import numpy as np
import pytest
import torch
from ase.build import molecule

import dimezbl_core as dc

MOLECULES = ["H2O", "CH4", "CH3CH2OH", "C6H6"]
CONFIGS = [
    ("dimenet", False),
    ("dimenet", True),
    ("dimenet++", False),
    ("dimenet++", True),
]
RTOL = 1e-10


def get_molecule(name):
    atoms = molecule(name)
    return (torch.as_tensor(atoms.numbers, dtype=torch.long), torch.as_tensor(atoms.positions, dtype=torch.float64))


def make_model(variant, zbl, seed=0, **extra):
    torch.manual_seed(seed)
    kw = dict(
        hidden_channels=16,
        out_channels=1,
        num_blocks=2,
        num_bilinear=4,
        num_spherical=7,
        num_radial=6,
        cutoff=5.0,
        envelope_exponent=5,
        zbl=zbl,
        zbl_unit="eV",
        zbl_reach="cutoff",
        variant=variant,
        int_emb_size=8,
        basis_emb_size=4,
        out_emb_channels=16,
        output_initializer="glorot_orthogonal",
    )
    kw.update(extra)
    model = dc.DimezblNet(**kw).double()
    model.eval()
    return model


_MODELS = {}


def cached_model(variant, zbl):
    if (variant, zbl) not in _MODELS:
        _MODELS[(variant, zbl)] = make_model(variant, zbl)
    return _MODELS[(variant, zbl)]


def random_orthogonal(seed, proper=True):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) > 0) != proper:
        q[:, 0] = -q[:, 0]
    return torch.as_tensor(q, dtype=torch.float64)


def energy(model, z, pos, batch=None):
    out = model(z, pos, batch)
    return out


def assert_close(a, b, rtol=RTOL, atol=1e-12, msg=""):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{msg}\n{m}")


# ----------------------------------------------------------------------------------------------------------------
def test_output_shapes_and_dtype():
    model = cached_model("dimenet", True)
    z, pos = get_molecule("CH3CH2OH")
    e = model(z, pos)
    assert tuple(e.shape) == (1,) and e.dtype == torch.float64
    e2, f = model.energy_and_forces(z, pos)
    assert tuple(e2.shape) == (1,) and tuple(f.shape) == (len(z), 3) and f.dtype == torch.float64
    assert_close(e2.detach(), e.detach(), rtol=1e-13, atol=0)
    assert torch.isfinite(e).all() and torch.isfinite(f).all()


def test_untrained_default_output_layer_is_zero():
    """DimeNet's final output Dense is zero-initialised: without ZBL an untrained model predicts exactly 0."""
    torch.manual_seed(0)
    model = dc.DimezblNet(hidden_channels=16, num_blocks=2, num_bilinear=4, zbl=False).double()
    z, pos = get_molecule("CH4")
    assert float(model(z, pos).detach()[0]) == 0.0


@pytest.mark.parametrize("variant,zbl", CONFIGS)
def test_models_are_non_trivial(variant, zbl):
    model = cached_model(variant, zbl)
    z, pos = get_molecule("CH3CH2OH")
    e, f = model.energy_and_forces(z, pos)
    assert abs(float(e[0])) > 1e-3 and float(f.abs().max()) > 1e-3


@pytest.mark.parametrize("variant,zbl", CONFIGS)
@pytest.mark.parametrize("name", MOLECULES)
def test_energy_invariant_forces_equivariant_under_rotation_and_reflection(variant, zbl, name):
    model = cached_model(variant, zbl)
    z, pos = get_molecule(name)
    e0, f0 = model.energy_and_forces(z, pos)
    for seed, proper in [(1, True), (2, True), (3, False), (4, False)]:
        rot = random_orthogonal(seed, proper)
        e1, f1 = model.energy_and_forces(z, pos @ rot.T)
        assert_close(e1, e0, msg=f"energy, det={'+1' if proper else '-1'}")
        assert_close(f1, f0 @ rot.T, rtol=1e-9, atol=1e-10 * (1 + float(f0.abs().max())), msg="forces")
    # pure inversion
    e2, f2 = model.energy_and_forces(z, -pos)
    assert_close(e2, e0, msg="inversion")
    assert_close(f2, -f0, rtol=1e-9, atol=1e-10 * (1 + float(f0.abs().max())))


@pytest.mark.parametrize("variant,zbl", CONFIGS)
@pytest.mark.parametrize("name", MOLECULES)
def test_energy_invariant_under_translation(variant, zbl, name):
    model = cached_model(variant, zbl)
    z, pos = get_molecule(name)
    e0, f0 = model.energy_and_forces(z, pos)
    for shift in ([3.0, -7.5, 12.25], [0.1, 0.2, -0.3]):
        e1, f1 = model.energy_and_forces(z, pos + torch.tensor(shift, dtype=torch.float64))
        assert_close(e1, e0, msg=f"translation {shift}")
        assert_close(f1, f0, rtol=1e-8, atol=1e-9 * (1 + float(f0.abs().max())))
    # forces of a translation-invariant energy sum to zero
    assert float(f0.sum(0).abs().max()) < 1e-9 * (1 + float(f0.abs().max()))


@pytest.mark.parametrize("variant,zbl", CONFIGS)
@pytest.mark.parametrize("name", MOLECULES)
def test_energy_invariant_under_permutation(variant, zbl, name):
    model = cached_model(variant, zbl)
    z, pos = get_molecule(name)
    e0, f0 = model.energy_and_forces(z, pos)
    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        perm = torch.randperm(len(z), generator=g)
        e1, f1 = model.energy_and_forces(z[perm], pos[perm])
        assert_close(e1, e0, msg="permutation")
        assert_close(f1, f0[perm], rtol=1e-9, atol=1e-10 * (1 + float(f0.abs().max())))


def central_difference(model, z, pos, direction, h):
    """-(E(pos + h v) - E(pos - h v)) / 2h, Richardson-extrapolated from steps h and h/2 (error O(h^4)): the
    randomly initialised DimeNet is stiff (forces ~1e4 on water), so the plain O(h^2) error at h = 1e-5 would
    reach ~1e-6 relative and blur the comparison."""
    with torch.no_grad():

        def d(step):
            return -(model(z, pos + step * direction)[0] - model(z, pos - step * direction)[0]) / (2 * step)

        return (4 * d(h / 2) - d(h)) / 3


def distorted(name, seed=5):
    z, pos = get_molecule(name)
    # a slightly distorted geometry, away from any symmetric point
    return z, pos + 0.05 * torch.as_tensor(np.random.default_rng(seed).normal(size=pos.shape), dtype=torch.float64)


@pytest.mark.parametrize("variant,zbl", CONFIGS)
def test_forces_equal_central_finite_differences_every_coordinate(variant, zbl):
    model = cached_model(variant, zbl)
    z, pos = distorted("H2O")
    _, forces = model.energy_and_forces(z, pos)
    fd = torch.zeros_like(pos)
    for a in range(pos.size(0)):
        for c in range(3):
            v = torch.zeros_like(pos)
            v[a, c] = 1.0
            fd[a, c] = central_difference(model, z, pos, v, h=2e-5)
    scale = float(forces.abs().max())
    assert scale > 1e-3
    assert_close(forces, fd, rtol=1e-6, atol=1e-7 * (1 + scale), msg="autograd forces vs finite differences")


@pytest.mark.parametrize("variant,zbl", CONFIGS)
@pytest.mark.parametrize("name", ["CH3CH2OH", "C6H6"])
def test_forces_equal_central_finite_differences_random_directions(variant, zbl, name):
    model = cached_model(variant, zbl)
    z, pos = distorted(name)
    _, forces = model.energy_and_forces(z, pos)
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        v = torch.randn(pos.shape, generator=g, dtype=torch.float64)
        v = v / v.norm()
        fd = central_difference(model, z, pos, v, h=2e-5)
        projected = (forces * v).sum()
        scale = float(forces.norm())
        assert_close(projected, fd, rtol=1e-6, atol=1e-7 * (1 + scale), msg="directional derivative")


@pytest.mark.parametrize("variant,zbl", CONFIGS)
def test_batched_equals_one_at_a_time(variant, zbl):
    model = cached_model(variant, zbl)
    mols = [get_molecule(n) for n in MOLECULES + ["H2O"]]
    # all molecules are centred near the origin and overlap in space: only the batch vector separates them
    z = torch.cat([m[0] for m in mols])
    pos = torch.cat([m[1] for m in mols])
    batch = torch.cat([torch.full((len(m[0]),), b, dtype=torch.long) for b, m in enumerate(mols)])
    e_b, f_b = model.energy_and_forces(z, pos, batch)
    assert tuple(e_b.shape) == (len(mols),)
    e_single, f_single = zip(*[model.energy_and_forces(zm, pm) for zm, pm in mols])
    assert_close(e_b, torch.cat(e_single), msg="batched energies")
    assert_close(f_b, torch.cat(f_single), rtol=1e-9, atol=1e-10 * (1 + float(f_b.abs().max())), msg="batched forces")
    # forward() agrees, and batch=None means one molecule
    assert_close(model(z, pos, batch).detach(), e_b.detach(), rtol=1e-13, atol=0)
    z1, p1 = mols[2]
    assert_close(model(z1, p1, torch.zeros(len(z1), dtype=torch.long)), model(z1, p1), rtol=1e-13, atol=0)


@pytest.mark.parametrize("variant,zbl", CONFIGS)
def test_create_graph_allows_force_training(variant, zbl):
    model = make_model(variant, zbl, seed=3)
    model.train()
    z, pos = get_molecule("CH3CH2OH")
    energies, forces = model.energy_and_forces(z, pos, create_graph=True)
    assert forces.requires_grad
    loss = (forces**2).sum() + energies.sum() ** 2
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is None or torch.isfinite(g).all() for g in grads.values())
    nonzero = [n for n, g in grads.items() if g is not None and float(g.abs().max()) > 0]
    assert len(nonzero) >= len(grads) // 2, f"only {len(nonzero)} of {len(grads)} parameters got a gradient"
    # the force part alone must reach the weights too (second-order path)
    model.zero_grad()
    energies, forces = model.energy_and_forces(z, pos, create_graph=True)
    (forces**2).sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


def test_create_graph_false_by_default_forces_detached_from_graph():
    model = cached_model("dimenet", True)
    z, pos = get_molecule("H2O")
    _, forces = model.energy_and_forces(z, pos)
    assert not forces.requires_grad
