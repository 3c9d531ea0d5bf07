"""ZBL repulsion (paper Eq. 8-10; DESIGN.md section 3) against an independent float64 reference written here.

Reference: E = k Z_i Z_j / r * phi(r/a), a = 0.46850 A / (Z_i^0.23 + Z_j^0.23), with the constants of LAMMPS
pair_zbl_const.h; k = 14.399645 eV*A (LAMMPS metal units) or 332.06371 kcal/mol*A (LAMMPS real units).
Switches: the DimeNet polynomial envelope (p = 6) at the model cutoff or at the sum of ase's covalent radii, and
LAMMPS `pair_style zbl inner outer` (pair_zbl.cpp: set_coeff / compute), all re-derived here.
"""

import itertools

import numpy as np
import pytest
import torch
from ase.build import molecule
from ase.data import covalent_radii

import dimezbl as dz
import dimezbl_core as dc

K_EV = 14.399645
K_KCAL = 332.06371
A_SCREEN = 0.46850
C = np.array([0.18175, 0.50986, 0.28022, 0.02817])
D = np.array([3.19980, 0.94229, 0.40290, 0.20162])

PAIRS = [(1, 1), (6, 1), (6, 6), (7, 8), (8, 8), (9, 6), (7, 1), (16, 8)]
R_GRID = np.concatenate([np.geomspace(0.05, 3.0, 60), [0.74, 1.09, 1.54]])


# ----------------------------------------------------------------------------------------------------------------
# independent reference
# ----------------------------------------------------------------------------------------------------------------
def zbl_ref(zi, zj, r, k=K_EV):
    """Energy and its first and second r-derivatives of the un-switched ZBL pair potential."""
    zi, zj, r = (np.asarray(v, dtype=np.float64) for v in (zi, zj, r))
    a = A_SCREEN / (zi**0.23 + zj**0.23)
    x = r / a
    ex = np.exp(-np.multiply.outer(x, D))  # [..., 4]
    phi = ex @ C
    dphi = -(ex @ (C * D))
    d2phi = ex @ (C * D * D)
    pre = k * zi * zj
    e = pre * phi / r
    de = pre * (-phi / r**2 + dphi / (a * r))
    d2e = pre * (2 * phi / r**3 - 2 * dphi / (a * r**2) + d2phi / (a * a * r))
    return e, de, d2e


def env_ref(x, p=6):
    x = np.asarray(x, dtype=np.float64)
    a, b, c = -(p + 1) * (p + 2) / 2.0, p * (p + 2.0), -p * (p + 1) / 2.0
    u = 1 + a * x**p + b * x ** (p + 1) + c * x ** (p + 2)
    du = a * p * x ** (p - 1) + b * (p + 1) * x**p + c * (p + 2) * x ** (p + 1)
    inside = x < 1
    return np.where(inside, u, 0.0), np.where(inside, du, 0.0)


def switched_ref(zi, zj, r, reach, k=K_EV, cutoff=5.0, inner=None, outer=None):
    """Switched pair energy and its r-derivative."""
    e, de, _ = zbl_ref(zi, zj, r, k)
    r = np.asarray(r, dtype=np.float64)
    if reach in ("cutoff", "covalent"):
        s = cutoff if reach == "cutoff" else covalent_radii[zi] + covalent_radii[zj]
        u, du = env_ref(r / s)
        return e * u, de * u + e * du / s
    assert reach == "lammps"
    fc, fcp, fcpp = zbl_ref(zi, zj, outer, k)
    tc = outer - inner
    A = (-3 * fcp + tc * fcpp) / tc**2
    B = (2 * fcp - tc * fcpp) / tc**3
    Cc = -fc + tc / 2 * fcp - tc**2 / 12 * fcpp
    t = r - inner
    on = r > inner
    E = e + Cc + np.where(on, A / 3 * t**3 + B / 4 * t**4, 0.0)
    dE = de + np.where(on, A * t**2 + B * t**3, 0.0)
    inside = r < outer
    return np.where(inside, E, 0.0), np.where(inside, dE, 0.0)


def T(x, dtype=torch.float64):
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def Z(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def npy(t):
    return t.detach().cpu().numpy()


def energy_and_grad(fn, r_np):
    r = T(r_np).clone().requires_grad_(True)
    e = fn(r)
    (g,) = torch.autograd.grad(e.sum(), r)
    return npy(e), npy(g)


# ----------------------------------------------------------------------------------------------------------------
# constants
# ----------------------------------------------------------------------------------------------------------------
def test_constants():
    assert dc.COULOMB_CONSTANT_EV_A == pytest.approx(14.399645, rel=1e-12)
    assert dc.COULOMB_CONSTANT_KCAL_MOL_A == pytest.approx(332.06371, rel=1e-12)
    assert dc.ZBL_SCREENING_LENGTH_A == pytest.approx(0.46850, rel=1e-12)
    # physical cross-check of the eV constant: e^2 / (4 pi eps0) in eV*A from CODATA 2018
    e, eps0 = 1.602176634e-19, 8.8541878128e-12
    assert e / (4 * np.pi * eps0) * 1e10 == pytest.approx(dc.COULOMB_CONSTANT_EV_A, rel=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# un-switched pair energy
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zi,zj", PAIRS)
@pytest.mark.parametrize("unit,k", [("eV", K_EV), ("kcal/mol", K_KCAL)])
def test_zbl_pair_energy_matches_formula(zi, zj, unit, k):
    n = R_GRID.size
    e = npy(dc.zbl_pair_energy(Z([zi] * n), Z([zj] * n), T(R_GRID), unit=unit))
    np.testing.assert_allclose(e, zbl_ref(zi, zj, R_GRID, k)[0], rtol=1e-12, atol=0)
    # symmetric in i, j
    e_swapped = npy(dc.zbl_pair_energy(Z([zj] * n), Z([zi] * n), T(R_GRID), unit=unit))
    np.testing.assert_allclose(e_swapped, e, rtol=1e-14)


def test_zbl_default_unit_is_ev_and_units_are_related_by_coulomb_constants():
    zi, zj = Z([1, 6, 8, 9]), Z([1, 1, 7, 6])
    r = T([0.5, 1.09, 1.2, 1.35])
    e_default = dc.zbl_pair_energy(zi, zj, r)
    e_ev = dc.zbl_pair_energy(zi, zj, r, unit="eV")
    e_kcal = dc.zbl_pair_energy(zi, zj, r, unit="kcal/mol")
    np.testing.assert_allclose(npy(e_default), npy(e_ev), rtol=0, atol=0)
    np.testing.assert_allclose(npy(e_kcal) / npy(e_ev), np.full(4, K_KCAL / K_EV), rtol=1e-13)


def test_zbl_hand_computed_values():
    """Values computed independently with 30-digit arithmetic (mpmath) from the universal ZBL formula and the
    LAMMPS constants; C-H at 1.09 A is 'about 3 eV' (DESIGN.md section 3)."""
    cases = [  # (Z_i, Z_j, r [A], E [eV], E [kcal/mol])
        (1, 1, 0.74, 2.3227533975325428, 53.563967070004921),
        (1, 1, 1.0, 1.0255749886551132, 23.650321630569697),
        (6, 1, 1.09, 2.9649619053184789, 68.3736474259416),
        (6, 6, 1.54, 3.0246780449618752, 69.750734352519599),
        (8, 8, 1.21, 11.581122606787452, 267.06703802591747),
        (7, 8, 1.15, 12.809503100428861, 295.39416581345651),
        (6, 6, 0.1, 2808.2046064097176, 64758.738152468384),
    ]
    zi, zj, r, e_ev, e_kcal = (np.array(c) for c in zip(*cases))
    np.testing.assert_allclose(npy(dc.zbl_pair_energy(Z(zi), Z(zj), T(r), unit="eV")), e_ev, rtol=1e-12)
    np.testing.assert_allclose(npy(dc.zbl_pair_energy(Z(zi), Z(zj), T(r), unit="kcal/mol")), e_kcal, rtol=1e-12)
    # H-H at 1 A by hand: a = 0.4685/2 = 0.23425 A, x = 4.268943..., phi(x) = 0.0712221..., E = 14.399645 * phi
    assert 14.399645 * float(C @ np.exp(-D * (1.0 / 0.23425))) == pytest.approx(1.0255749886551132, rel=1e-12)


def test_zbl_screening_function_limits():
    """E r / (k Z_i Z_j) = phi(r/a): between 0 and 1, decreasing in r, and -> phi(0) = sum(c) = 1 (bare Coulomb
    repulsion) as r -> 0."""
    assert C.sum() == pytest.approx(1.0, abs=1e-12)
    r_np = np.geomspace(0.05, 3.0, 50)
    for zi, zj in PAIRS:
        e = npy(dc.zbl_pair_energy(Z([zi] * 50), Z([zj] * 50), T(r_np), unit="eV"))
        scaled = e * r_np / (K_EV * zi * zj)
        assert np.all((scaled > 0) & (scaled < 1)) and np.all(np.diff(scaled) < 0)
    e = float(dc.zbl_pair_energy(Z([1]), Z([1]), T([0.05]))[0])
    assert e * 0.05 / K_EV == pytest.approx(float(C @ np.exp(-D * 0.05 / 0.23425)), rel=1e-12)
    assert e * 0.05 / K_EV > 0.78


@pytest.mark.parametrize("zi,zj", PAIRS)
def test_zbl_force_is_minus_analytic_derivative(zi, zj):
    n = R_GRID.size
    e, g = energy_and_grad(lambda r: dc.zbl_pair_energy(Z([zi] * n), Z([zj] * n), r, unit="eV"), R_GRID)
    _, de, _ = zbl_ref(zi, zj, R_GRID)
    np.testing.assert_allclose(g, de, rtol=1e-11, atol=0)
    force = -g
    assert np.all(force > 0)  # purely repulsive


def test_zbl_pair_energy_broadcasts():
    zi = Z([[1], [6], [8]])  # [3, 1]
    zj = Z([[1, 6, 7, 9]])  # [1, 4]
    r = T(np.linspace(0.6, 2.0, 12).reshape(3, 4))
    e = dc.zbl_pair_energy(zi, zj, r)
    assert tuple(e.shape) == (3, 4)
    ref = zbl_ref(np.array([[1], [6], [8]]), np.array([[1, 6, 7, 9]]), npy(r))[0]
    np.testing.assert_allclose(npy(e), ref, rtol=1e-12)
    # a single element pair against many distances
    e2 = dc.zbl_pair_energy(Z([6]), Z([1]), T(R_GRID))
    assert tuple(e2.shape) == (R_GRID.size,)
    np.testing.assert_allclose(npy(e2), zbl_ref(6, 1, R_GRID)[0], rtol=1e-12)


def test_zbl_pair_energy_coincident_atoms_raise():
    with pytest.raises(ValueError, match=r"(?i)coincident"):
        dc.zbl_pair_energy(Z([1, 6]), Z([1, 6]), T([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"(?i)coincident"):
        dc.ZBL(unit="eV", reach="cutoff").pair_energy(Z([8]), Z([8]), T([0.0]))


# ----------------------------------------------------------------------------------------------------------------
# switched variants
# ----------------------------------------------------------------------------------------------------------------
LAMMPS_INNER, LAMMPS_OUTER = 0.8, 1.6
REACHES = [
    ("cutoff", dict(cutoff_a=5.0)),
    ("cutoff", dict(cutoff_a=3.0)),
    ("covalent", dict()),
    ("lammps", dict(inner_a=LAMMPS_INNER, outer_a=LAMMPS_OUTER)),
    ("lammps", dict(inner_a=2.0, outer_a=4.0)),
]


def make_zbl(reach, kw, unit="eV"):
    return dc.ZBL(unit=unit, reach=reach, **kw).double()


def ref_kwargs(reach, kw):
    return dict(cutoff=kw.get("cutoff_a", 5.0), inner=kw.get("inner_a"), outer=kw.get("outer_a"))


def switch_points(reach, kw, zi, zj):
    if reach == "cutoff":
        return [kw["cutoff_a"]], kw["cutoff_a"]
    if reach == "covalent":
        s = covalent_radii[zi] + covalent_radii[zj]
        return [s], s
    return [kw["inner_a"], kw["outer_a"]], kw["outer_a"]


@pytest.mark.parametrize("reach,kw", REACHES)
@pytest.mark.parametrize("unit,k", [("eV", K_EV), ("kcal/mol", K_KCAL)])
def test_switched_pair_energy_and_force_match_reference(reach, kw, unit, k):
    zbl = make_zbl(reach, kw, unit)
    r_np = np.concatenate([np.geomspace(0.05, 6.0, 120), [0.74, 1.09, 1.54]])
    for zi, zj in PAIRS:
        n = r_np.size
        e, g = energy_and_grad(lambda r: zbl.pair_energy(Z([zi] * n), Z([zj] * n), r), r_np)
        re, rde = switched_ref(zi, zj, r_np, reach, k=k, **ref_kwargs(reach, kw))
        np.testing.assert_allclose(e, re, rtol=1e-10, atol=1e-12 * k, err_msg=f"{reach} {zi}-{zj}")
        np.testing.assert_allclose(g, rde, rtol=1e-9, atol=1e-11 * k, err_msg=f"{reach} {zi}-{zj} force")


@pytest.mark.parametrize("reach,kw", REACHES)
def test_switched_zbl_is_smooth_at_switch_points_and_zero_beyond(reach, kw):
    zbl = make_zbl(reach, kw)
    for zi, zj in PAIRS:
        points, outer = switch_points(reach, kw, zi, zj)

        def f(r):
            return zbl.pair_energy(Z([zi] * r.numel()), Z([zj] * r.numel()), r)

        for s in points:
            delta = 1e-6
            e, g = energy_and_grad(f, np.array([s - delta, s + delta]))
            scale_g = abs(zbl_ref(zi, zj, s)[1]) + 1.0
            # continuous energy and force: the jumps across the switch point are O(delta)
            assert abs(e[1] - e[0]) < 10 * delta * scale_g, (reach, zi, zj, s, e)
            assert abs(g[1] - g[0]) < 1e-3 * scale_g, (reach, zi, zj, s, g)
        # at the outer point: energy, force and curvature go to zero smoothly (envelope: triple root;
        # LAMMPS: S makes E, E', E'' vanish), and everything is exactly zero at and beyond it
        for delta in (1e-2, 1e-3):
            e, g = energy_and_grad(f, np.array([outer - delta]))
            fc, fcp, fcpp = (abs(v) for v in zbl_ref(zi, zj, outer))
            bound = 100 * (fc + fcp + fcpp + 1e-3)
            assert abs(e[0]) < bound * delta**2, (reach, zi, zj, delta, e)
            assert abs(g[0]) < bound * delta, (reach, zi, zj, delta, g)
        e, g = energy_and_grad(f, np.array([outer, outer + 1e-9, outer + 0.5, 50.0]))
        assert np.all(e == 0.0) and np.all(g == 0.0), (reach, zi, zj, e, g)


def test_lammps_switch_is_a_constant_shift_below_inner():
    zbl = make_zbl("lammps", dict(inner_a=LAMMPS_INNER, outer_a=LAMMPS_OUTER))
    for zi, zj in PAIRS:
        r_np = np.linspace(0.1, LAMMPS_INNER, 30)
        n = r_np.size
        e, g = energy_and_grad(lambda r: zbl.pair_energy(Z([zi] * n), Z([zj] * n), r), r_np)
        e0, de0, _ = zbl_ref(zi, zj, r_np)
        fc, fcp, fcpp = zbl_ref(zi, zj, LAMMPS_OUTER)
        tc = LAMMPS_OUTER - LAMMPS_INNER
        shift = -fc + tc / 2 * fcp - tc**2 / 12 * fcpp
        np.testing.assert_allclose(e - e0, np.full(n, shift), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(g, de0, rtol=1e-11)  # force unchanged below inner
        assert abs(shift) > 1e-3  # the shift is real for these pairs


def test_covalent_switch_uses_ase_covalent_radii():
    zbl = make_zbl("covalent", {})
    for zi, zj in PAIRS:
        s = covalent_radii[zi] + covalent_radii[zj]
        r_np = np.array([0.5 * s, 0.9 * s, 0.999 * s, s, 1.01 * s])
        e = npy(zbl.pair_energy(Z([zi] * 5), Z([zj] * 5), T(r_np)))
        np.testing.assert_allclose(e, switched_ref(zi, zj, r_np, "covalent")[0], rtol=1e-10, atol=1e-12)
        assert e[0] > 0 and e[1] > 0 and e[3] == 0 and e[4] == 0


# ----------------------------------------------------------------------------------------------------------------
# per-atom energies: each unordered pair counted once
# ----------------------------------------------------------------------------------------------------------------
def all_directed_edges(pos, cutoff):
    n = len(pos)
    rows, cols = [], []
    for j, i in itertools.permutations(range(n), 2):
        if np.linalg.norm(pos[i] - pos[j]) <= cutoff:
            rows.append(j)
            cols.append(i)
    return np.array([rows, cols], dtype=np.int64)


@pytest.mark.parametrize("reach,kw", REACHES[:1] + REACHES[2:4])
@pytest.mark.parametrize("name", ["CH3CH2OH", "H2O", "C6H6"])
def test_zbl_forward_per_atom_counts_each_pair_once(reach, kw, name):
    atoms = molecule(name)
    z_np, pos = atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64)
    ei = all_directed_edges(pos, 5.0)
    dist = np.linalg.norm(pos[ei[1]] - pos[ei[0]], axis=1)
    zbl = make_zbl(reach, kw)
    per_atom = zbl(Z(z_np), torch.as_tensor(ei), T(dist))
    assert tuple(per_atom.shape) == (len(z_np),)
    # reference: sum over unordered pairs i < j of the switched pair energy
    n = len(z_np)
    pair_e = np.zeros((n, n))
    for i, j in itertools.combinations(range(n), 2):
        r = np.linalg.norm(pos[i] - pos[j])
        if r <= 5.0:
            pair_e[i, j] = pair_e[j, i] = switched_ref(z_np[i], z_np[j], r, reach, **ref_kwargs(reach, kw))[0]
    total_ref = pair_e[np.triu_indices(n, 1)].sum()
    if reach != "covalent":  # (ase's O-H and C-H bonds sit at or beyond the covalent-radius sum)
        assert total_ref > 0.1
    # atol: the envelope near its triple root is computed with cancellation (~1e-15 relative to E_zbl)
    np.testing.assert_allclose(float(per_atom.sum()), total_ref, rtol=1e-11, atol=1e-11)
    # half of each pair goes to each of its two atoms
    np.testing.assert_allclose(npy(per_atom), 0.5 * pair_e.sum(1), rtol=1e-11, atol=1e-11)


def test_zbl_forward_single_direction_counts_half():
    """A single directed edge carries half of the pair (each unordered pair is two directed edges)."""
    zbl = make_zbl("cutoff", dict(cutoff_a=5.0))
    per_atom = zbl(Z([6, 1]), torch.tensor([[0], [1]]), T([1.09]))
    ref = switched_ref(6, 1, 1.09, "cutoff")[0]
    np.testing.assert_allclose(float(per_atom.sum()), 0.5 * ref, rtol=1e-12)


def test_zbl_forward_coincident_atoms_raise():
    zbl = make_zbl("cutoff", dict(cutoff_a=5.0))
    with pytest.raises(ValueError, match=r"(?i)coincident"):
        zbl(Z([6, 1]), torch.tensor([[0, 1], [1, 0]]), T([0.0, 0.0]))


def test_zbl_term_summary_is_learned_weight_times_molecule_zbl_energy():
    """zbl_term_summary (what a trained DimezblNet's ZBL term adds, written as zbl_term.json) against the
    reference pair sum: E_zbl of each molecule, its mean/std, and weight x E_zbl in Table 1's unit (meV for
    HOMO, trained in eV); the learned weight is read from the model, not reset by the summary."""
    from types import SimpleNamespace

    names = ["CH3CH2OH", "H2O", "C6H6", "CH4"]
    samples, reference = [], []
    for name in names:
        atoms = molecule(name)
        z_np, pos = atoms.numbers.astype(np.int64), atoms.positions.astype(np.float64)
        samples.append(SimpleNamespace(z=Z(z_np), pos=T(pos, torch.float32)))
        pos = pos.astype(np.float32).astype(np.float64)  # the positions the model sees
        reference.append(
            sum(
                switched_ref(z_np[i], z_np[j], np.linalg.norm(pos[i] - pos[j]), "cutoff")[0]
                for i, j in itertools.combinations(range(len(z_np)), 2)
                if np.linalg.norm(pos[i] - pos[j]) <= 5.0
            )
        )
    reference = np.array(reference)
    model = dc.DimezblNet(hidden_channels=8, num_blocks=1, zbl=True, zbl_learnable_scale=True)
    with torch.no_grad():
        model.zbl.scale.fill_(-0.003)
    data = SimpleNamespace(config=SimpleNamespace(dataset="qm9", target="homo"), test=samples)
    term = dz.zbl_term_summary(model, data, "test")
    assert term["n_molecules"] == len(names) and term["zbl_weight_learned"]
    np.testing.assert_allclose(term["zbl_weight"], -0.003, rtol=1e-6)
    np.testing.assert_allclose(term["zbl_energy"]["mean"], reference.mean(), rtol=1e-11)
    np.testing.assert_allclose(term["zbl_energy"]["std"], reference.std(), rtol=1e-9)
    assert term["zbl_energy"]["unit"] == "eV" and term["contribution"]["unit"] == "meV"
    weight = float(np.float32(-0.003))
    np.testing.assert_allclose(term["contribution"]["mean"], 1000 * weight * reference.mean(), rtol=1e-11)
    np.testing.assert_allclose(term["contribution"]["std"], 1000 * abs(weight) * reference.std(), rtol=1e-9)
    assert model.zbl.scale.item() == pytest.approx(-0.003)  # the model's own weight is untouched
    with pytest.raises(ValueError, match="no ZBL term"):
        dz.zbl_term_summary(dc.DimezblNet(hidden_channels=8, num_blocks=1, zbl=False), data, "test")


def test_the_covalent_radii_table_is_ases():
    from ase.data import covalent_radii

    np.testing.assert_array_equal(dc.covalent_radii_a(), covalent_radii[: dc.MAX_ATOMIC_NUMBER + 1])
