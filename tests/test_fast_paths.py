"""The reordered computations of dimezbl_core equal the straightforward formulas they replace."""

import pytest
import torch

import dimezbl_core as dc


def _graph(num_atoms=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(num_atoms, 3, generator=g, dtype=torch.float64) * 4.0
    batch = torch.zeros(num_atoms, dtype=torch.long)
    edge_index = dc.radius_graph(pos, batch, 5.0)
    return pos, edge_index, dc.triplets(edge_index, num_atoms)


def _residual_stack(block, h, x):
    """The part of an interaction block after the message: residual layers, skip connection."""
    for layer in block.layers_before_skip:
        h = layer(h)
    h = block.act(block.lin(h)) + x
    for layer in block.layers_after_skip:
        h = layer(h)
    return h


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
    torch.testing.assert_close(out, _residual_stack(block, h, x), rtol=1e-12, atol=1e-12)


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


def _random_triplet_indices(num_edges=9, num_triplets=40, seed=3, sort_by_target=False):
    g = torch.Generator().manual_seed(seed)
    idx_ji = torch.randint(0, num_edges, (num_triplets,), generator=g)
    idx_kj = torch.randint(0, num_edges, (num_triplets,), generator=g)
    if sort_by_target:
        idx_ji = idx_ji.sort().values
    return idx_kj, idx_ji


@pytest.mark.parametrize("sort_by_target", [True, False])
def test_triplet_aggregate_equals_per_triplet_scatter(sort_by_target):
    num_edges, num_weights, hidden = 9, 3, 5
    idx_kj, idx_ji = _random_triplet_indices(num_edges, sort_by_target=sort_by_target)
    g = torch.Generator().manual_seed(4)
    s = torch.randn(idx_kj.numel(), num_weights, generator=g, dtype=torch.float64)
    x = torch.randn(num_edges, hidden, generator=g, dtype=torch.float64)
    plan = dc.TripletPlan(idx_kj, idx_ji, num_edges, num_weights)
    # the definition, one triplet at a time: A[ji, b, :] += s[t, b] x[kj, :]
    reference = torch.zeros(num_edges, num_weights, hidden, dtype=torch.float64)
    for t in range(idx_kj.numel()):
        reference[idx_ji[t]] += s[t, :, None] * x[idx_kj[t]]
    torch.testing.assert_close(dc.triplet_aggregate(plan, s, x), reference, rtol=1e-12, atol=1e-12)


def test_triplet_aggregate_is_twice_and_thrice_differentiable():
    """Force training differentiates the energy twice (forces, then the loss w.r.t. the weights); every
    backward of the sparse aggregation is again a sparse product, checked here against finite differences
    to third order."""
    num_edges, num_weights, hidden = 6, 2, 3
    idx_kj, idx_ji = _random_triplet_indices(num_edges, num_triplets=15, seed=5)
    plan = dc.TripletPlan(idx_kj, idx_ji, num_edges, num_weights)
    g = torch.Generator().manual_seed(6)
    s = torch.randn(idx_kj.numel(), num_weights, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(num_edges, hidden, generator=g, dtype=torch.float64, requires_grad=True)

    def aggregate(s, x):
        return dc.triplet_aggregate(plan, s, x)

    assert torch.autograd.gradcheck(aggregate, (s, x))
    assert torch.autograd.gradgradcheck(aggregate, (s, x))

    def gradient_norms(s, x):  # a nonlinear function of first derivatives: its gradgradcheck is third order
        out = aggregate(s, x)
        grad_s, grad_x = torch.autograd.grad((out**2).sum(), (s, x), create_graph=True)
        return (grad_s**2).sum() + (grad_x**3).sum()

    assert torch.autograd.gradgradcheck(gradient_norms, (s, x))


@pytest.mark.parametrize("sort_by_target", [True, False])
def test_triplet_contract_equals_per_triplet_sum(sort_by_target):
    """out[ji] = sum_k sum_l y[t, l] g[kj, l, :], for triplets in `triplets`' order (the plan's values
    are then y itself, no permutation) and in any order."""
    num_edges, num_weights, hidden = 9, 3, 5
    idx_kj, idx_ji = _random_triplet_indices(num_edges, sort_by_target=sort_by_target)
    if sort_by_target:  # (ji, kj) ascending, as `triplets` returns them
        order = torch.argsort(idx_ji * num_edges + idx_kj, stable=True)
        idx_kj, idx_ji = idx_kj[order], idx_ji[order]
    g_ = torch.Generator().manual_seed(10)
    y = torch.randn(idx_kj.numel(), num_weights, generator=g_, dtype=torch.float64)
    g = torch.randn(num_edges, num_weights, hidden, generator=g_, dtype=torch.float64)
    plan = dc.TripletPlan.transposed(idx_kj, idx_ji, num_edges, num_weights)
    assert (plan.order_t is None) == sort_by_target
    reference = torch.zeros(num_edges, hidden, dtype=torch.float64)
    for t in range(idx_kj.numel()):
        reference[idx_ji[t]] += (y[t, :, None] * g[idx_kj[t]]).sum(0)
    torch.testing.assert_close(dc.triplet_contract(plan, y, g), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sort_by_target", [True, False])
def test_triplet_contract_is_twice_and_thrice_differentiable(sort_by_target):
    """Both sampled-product paths (on the transposed pattern when its values are in triplet order, on
    the plain pattern otherwise) and every backward, against finite differences to third order."""
    num_edges, num_weights, hidden = 6, 2, 3
    idx_kj, idx_ji = _random_triplet_indices(num_edges, num_triplets=15, seed=11, sort_by_target=sort_by_target)
    if sort_by_target:
        order = torch.argsort(idx_ji * num_edges + idx_kj, stable=True)
        idx_kj, idx_ji = idx_kj[order], idx_ji[order]
    plan = dc.TripletPlan.transposed(idx_kj, idx_ji, num_edges, num_weights)
    g_ = torch.Generator().manual_seed(12)
    y = torch.randn(idx_kj.numel(), num_weights, generator=g_, dtype=torch.float64, requires_grad=True)
    g = torch.randn(num_edges, num_weights, hidden, generator=g_, dtype=torch.float64, requires_grad=True)

    def contract(y, g):
        return dc.triplet_contract(plan, y, g)

    assert torch.autograd.gradcheck(contract, (y, g))
    assert torch.autograd.gradgradcheck(contract, (y, g))

    def gradient_norms(y, g):
        out = contract(y, g)
        grad_y, grad_g = torch.autograd.grad((out**2).sum(), (y, g), create_graph=True)
        return (grad_y**2).sum() + (grad_g**3).sum()

    assert torch.autograd.gradgradcheck(gradient_norms, (y, g))


def test_spherical_bessel_own_order_equals_all_orders_diagonal():
    g = torch.Generator().manual_seed(8)
    x = torch.rand(300, 7, 6, generator=g, dtype=torch.float64) * 14.0
    x[:60] *= 1e-2  # the power-series branch
    all_orders = dc.spherical_bessel_jn(x, 7)  # [..., L, R, L]
    expected = torch.diagonal(all_orders, dim1=1, dim2=3).transpose(1, 2)
    torch.testing.assert_close(dc.spherical_bessel_own_order(x), expected, rtol=0, atol=1e-15)
    for num_spherical in (2, 3):
        small = x[:, :num_spherical]
        expected = torch.diagonal(dc.spherical_bessel_jn(small, num_spherical), dim1=1, dim2=3).transpose(1, 2)
        torch.testing.assert_close(dc.spherical_bessel_own_order(small), expected, rtol=0, atol=1e-15)


def test_spherical_bessel_own_order_derivatives_on_both_branches():
    """The series is evaluated only where it is used and placed over the recurrence's values:
    first and second derivatives must still be those of j_l on each side of x = max(l, 1)."""
    g = torch.Generator().manual_seed(10)
    x = torch.rand(6, 7, 3, generator=g, dtype=torch.float64) * 9.0 + 0.05
    x[:2] *= 0.1  # the power-series branch at every order
    orders = torch.arange(7, dtype=torch.float64)[:, None]
    assert (x < orders.clamp(min=1.0)).any() and (x >= orders.clamp(min=1.0)).any()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(dc.spherical_bessel_own_order, (x,))
    assert torch.autograd.gradgradcheck(dc.spherical_bessel_own_order, (x,))
    for value in (0.3, 7.5):  # below 1: the series at every order; above 6: the recurrence only
        one_branch = torch.full((2, 7, 3), value, dtype=torch.float64)
        expected = torch.diagonal(dc.spherical_bessel_jn(one_branch, 7), dim1=1, dim2=3).transpose(1, 2)
        torch.testing.assert_close(dc.spherical_bessel_own_order(one_branch), expected, rtol=0, atol=1e-15)


def test_interaction_pp_block_equals_per_triplet_formula():
    torch.manual_seed(9)
    pos, edge_index, (i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji) = _graph(seed=9)
    hidden, int_emb, basis_emb, num_spherical, num_radial = 16, 8, 4, 3, 4
    block = dc.InteractionPPBlock(hidden, int_emb, basis_emb, num_spherical, num_radial, 1, 2).double()
    num_edges, num_triplets = edge_index.size(1), idx_kj.numel()
    x = torch.randn(num_edges, hidden, dtype=torch.float64)
    rbf = torch.randn(num_edges, num_radial, dtype=torch.float64)
    sbf = torch.randn(num_triplets, num_spherical * num_radial, dtype=torch.float64)
    plan = dc.TripletPlan(idx_kj, idx_ji, num_edges, basis_emb)
    out = block(x, rbf, sbf, idx_kj, idx_ji, plan)

    # PyG's DimeNet++ formula: gather to triplets, Hadamard product with the embedded SBF, scatter
    x_ji = block.act(block.lin_ji(x))
    x_kj = block.act(block.lin_kj(x)) * block.lin_rbf2(block.lin_rbf1(rbf))
    x_kj = block.act(block.lin_down(x_kj))
    messages = x_kj[idx_kj] * block.lin_sbf2(block.lin_sbf1(sbf))
    x_kj = block.act(block.lin_up(torch.zeros(num_edges, int_emb, dtype=torch.float64).index_add_(0, idx_ji, messages)))
    h = x_ji + x_kj
    torch.testing.assert_close(out, _residual_stack(block, h, x), rtol=1e-12, atol=1e-12)
    # without a plan the block builds its own: same numbers
    torch.testing.assert_close(block(x, rbf, sbf, idx_kj, idx_ji), out, rtol=0, atol=0)

    # the factored path (what DimezblNet runs): the SBF as radial [E, L, R] per edge and angular [T, L]
    radial = torch.randn(num_edges, num_spherical, num_radial, dtype=torch.float64)
    angular = torch.randn(num_triplets, num_spherical, dtype=torch.float64)
    sbf = dc.SphericalBasisLayer(num_spherical, num_radial).combine(radial, angular, idx_kj)
    transposed = dc.TripletPlan.transposed(idx_kj, idx_ji, num_edges, num_spherical)
    assert transposed.order_t is None  # `triplets` order: the plan's values are the angular part itself
    torch.testing.assert_close(
        block.factored(x, rbf, radial, angular, transposed),
        block(x, rbf, sbf, idx_kj, idx_ji, plan),
        rtol=1e-12,
        atol=1e-12,
    )


def test_shared_triplet_weights_permuted_once_with_the_same_gradients():
    """`TripletPlan.share_values`: the blocks' products with the shared angular part reuse one
    permuted copy where it carries no graph; gradients equal those of an unshared plan, in a
    plain backward and under create_graph, and an in-place change of the weights is seen."""
    pos, edge_index, (i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji) = _graph(num_atoms=14, seed=11)
    num_edges, num_triplets, num_weights = edge_index.size(1), idx_kj.numel(), 7
    g = torch.Generator().manual_seed(12)
    angular = torch.randn(num_triplets, num_weights, generator=g, dtype=torch.float64)
    features = [
        torch.randn(num_edges, num_weights, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]

    def blocks(plan, y):
        return sum((dc.triplet_contract(plan, y, f) ** 2).sum() for f in features)

    plain = dc.TripletPlan.transposed(idx_kj, idx_ji, num_edges, num_weights)
    shared = dc.TripletPlan.transposed(idx_kj, idx_ji, num_edges, num_weights).share_values(angular)
    assert plain.order is not None  # the backward's products permute the weights
    expected = torch.autograd.grad(blocks(plain, angular), features)
    got = torch.autograd.grad(blocks(shared, angular), features)
    assert len(shared._permuted_values) == 1  # made once, reused by the other two blocks
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # under create_graph (force training's first backward) and then a second backward
    y = angular.clone().requires_grad_(True)
    shared.share_values(y)
    for plan in (plain, shared):
        first = torch.autograd.grad(blocks(plan, y), features, create_graph=True)
        second = torch.autograd.grad(sum(f.sum() for f in first), [y] + features)
        if plan is plain:
            expected = first + second
        else:
            for a, b in zip(first + second, expected):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # an in-place change of the shared weights (version counter) is not served from the copy
    blocks(shared, angular.detach())
    shared.share_values(angular)
    torch.autograd.grad(blocks(shared, angular), features)
    with torch.no_grad():
        angular.mul_(2.0)
    torch.testing.assert_close(
        torch.autograd.grad(blocks(shared, angular), features),
        torch.autograd.grad(blocks(plain, angular), features),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("create_graph", [False, True])
def test_swish_derivatives_equal_torch_silu_to_third_order(create_graph):
    """The hand-written first and second derivatives of `swish` (both the in-place path of a plain
    backward and the differentiable one under create_graph) equal autograd's through F.silu."""
    x0 = torch.cat(
        [
            torch.linspace(-30.0, 30.0, 61, dtype=torch.float64),
            torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4,
        ]
    )
    weights = torch.rand(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    derivatives = {}
    for name, act in (("swish", dc.swish), ("silu", torch.nn.functional.silu)):
        x = x0.clone().requires_grad_(True)
        y = act(x)
        (first,) = torch.autograd.grad((weights * y).sum(), x, create_graph=True)
        # second derivative through a force-training-like loss: d/dx sum(w * first^2)
        (second,) = torch.autograd.grad((weights * first**2).sum(), x, create_graph=create_graph)
        values = [y.detach(), first.detach(), second.detach()]
        if create_graph:
            (third,) = torch.autograd.grad(second.sum(), x)
            values.append(third)
        derivatives[name] = values
    for ours, reference in zip(derivatives["swish"], derivatives["silu"]):
        torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dc.swish, (x,))
    assert torch.autograd.gradgradcheck(dc.swish, (x,))
    assert not torch.equal(derivatives["swish"][2], torch.zeros_like(x0))


def test_first_order_keeps_value_and_first_derivative_and_drops_higher_ones():
    """`first_order(fn, x)`: the value and dfn/dx of fn (also where fn has trainable parameters,
    whose derivatives, dfn/dx's included, stay exact); the second derivative in x is zero."""
    rbf = dc.BesselBasisLayer(6).double()
    dist = torch.linspace(0.3, 4.9, 40, dtype=torch.float64)
    x = dist.clone().requires_grad_(True)
    reference = rbf(x)
    linear = dc.first_order(rbf, x)
    torch.testing.assert_close(linear, reference, rtol=0, atol=0)
    weights = torch.randn(reference.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    (d_ref,) = torch.autograd.grad((weights * reference).sum(), x, create_graph=True)
    (d_lin,) = torch.autograd.grad((weights * linear).sum(), x, create_graph=True)
    torch.testing.assert_close(d_lin, d_ref, rtol=1e-12, atol=1e-12)
    # d/dfreq of the first derivative (what force training needs) is exact ...
    (f_ref,) = torch.autograd.grad(d_ref.square().sum(), rbf.freq, retain_graph=True)
    (f_lin,) = torch.autograd.grad(d_lin.square().sum(), rbf.freq, retain_graph=True)
    torch.testing.assert_close(f_lin, f_ref, rtol=1e-12, atol=1e-12)
    # ... and the second derivative in x is dropped (the reference's is not zero)
    (x2_ref,) = torch.autograd.grad(d_ref.sum(), x)
    (x2_lin,) = torch.autograd.grad(d_lin.sum(), x, allow_unused=True, materialize_grads=True)
    assert x2_ref.abs().max() > 1e-3
    assert torch.equal(x2_lin, torch.zeros_like(x2_lin))


@pytest.mark.parametrize(
    "variant,reach", [("dimenet", "cutoff"), ("dimenet", "lammps"), ("dimenet++", "covalent"), ("dimenet++", "cutoff")]
)
def test_force_training_with_geometry_to_first_order_equals_full_autograd(variant, reach, qm9_sample_molecules):
    """`energy_and_forces(create_graph=True)` on positions that do not require grad linearises the
    geometry and bases (`pos_first_order`): energies are bit-for-bit those of the full graph,
    forces equal to rounding, and the weights' gradients of a force-training loss equal the full graph's (float64),
    ZBL's learnable scale and the RBF frequencies included."""
    samples = qm9_sample_molecules[:6]
    z = torch.cat([m["z"] for m in samples])
    pos = torch.cat([m["pos"] for m in samples]).double()
    molecule = torch.cat([torch.full((len(m["z"]),), k) for k, m in enumerate(samples)])
    torch.manual_seed(3)
    model = dc.DimezblNet(
        hidden_channels=16,
        num_blocks=2,
        variant=variant,
        int_emb_size=8,
        basis_emb_size=4,
        out_emb_channels=16,
        output_initializer="glorot_orthogonal",
        zbl_reach=reach,
        zbl_learnable_scale=True,
    ).double()
    with torch.no_grad():
        model.zbl.scale.fill_(0.7)
    force_target = torch.randn(pos.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def loss_and_grads(full_graph: bool):
        if full_graph:  # a pos that requires grad keeps every order exact
            leaf = pos.clone().requires_grad_(True)
            energy, forces = model.energy_and_forces(z, leaf, molecule, create_graph=True)
        else:
            energy, forces = model.energy_and_forces(z, pos, molecule, create_graph=True)
        loss = energy.abs().mean() + (forces - force_target).square().mean()
        return energy, forces, torch.autograd.grad(loss, list(model.parameters()))

    e_full, f_full, g_full = loss_and_grads(True)
    e_lin, f_lin, g_lin = loss_and_grads(False)
    assert torch.equal(e_lin, e_full)
    # the angle's derivative in closed form instead of autograd's through the quotient: rounding only
    torch.testing.assert_close(f_lin, f_full, rtol=1e-9, atol=1e-10)
    for (name, _), a, b in zip(model.named_parameters(), g_lin, g_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)
    assert (
        model.zbl.scale.requires_grad and g_full[[n for n, _ in model.named_parameters()].index("zbl.scale")].abs() > 0
    )


@pytest.fixture
def compiled_kernels():
    """`CompiledKernels` on for one test (built once per process), then restored; skips where this
    machine cannot build them (no C compiler, no AVX2/FMA), saying why."""
    before = dc.enable_compiled_kernels(True)
    failure = dc.CompiledKernels.failure
    try:
        dc.CompiledKernels.value_and_slope(torch.zeros(4))
        if dc.CompiledKernels.failure is not None:
            pytest.skip(f"the fused kernels cannot be built here: {dc.CompiledKernels.failure}")
        yield dc.CompiledKernels
    finally:
        dc.enable_compiled_kernels(before)
        dc.CompiledKernels.failure = failure


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_swish_kernels_equal_the_eager_path_to_third_order(compiled_kernels, dtype):
    """With the fused kernels on, swish's value and its first, second (the force-training pass,
    create_graph off and on) and third derivatives equal the eager path's (which the test above
    ties to F.silu), on every shape class the model uses ([E, 128], [E, 64], [N, 256], 1-D)."""
    generator = torch.Generator().manual_seed(0)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for shape in ((37, 128), (11, 64), (5, 256), (300,)):
        x0 = torch.randn(shape, generator=generator, dtype=dtype) * 4
        weights = torch.rand(shape, generator=generator, dtype=dtype) + 0.5
        results = {}
        for on in (False, True):
            dc.enable_compiled_kernels(on)
            x = x0.clone().requires_grad_(True)
            y = dc.swish(x)
            (first,) = torch.autograd.grad((weights * y).sum(), x, create_graph=True)
            (second_plain,) = torch.autograd.grad((weights * first**2).sum(), x, retain_graph=True)
            (second,) = torch.autograd.grad((weights * first**2).sum(), x, create_graph=True)
            (third,) = torch.autograd.grad(second.sum(), x)
            results[on] = [y.detach(), first.detach(), second_plain, second.detach(), third]
        assert compiled_kernels.failure is None
        for name, ours, reference in zip(
            ("value", "first", "second", "second (create_graph)", "third"), results[True], results[False]
        ):
            torch.testing.assert_close(ours, reference, **tolerance, msg=f"{shape} {name}")
    # the compiled path was taken: silu'(x) is what the forward kept for the backward
    x = torch.randn(8, 128, dtype=dtype, requires_grad=True)
    y = dc.swish(x)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 2 and saved[1] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_kernels_over_the_whole_float_range(compiled_kernels, dtype):
    """The kernels' own exp (a polynomial after range reduction) over every argument the activation
    can see: silu(x), silu'(x) and g g' silu''(x) against torch's formulas in float64 to a few units
    in the last place (silu' and silu'' relative to their scale: both cross zero) or, where the
    formula itself cancels in `dtype`, within twice the eager path's error; values below ~1e-30
    (float32) or ~1e-290 (float64) as zero; at +-inf and NaN the same inf/NaN as eager."""
    eps = torch.finfo(dtype).eps
    floor = 1e-30 if dtype == torch.float32 else 1e-290
    x = torch.cat(
        [torch.linspace(-760, 760, 40_001, dtype=torch.float64), torch.linspace(-20, 20, 100_003, dtype=torch.float64)]
    ).to(dtype)  # not a multiple of 8
    y, slope = compiled_kernels.value_and_slope(x)
    curvature = compiled_kernels.curvature_times(torch.full_like(x, 0.75), torch.full_like(x, -2.0), x)
    ref_y, ref_slope = dc._swish_value_and_slope(x.double())
    ref_curvature = dc._swish_curvature_times(torch.full_like(ref_y, 0.75), torch.full_like(ref_y, -2.0), x.double())
    eager_y, eager_slope = dc._swish_value_and_slope(x)  # the same formulas in `dtype` with torch's exp
    eager_curvature = dc._swish_curvature_times(torch.full_like(x, 0.75), torch.full_like(x, -2.0), x)
    for name, ours, ref, eager, scale in (
        ("silu", y, ref_y, eager_y, 0.0),
        ("silu'", slope, ref_slope, eager_slope, 1.0),
        ("curvature", curvature, ref_curvature, eager_curvature, 0.75),
    ):
        error = (ours.double() - ref).abs()
        # a few ulps, or twice the eager formula's own error where it cancels (1 - s for s ~ 1)
        bound = 8 * eps * (ref.abs() + scale) + floor + 2 * (eager.double() - ref).abs()
        assert ours.dtype == dtype and bool((error <= bound).all()), (name, x[(error - bound).argmax()].item())
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], dtype=dtype)
    ones = torch.ones_like(special)
    for ours, eager in zip(
        (*compiled_kernels.value_and_slope(special), compiled_kernels.curvature_times(ones, ones, special)),
        (*dc._swish_value_and_slope(special), dc._swish_curvature_times(ones, ones, special)),
    ):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_swish_with_skip_connection_equals_the_eager_path(compiled_kernels, dtype):
    """residual + swish(x) in one fused pass (the residual layers' skip connections): value, both
    first derivatives and the second derivative equal the eager path's; a strided residual (the
    split of DimeNet++'s merged edge layers) takes the unfused path with the same result."""
    generator = torch.Generator().manual_seed(3)
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    x0 = torch.randn(37, 128, generator=generator, dtype=dtype) * 4
    wide = torch.randn(37, 256, generator=generator, dtype=dtype)
    weights = torch.rand(37, 128, generator=generator, dtype=dtype) + 0.5
    for residual0 in (wide[:, :128].contiguous(), wide[:, 128:]):
        results = {}
        for on in (False, True):
            dc.enable_compiled_kernels(on)
            x, residual = x0.clone().requires_grad_(True), residual0.clone().requires_grad_(True)
            if not residual0.is_contiguous():
                residual = residual0.detach().clone().t().contiguous().t().requires_grad_(True)
            y = dc._plus_activation(dc.swish, x, residual)
            first_x, first_r = torch.autograd.grad((weights * y).sum(), [x, residual], create_graph=True)
            (second,) = torch.autograd.grad((weights * first_x**2).sum(), x)
            results[on] = [y.detach(), first_x.detach(), first_r, second]
            if on and residual.is_contiguous():
                assert type(y.grad_fn).__name__ == "_SwishBackward"  # one fused node, no separate sum
        for name, ours, reference in zip(("value", "d/dx", "d/dresidual", "second"), results[True], results[False]):
            torch.testing.assert_close(ours, reference, **tolerance, msg=name)
        torch.testing.assert_close(results[False][0], residual0 + torch.nn.functional.silu(x0), **tolerance)


def test_fused_message_gradients_equal_the_composite(compiled_kernels, monkeypatch):
    """DimeNet++'s per-edge messages m = q x[:, None] (`_EdgeMessages`): the fused first-order
    backward (grad x and sum_l grad q in one pass) against finite differences (gradcheck, float64),
    the differentiable composite under create_graph (gradgradcheck), and the composite's values in
    float32 on a QM9-sized width (q [E, 7, 64]; 61 channels: not a multiple of the vector width)."""
    generator = torch.Generator().manual_seed(11)
    q = torch.randn(13, 7, 19, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(13, 19, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dc._EdgeMessages.apply, (q, x))
    assert torch.autograd.gradgradcheck(dc._EdgeMessages.apply, (q, x))
    for channels in (64, 61):
        q = torch.randn(300, 7, channels, generator=generator)
        x = torch.randn(300, channels, generator=generator)
        grad = torch.randn(300, 7, channels, generator=generator)
        for ours, reference in zip(compiled_kernels.message_backward(grad, q, x), dc._message_gradients(grad, q, x)):
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
    # the model's first-order backward takes the fused pass
    calls, original = [], compiled_kernels.message_backward
    monkeypatch.setattr(compiled_kernels, "message_backward", lambda *args: calls.append(1) or original(*args))
    q = torch.randn(5, 7, 8, requires_grad=True)
    x = torch.randn(5, 8, requires_grad=True)
    dc._EdgeMessages.apply(q, x).square().sum().backward()
    assert calls == [1]
    torch.testing.assert_close(q.grad, 2 * q.detach() * x.detach().unsqueeze(1).square())


def test_fused_sbf_messages_equal_the_composite(compiled_kernels):
    """DimeNet++'s per-edge messages through the rank-B SBF embedding, q = r W_sbf2^T never stored
    (`_SbfMessages`): the fused forward and first-order backward against finite differences
    (gradcheck, float64), the composite under create_graph (gradgradcheck), and the unfused
    formula in float32 (QM9's shape r [E, 7, 8], W [64, 8]; and 61 channels, 5 basis functions)."""
    generator = torch.Generator().manual_seed(12)
    r = torch.randn(11, 7, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 3, generator=generator, dtype=torch.float64, requires_grad=True)
    x = torch.randn(11, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(dc._SbfMessages.apply, (r, weight, x))
    assert torch.autograd.gradgradcheck(dc._SbfMessages.apply, (r, weight, x))
    for basis, channels in ((8, 64), (5, 61)):
        r = torch.randn(300, 7, basis, generator=generator)
        weight = torch.randn(channels, basis, generator=generator)
        x = torch.randn(300, channels, generator=generator)
        grad = torch.randn(300, 7, channels, generator=generator)
        torch.testing.assert_close(
            compiled_kernels.sbf_messages(r, weight, x), (r @ weight.t()) * x.unsqueeze(1), rtol=1e-5, atol=1e-5
        )
        for name, ours, reference in zip(
            ("r", "weight", "x"),
            compiled_kernels.sbf_messages_backward(grad, r, weight, x),
            dc._sbf_message_gradients(grad, r, weight, x),
        ):
            scale = reference.abs().max().item()
            torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5 * scale, msg=name)
    # the raw-pointer kernels refuse shapes they would read past
    with pytest.raises(ValueError, match="weight \\[C, B\\]"):
        compiled_kernels.sbf_messages(r, weight[:, :-1], x)
    with pytest.raises(ValueError, match="grad"):
        compiled_kernels.sbf_messages_backward(grad[:, :-1], r, weight, x)


def test_fused_kernels_in_energy_training_equal_the_eager_path(compiled_kernels, qm9_sample_molecules, monkeypatch):
    """A DimeNet++ energy-training step (the first-order backward, where the fused kernels replace
    the most: swish, the messages through the SBF embedding) gives the eager path's weight
    gradients to 1e-9 in float64; the fused message backward is the one that ran, and a force
    step (second backward) keeps the unfused messages."""
    samples = qm9_sample_molecules[:6]
    z = torch.cat([m["z"] for m in samples])
    molecule = torch.cat([torch.full((len(m["z"]),), k) for k, m in enumerate(samples)])
    pos = torch.cat([m["pos"] for m in samples]).double()
    torch.manual_seed(6)
    model = dc.DimezblNet(
        hidden_channels=32,
        num_blocks=2,
        variant="dimenet++",
        int_emb_size=16,
        basis_emb_size=4,
        out_emb_channels=32,
        output_initializer="glorot_orthogonal",
    ).double()
    calls, original = [], compiled_kernels.sbf_messages_backward
    monkeypatch.setattr(compiled_kernels, "sbf_messages_backward", lambda *args: calls.append(1) or original(*args))

    def gradients(kernels):
        dc.enable_compiled_kernels(kernels)
        energy = model(z, pos, molecule)
        return [energy.detach()] + list(torch.autograd.grad(energy.square().mean(), list(model.parameters())))

    reference, fused = gradients(False), gradients(True)
    assert calls == [1, 1]  # one per interaction block
    energy, forces = model.energy_and_forces(z, pos, molecule, create_graph=True)
    forces.square().sum().backward()
    assert calls == [1, 1]  # with forces (the geometry requires grad) q is kept: the unfused messages
    names = ["energy"] + [name for name, _ in model.named_parameters()]
    for name, ours, expected in zip(names, fused, reference):
        torch.testing.assert_close(
            ours, expected, rtol=1e-9, atol=1e-9 * max(expected.abs().max().item(), 1.0), msg=name
        )


def test_compiled_swish_kernels_in_force_training_equal_the_eager_path(compiled_kernels, qm9_sample_molecules):
    """A DimeNet++ force-training step (energies, forces, weight gradients of a force loss) is the same
    with the fused kernels as without: to 1e-9 in float64. In float32 both paths round differently
    (e.g. a fused multiply-add for residual + silu), and the force loss's weight gradients amplify
    float32 rounding to ~2e-5 of their scale on either path (which tensor is worst varies with the
    kernels' vectorisation); there every tensor of the kernels' step must be within twice the eager
    float32 step's accuracy (its largest relative error against float64)."""
    samples = qm9_sample_molecules[:8]
    z = torch.cat([m["z"] for m in samples])
    molecule = torch.cat([torch.full((len(m["z"]),), k) for k, m in enumerate(samples)])
    torch.manual_seed(5)
    model = dc.DimezblNet(
        hidden_channels=32,
        num_blocks=2,
        variant="dimenet++",
        int_emb_size=16,
        basis_emb_size=4,
        out_emb_channels=32,
        output_initializer="glorot_orthogonal",
    )

    def step(dtype, kernels):
        dc.enable_compiled_kernels(kernels)
        model.to(dtype)
        pos = torch.cat([m["pos"] for m in samples]).to(dtype)
        energy, forces = model.energy_and_forces(z, pos, molecule, create_graph=True)
        loss = energy.abs().mean() + forces.square().mean()
        return [energy, forces] + list(torch.autograd.grad(loss, list(model.parameters())))

    names = ["energy", "forces"] + [name for name, _ in model.named_parameters()]
    reference, fused = step(torch.float64, False), step(torch.float64, True)
    for name, ours, expected in zip(names, fused, reference):
        scale = expected.abs().max().item()
        torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9 * max(scale, 1.0), msg=name)
    assert fused[1].abs().max() > 0
    eager32, fused32 = step(torch.float32, False), step(torch.float32, True)

    def relative_errors(result):  # max |float32 - float64| of each tensor, relative to its largest entry
        return [(r.double() - e).abs().max().item() / e.abs().max().item() for r, e in zip(result, reference)]

    eager_accuracy = max(relative_errors(eager32))  # the eager float32 step's accuracy (~2e-5 here)
    for name, error in zip(names, relative_errors(fused32)):
        assert error <= 2 * eager_accuracy, (name, error, eager_accuracy)


def test_a_build_failure_falls_back_to_the_eager_path_with_a_warning(monkeypatch):
    """Where the kernels cannot be built (here: CC names no compiler), swish warns once, naming the
    cause and the fix, computes the same values eagerly, and later calls take torch's silu."""
    before, failure, library = dc.enable_compiled_kernels(True), dc.CompiledKernels.failure, dc.CompiledKernels._library
    dc.CompiledKernels.failure, dc.CompiledKernels._library = None, None
    monkeypatch.setenv("CC", "/nonexistent/cc")
    try:
        x = torch.randn(6, 128, requires_grad=True)
        with pytest.warns(RuntimeWarning, match="C compiler.*DIMEZBL_COMPILED_KERNELS"):
            y = dc.swish(x)
        assert "/nonexistent/cc" in dc.CompiledKernels.failure
        assert "failed" in dc.CompiledKernels.state()
        # (this call's values come from the same formula run eagerly: x sigmoid(x), rounding apart)
        torch.testing.assert_close(y, torch.nn.functional.silu(x), rtol=1e-6, atol=1e-6)
        (grad,) = torch.autograd.grad(y.sum(), x)
        torch.testing.assert_close(grad, torch.ops.aten.silu_backward(torch.ones_like(x), x.detach()))
        torch.testing.assert_close(dc.swish(x), torch.nn.functional.silu(x), rtol=0, atol=0)
        assert not dc.CompiledKernels.active_for(x)  # and no second try, no second warning
    finally:
        dc.enable_compiled_kernels(before)
        dc.CompiledKernels.failure, dc.CompiledKernels._library = failure, library


def test_compiled_kernels_step_aside_under_a_dispatch_mode(compiled_kernels):
    """Under a Python dispatch mode (e.g. bench/profile_ops.py's op timer), where compiled code does
    not run, swish takes the eager path silently and the kernels stay enabled for later calls."""
    import warnings

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.randn(9, 128, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with CountOps() as mode:
            y = dc.swish(x)
    assert "silu" in mode.ops  # the eager kernel ran, seen by the mode
    torch.testing.assert_close(y, torch.nn.functional.silu(x), rtol=0, atol=0)
    assert compiled_kernels.failure is None and compiled_kernels.active_for(x)
