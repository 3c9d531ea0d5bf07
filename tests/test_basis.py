"""Basis functions (paper Eq. 4-6; DESIGN.md section 2) against independent references.

References are computed here with scipy (spherical_jn, eval_legendre, brentq) and explicit formulas, never with
dimezbl_core itself. Everything is float64.
"""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.special import eval_legendre, spherical_jn

import dimezbl_core as dc

NUM_SPHERICAL = 7
NUM_RADIAL = 6
CUTOFF = 5.0


# ----------------------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------------------
def u_ref(x, p):
    """Eq. 6 polynomial envelope and its first and second derivatives (exact, by hand), zero for x >= 1."""
    x = np.asarray(x, dtype=np.float64)
    a, b, c = -(p + 1) * (p + 2) / 2.0, p * (p + 2.0), -p * (p + 1) / 2.0
    u = 1 + a * x**p + b * x ** (p + 1) + c * x ** (p + 2)
    du = a * p * x ** (p - 1) + b * (p + 1) * x**p + c * (p + 2) * x ** (p + 1)
    d2u = a * p * (p - 1) * x ** (p - 2) + b * (p + 1) * p * x ** (p - 1) + c * (p + 2) * (p + 1) * x**p
    inside = x < 1
    return np.where(inside, u, 0.0), np.where(inside, du, 0.0), np.where(inside, d2u, 0.0)


def bessel_zeros_ref(num_spherical, num_radial):
    """z_ln, the n-th positive zero of j_l, by bracketing sign changes on a fine grid and brentq (scipy)."""
    zeros = np.zeros((num_spherical, num_radial))
    grid = np.linspace(1e-3, 60.0, 60001)
    for l in range(num_spherical):
        vals = spherical_jn(l, grid)
        idx = np.nonzero(np.sign(vals[:-1]) * np.sign(vals[1:]) < 0)[0]
        found = [
            brentq(lambda t: spherical_jn(l, t), grid[k], grid[k + 1], xtol=1e-15, rtol=1e-15) for k in idx[:num_radial]
        ]
        assert len(found) == num_radial
        zeros[l] = found
    return zeros


ZEROS_REF = bessel_zeros_ref(NUM_SPHERICAL, NUM_RADIAL)


def as_numpy(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


# ----------------------------------------------------------------------------------------------------------------
# spherical Bessel functions j_l
# ----------------------------------------------------------------------------------------------------------------
def test_spherical_bessel_matches_scipy_on_wide_range():
    x = np.geomspace(1e-3, 20.0, 997)
    out = as_numpy(dc.spherical_bessel_jn(torch.tensor(x, dtype=torch.float64), NUM_SPHERICAL))
    assert out.shape == (x.size, NUM_SPHERICAL)
    for l in range(NUM_SPHERICAL):
        ref = spherical_jn(l, x)
        # relative 1e-10 where j_l is not tiny; 1e-15 absolute covers the neighbourhoods of the zeros
        np.testing.assert_allclose(out[:, l], ref, rtol=1e-10, atol=1e-15, err_msg=f"l={l}")


def test_spherical_bessel_relative_accuracy_at_small_x():
    """Below the first zero j_l > 0 and decays like x^l/(2l+1)!!: the value must be right *relatively*, not only
    to an absolute 1e-15 (closed-form sin/cos expressions lose all digits there by cancellation)."""
    x = np.geomspace(1e-3, 2.0, 401)
    out = as_numpy(dc.spherical_bessel_jn(torch.tensor(x, dtype=torch.float64), NUM_SPHERICAL))
    for l in range(NUM_SPHERICAL):
        ref = spherical_jn(l, x)
        assert np.all(ref > 0)
        rel = np.abs(out[:, l] - ref) / ref
        assert rel.max() < 1e-10, f"l={l}: worst relative error {rel.max():.3e} at x={x[rel.argmax()]:.4g}"


def test_spherical_bessel_leading_small_x_behaviour():
    # j_l(x) -> x^l / (2l+1)!!  as x -> 0
    x = torch.tensor([1e-3, 1e-4], dtype=torch.float64)
    out = as_numpy(dc.spherical_bessel_jn(x, NUM_SPHERICAL))
    for l in range(NUM_SPHERICAL):
        double_fact = float(np.prod(np.arange(2 * l + 1, 0, -2)))
        np.testing.assert_allclose(out[:, l], as_numpy(x) ** l / double_fact, rtol=1e-6)


def test_spherical_bessel_broadcasts_leading_dims():
    x = torch.linspace(0.1, 10.0, 12, dtype=torch.float64).reshape(3, 4)
    out = dc.spherical_bessel_jn(x, 3)
    assert tuple(out.shape) == (3, 4, 3)
    np.testing.assert_allclose(as_numpy(out)[..., 2], spherical_jn(2, as_numpy(x)), rtol=1e-10, atol=1e-15)


# ----------------------------------------------------------------------------------------------------------------
# Bessel zeros
# ----------------------------------------------------------------------------------------------------------------
def test_bessel_zeros_shape_and_values():
    z = np.asarray(dc.bessel_zeros(NUM_SPHERICAL, NUM_RADIAL), dtype=np.float64)
    assert z.shape == (NUM_SPHERICAL, NUM_RADIAL)
    np.testing.assert_allclose(z, ZEROS_REF, rtol=1e-12, atol=0)


def test_bessel_zeros_are_roots_increasing_and_interlacing():
    z = np.asarray(dc.bessel_zeros(NUM_SPHERICAL, NUM_RADIAL), dtype=np.float64)
    for l in range(NUM_SPHERICAL):
        # roots: |j_l(z)| tiny compared with the function's local scale |j_l'(z)| ~ 1/z
        assert np.all(np.abs(spherical_jn(l, z[l])) < 1e-12), l
        assert np.all(np.diff(z[l]) > 0), l
        assert z[l, 0] > l  # the first zero of j_l lies beyond l
    # interlacing: z_{l,n} < z_{l+1,n} < z_{l,n+1}
    assert np.all(z[:-1, :] < z[1:, :])
    assert np.all(z[1:, :-1] < z[:-1, 1:])
    # j_0 = sin x / x: zeros n*pi
    np.testing.assert_allclose(z[0], np.pi * np.arange(1, NUM_RADIAL + 1), rtol=1e-14)
    # published values (Abramowitz & Stegun, Table 10.6): tan x = x, and the first zeros of j_2, second of j_1
    np.testing.assert_allclose(z[1, 0], 4.493409457909064, rtol=1e-13)
    np.testing.assert_allclose(z[1, 1], 7.725251836937707, rtol=1e-13)
    np.testing.assert_allclose(z[2, 0], 5.763459196894550, rtol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# envelope (Eq. 6)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p", [6, 5, 3])
def test_envelope_polynomial_matches_formula(p):
    x = np.linspace(0.0, 1.5, 301)
    out = as_numpy(dc.envelope_polynomial(torch.tensor(x), exponent_p=p))
    np.testing.assert_allclose(out, u_ref(x, p)[0], rtol=1e-12, atol=1e-13)
    assert np.all(out[x >= 1] == 0.0)


def test_envelope_polynomial_default_exponent_is_6():
    x = torch.linspace(0.0, 0.99, 50, dtype=torch.float64)
    np.testing.assert_allclose(as_numpy(dc.envelope_polynomial(x)), u_ref(as_numpy(x), 6)[0], rtol=1e-12, atol=1e-14)


def _autograd_derivatives(x_np, p):
    x = torch.tensor(x_np, dtype=torch.float64, requires_grad=True)
    u = dc.envelope_polynomial(x, exponent_p=p)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    (d2u,) = torch.autograd.grad(du.sum(), x)
    return as_numpy(u), as_numpy(du), as_numpy(d2u)


@pytest.mark.parametrize("p", [6, 5])
def test_envelope_derivatives_by_autograd_match_formula_and_vanish_at_cutoff(p):
    x = np.linspace(0.05, 0.999, 200)
    u, du, d2u = _autograd_derivatives(x, p)
    ru, rdu, rd2u = u_ref(x, p)
    # atol: near x = 1 the polynomial cancels (terms up to p(p+2) ~ 48), ~1e-14 absolute rounding either side
    np.testing.assert_allclose(u, ru, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(du, rdu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d2u, rd2u, rtol=1e-10, atol=1e-10)
    # value 1 at the origin
    assert float(dc.envelope_polynomial(torch.tensor([0.0], dtype=torch.float64), exponent_p=p)[0]) == pytest.approx(
        1.0, abs=1e-15
    )
    # triple root at x = 1: u ~ d^3, u' ~ d^2, u'' ~ d from below (d = 1 - x), exactly zero at and beyond 1
    for d in (1e-2, 1e-3, 1e-4):
        u1, du1, d2u1 = (v[0] for v in _autograd_derivatives(np.array([1.0 - d]), p))
        scale = p * (p + 1) * (p + 2)  # |u'''(1)| = p (p+1) (p+2)
        assert abs(u1) <= scale / 6 * d**3 * 1.1
        assert abs(du1) <= scale / 2 * d**2 * 1.1
        assert abs(d2u1) <= scale * d * 1.1
    u1, du1, d2u1 = _autograd_derivatives(np.array([1.0, 1.0 + 1e-9, 1.3]), p)
    assert np.all(u1 == 0) and np.all(du1 == 0) and np.all(d2u1 == 0)


def test_dimenet_envelope_is_u_over_x():
    env = dc.Envelope(exponent=5)  # p = 6
    x = np.linspace(0.01, 1.5, 300)
    out = as_numpy(env(torch.tensor(x)))
    ref = u_ref(x, 6)[0] / x
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    assert np.all(out[x >= 1] == 0.0)


# ----------------------------------------------------------------------------------------------------------------
# radial basis (Eq. 4, DimeNet's form)
# ----------------------------------------------------------------------------------------------------------------
def test_bessel_basis_layer_matches_formula():
    layer = dc.BesselBasisLayer(num_radial=NUM_RADIAL, cutoff=CUTOFF, envelope_exponent=5).double()
    freq = [p for n, p in layer.named_parameters() if n.split(".")[-1] == "freq"]
    assert len(freq) == 1 and freq[0].requires_grad, "the frequencies must be a trainable parameter 'freq'"
    # initialised to n*pi (to float32 precision: built in the default dtype, as PyG/DimeNet, then .double())
    np.testing.assert_allclose(as_numpy(freq[0]), np.pi * np.arange(1, NUM_RADIAL + 1), rtol=1e-7)
    with torch.no_grad():
        layer.freq.copy_(torch.tensor(np.pi * np.arange(1, NUM_RADIAL + 1)))

    d = np.concatenate([np.linspace(0.3, 6.0, 400), [CUTOFF, CUTOFF + 1e-9]])
    out = as_numpy(layer(torch.tensor(d)))
    assert out.shape == (d.size, NUM_RADIAL)
    x = d / CUTOFF
    n = np.arange(1, NUM_RADIAL + 1)
    ref = (u_ref(x, 6)[0] / x)[:, None] * np.sin(n[None, :] * np.pi * x[:, None])
    np.testing.assert_allclose(out, ref, rtol=1e-11, atol=1e-13)
    assert np.all(out[d >= CUTOFF] == 0.0)


def test_bessel_basis_layer_uses_trained_frequencies():
    layer = dc.BesselBasisLayer(num_radial=NUM_RADIAL, cutoff=CUTOFF, envelope_exponent=5).double()
    new_freq = np.pi * np.arange(1, NUM_RADIAL + 1) * 1.1 + 0.05
    with torch.no_grad():
        layer.freq.copy_(torch.tensor(new_freq))
    d = np.linspace(0.5, 4.5, 50)
    x = d / CUTOFF
    ref = (u_ref(x, 6)[0] / x)[:, None] * np.sin(new_freq[None, :] * x[:, None])
    np.testing.assert_allclose(as_numpy(layer(torch.tensor(d))), ref, rtol=1e-11, atol=1e-13)


# ----------------------------------------------------------------------------------------------------------------
# spherical basis (Eq. 5, DimeNet's form)
# ----------------------------------------------------------------------------------------------------------------
# DimeNet's Jn_zeros (kept by PyG's dimenet_utils) stores the zeros z_ln in float32, and the normaliser is computed
# from them in float32 arithmetic; for weight compatibility dimezbl_core keeps that rounding (documented in its
# SphericalBasisLayer). The checks are therefore: (1) identical to PyG's SphericalBasisLayer to float64 precision;
# (2) the scipy formula evaluated at the float32-rounded zeros, to the float32 precision of the normaliser;
# (3) the scipy formula at the exact zeros, to the effect of that rounding (~1e-7 of the scale).
def sbf_reference(dist, angle, idx_kj, num_spherical, num_radial, cutoff, zeros=None):
    if zeros is None:
        zeros = bessel_zeros_ref(num_spherical, num_radial)
    x = dist / cutoff
    env = u_ref(x, 6)[0] / x  # Envelope(exponent=5): u(x)/x, p = 6
    out = np.zeros((angle.size, num_spherical * num_radial))
    xk = x[idx_kj]
    for l in range(num_spherical):
        y_l0 = math.sqrt((2 * l + 1) / (4 * math.pi)) * eval_legendre(l, np.cos(angle))
        for n in range(num_radial):
            z = zeros[l, n]
            norm = 1.0 / math.sqrt(0.5 * spherical_jn(l + 1, z) ** 2)
            out[:, l * num_radial + n] = env[idx_kj] * spherical_jn(l, z * xk) * norm * y_l0
    return out


def sbf_inputs(seed=0, E=40, T=300, cutoff=CUTOFF):
    rng = np.random.default_rng(seed)
    dist = rng.uniform(0.12 * cutoff, 0.99 * cutoff, size=E)
    dist[:3] = [cutoff, 1.06 * cutoff, 0.18 * cutoff]  # at and beyond the cutoff: envelope zero
    angle = np.concatenate([[0.0, np.pi, np.pi / 2], rng.uniform(0.0, np.pi, size=T - 3)])
    idx_kj = rng.integers(0, E, size=T)
    return dist, angle, idx_kj


def run_sbf(layer, dist, angle, idx_kj):
    return as_numpy(layer(torch.tensor(dist), torch.tensor(angle), torch.tensor(idx_kj, dtype=torch.long)))


@pytest.mark.parametrize("sizes", [(7, 6, 5.0), (4, 3, 3.0)])
def test_spherical_basis_layer_matches_scipy_formula(sizes):
    L, R, cutoff = sizes
    dist, angle, idx_kj = sbf_inputs(cutoff=cutoff)
    layer = dc.SphericalBasisLayer(num_spherical=L, num_radial=R, cutoff=cutoff, envelope_exponent=5).double()
    out = run_sbf(layer, dist, angle, idx_kj)
    assert out.shape == (angle.size, L * R)
    zeros32 = bessel_zeros_ref(L, R).astype(np.float32).astype(np.float64)
    ref32 = sbf_reference(dist, angle, idx_kj, L, R, cutoff, zeros=zeros32)
    scale = np.abs(ref32).max()
    assert scale > 0.1  # non-trivial
    # (2) formula at DimeNet's float32 zeros; rtol: the float32 normaliser (<= ~1e-7 relative)
    np.testing.assert_allclose(out, ref32, rtol=3e-7, atol=1e-10 * scale)
    # (3) formula at the exact zeros: only the float32 rounding of z_ln separates them
    ref = sbf_reference(dist, angle, idx_kj, L, R, cutoff)
    assert np.abs(out - ref).max() < 1e-6 * scale
    assert np.all(out[np.isin(idx_kj, [0, 1])] == 0.0)


def test_spherical_basis_layer_equals_pyg_layer():
    """Same numbers as PyG's SphericalBasisLayer (sympy closed forms) in float64: a model built in the default
    float32 dtype and converted with .double() (the usual way) must not keep float32-rounded constants."""
    from torch_geometric.nn.models.dimenet import SphericalBasisLayer as PygSBF

    from bench._pyg_standins import memoize_pyg_basis_forms

    memoize_pyg_basis_forms()

    dist, angle, idx_kj = sbf_inputs(seed=3)
    ours = run_sbf(dc.SphericalBasisLayer(NUM_SPHERICAL, NUM_RADIAL, CUTOFF, 5).double(), dist, angle, idx_kj)
    ref = run_sbf(PygSBF(NUM_SPHERICAL, NUM_RADIAL, CUTOFF, 5).double(), dist, angle, idx_kj)
    scale = np.abs(ref).max()
    # atol: PyG's closed-form j_l lose ~1e-11 absolute at small arguments (cancellation), ours does not
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-10 * scale)


def test_sbf_normaliser_equals_the_float32_scipy_computation_dimenet_uses():
    """The normaliser 1 / sqrt(0.5 j_{l+1}(z_ln)^2), computed here without scipy, is bit-identical to the float32
    computation of DimeNet's original (scipy.special.jv on the float32 zeros)."""
    from scipy.special import jv

    for num_spherical, num_radial in ((7, 6), (3, 4), (6, 8)):
        zeros = dc.bessel_zeros(num_spherical, num_radial).astype(np.float32)
        orders = np.arange(num_spherical, dtype=np.float32)[:, None]
        j_next = np.sqrt(np.float32(np.pi) / (2 * zeros)) * jv(orders + np.float32(1.5), zeros)
        reference = 1 / (np.float32(0.5) * j_next**2) ** np.float32(0.5)
        ours = dc.SphericalBasisLayer(num_spherical, num_radial).constants.arrays["normalizer"]
        np.testing.assert_array_equal(ours.astype(np.float32), reference)
