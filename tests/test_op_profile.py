"""benchmarks/op_profile.py: the by-kind operator profile behind the speed reports' "convolution floor"."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import REPO_ROOT


@pytest.fixture(scope="module")
def op_profile_module():
    spec = importlib.util.spec_from_file_location("op_profile", REPO_ROOT / "benchmarks" / "op_profile.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("aten::mkldnn_convolution", "convolution"),
        ("aten::convolution_backward", "convolution"),
        ("aten::slow_conv_transpose2d", "convolution"),
        ("aten::addmm", "matmul"),
        ("aten::mm", "matmul"),
        ("aten::native_batch_norm_backward", "normalisation"),
        ("aten::reflection_pad2d", "padding"),
        ("aten::_to_copy", "copies and dtype casts"),
        ("aten::_foreach_addcdiv_", "optimizer"),
        ("aten::mul", "element-wise and other"),
        ("aten::mean", "element-wise and other"),
    ],
)
def test_operators_fall_into_their_kind(op_profile_module, name: str, kind: str) -> None:
    assert op_profile_module.kind_of(name) == kind


def test_profile_of_a_training_step_adds_up(op_profile_module) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU())
    optimizer = torch.optim.Adam(net.parameters())
    x = torch.randn(2, 3, 64, 64)

    def step() -> None:
        optimizer.zero_grad()
        net(x).square().mean().backward()
        optimizer.step()

    step()
    kinds, ops = op_profile_module.op_profile(step, reps=2)
    assert set(kinds) == {k for k, _ in op_profile_module.KINDS} | {op_profile_module.OTHER, "total"}
    assert kinds["convolution"] > 0 and kinds["normalisation"] > 0 and kinds["optimizer"] > 0
    assert kinds["matmul"] == 0 and kinds["padding"] == 0
    assert kinds["total"] == pytest.approx(sum(v for k, v in kinds.items() if k != "total"))
    assert all(name.startswith("aten::") for name, _, _ in ops)
    assert [s for _, s, _ in ops] == sorted((s for _, s, _ in ops), reverse=True)
    # Two profiled calls, reported per call: one forward convolution per call.
    assert dict((name, calls) for name, _, calls in ops).get("aten::convolution") == 1
    rows = op_profile_module.format_kinds({"a": kinds})
    assert len(rows) == len(op_profile_module.KINDS) + 3 and "100%" in rows[-1]
