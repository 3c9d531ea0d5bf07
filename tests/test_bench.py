"""bench/: the op timer of profile_ops.py sees every aten call (the autograd engine's included), its output file, and
the paired ratio of bench_dimenet.py."""

import statistics

import pytest
import torch

from bench.profile_ops import OpTimer, shape_classifier


def test_op_timer_counts_forward_and_backward_calls_by_shape_class():
    timer = OpTimer(shape_classifier({"atoms": 3, "edges": 5, "triplets": 7}))
    a = torch.randn(5, 4, requires_grad=True)
    b = torch.randn(4, 2)
    with timer:
        (a @ b).sum().backward()
    assert timer.calls[("mm", "[Ex4]")] == 1  # the forward product, its rows named by the batch's sizes
    backward_products = {key for key in timer.calls if key[0] == "mm" and key != ("mm", "[Ex4]")}
    assert backward_products == {("mm", "[Ex2]")}  # grad_a = grad @ b^T, run by the autograd engine
    assert all(seconds >= 0 for seconds in timer.seconds.values())
    assert set(timer.seconds) == set(timer.calls)
    torch.testing.assert_close(a.grad, torch.ones(5, 2) @ b.t())


def test_paired_ratio_is_the_median_of_per_round_ratios():
    from bench.bench_dimenet import paired_ratio

    # round 2 ran under load: both calls slowed alike, so its ratio is unchanged and the median ignores the rest
    ours = [1.0, 3.0, 1.0]
    pyg = [1.5, 4.5, 1.6]
    assert paired_ratio(ours, pyg) == 1.5
    assert statistics.median(pyg) / statistics.median(ours) == 1.6  # the ratio of medians pairs round 1 with 3
    with pytest.raises(ValueError, match="at least one timed round"):
        paired_ratio([], [])


def test_profile_output_file_has_provenance_header_and_the_printed_lines(tmp_path):
    from bench.profile_ops import write_output

    path = tmp_path / "sub" / "profile.txt"
    write_output(
        str(path),
        ["== ours DimeNet++: step 610 ms", "   by op: mm 275"],
        {"git_commit": "abc123", "git_dirty": False, "command": "bench/profile_ops.py --out x"},
    )
    lines = path.read_text().splitlines()
    assert lines[:3] == ["# git_commit: abc123", "# git_dirty: False", "# command: bench/profile_ops.py --out x"]
    assert any(line.startswith("# loadavg_at_end: [") for line in lines)
    assert lines[-2:] == ["== ours DimeNet++: step 610 ms", "   by op: mm 275"]
    assert not list(path.parent.glob("*.tmp"))


def test_profile_output_prints_and_keeps_every_line(capsys):
    from bench.profile_ops import Output

    emit = Output()
    emit("\n== ours DimeNet++: step 610 ms")
    emit("   by op: mm 275")
    assert emit.lines == ["", "== ours DimeNet++: step 610 ms", "   by op: mm 275"]
    assert capsys.readouterr().out == "\n== ours DimeNet++: step 610 ms\n   by op: mm 275\n"


def test_ab_revisions_loads_two_versions_as_separate_modules(tmp_path):
    """ab_revisions.py: the working tree's and a committed dimezbl_core.py become two modules of their own
    (their classes distinct), and both build the same model from the same weights."""
    from bench import ab_revisions

    worktree = ab_revisions.load_revision(ab_revisions.WORKTREE, str(tmp_path))
    committed = ab_revisions.load_revision("HEAD", str(tmp_path))
    assert worktree is not committed and worktree.DimezblNet is not committed.DimezblNet
    kwargs = dict(
        hidden_channels=8,
        num_blocks=1,
        variant="dimenet++",
        int_emb_size=4,
        basis_emb_size=2,
        out_emb_channels=8,
        output_initializer="glorot_orthogonal",
    )
    torch.manual_seed(0)
    a = worktree.DimezblNet(**kwargs)
    b = committed.DimezblNet(**kwargs)
    b.load_state_dict(a.state_dict())
    z = torch.tensor([6, 1, 1, 8])
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.1, 0.0, 0.0], [-0.4, 1.0, 0.0], [0.0, 0.0, 1.3]])
    torch.testing.assert_close(a(z, pos), b(z, pos), rtol=1e-5, atol=1e-6)
