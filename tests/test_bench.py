"""The op timer of bench/profile_ops.py sees every aten call, the autograd engine's included."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
from profile_ops import OpTimer, shape_classifier  # noqa: E402


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
