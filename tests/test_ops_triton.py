"""The Triton kernels against the PyTorch reference, on CPU through TRITON_INTERPRET=1.

Triton is an optional dependency (the ``gpu`` extra). Where it is missing these tests fail
if the ``test`` extra declares it (the environment is then incomplete) and are skipped, with
the reason in the summary, if it does not.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from importlib import metadata

import pytest
import torch
from helpers import loss_and_grad, make_inputs
from torch.library import opcheck

import dd.ops as ops
from dd.errors import DDError
from dd.ops import dispatch
from dd.ops.reference import artifact_confidence_loss_reference as reference


def _declared_in_test_extra() -> bool:
    try:
        requires = metadata.requires("dd-doctor") or []
    except metadata.PackageNotFoundError:
        return False
    return any(
        re.match(r"triton\b", r) and re.search(r"extra\s*==\s*['\"]test['\"]", r) for r in requires
    )


if importlib.util.find_spec("triton") is None:
    if _declared_in_test_extra():
        pytest.fail(
            "triton is declared in the test extra but not installed: "
            "pip install -e '.[test]' (triton runs on CPU here with TRITON_INTERPRET=1)",
            pytrace=False,
        )
    pytest.skip(
        "triton is not installed (optional; pip install triton to test the Triton kernels "
        "on CPU through its interpreter)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Import the kernels with Triton's CPU interpreter on; keep it on for this module."""
    old = os.environ.get("TRITON_INTERPRET")
    if "dd.ops.triton_kernels" in sys.modules and old != "1":
        pytest.fail(
            "dd.ops.triton_kernels was imported before TRITON_INTERPRET=1 was set: "
            "its kernels are compiled for a GPU",
            pytrace=False,
        )
    os.environ["TRITON_INTERPRET"] = "1"
    from dd.ops import triton_kernels

    assert triton_kernels.interpreting()
    yield triton_kernels
    if old is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = old


@pytest.fixture(autouse=True)
def _no_kernel_override(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


SHAPES = [
    ((2, 1, 7, 5), (37, 29)),  # upsampling, odd sizes
    ((2, 1, 1, 1), (3, 4)),  # a single logit
    ((1, 1, 16, 12), (8, 5)),  # downsampling
    ((1, 1, 9, 9), (9, 9)),  # equal sizes
]


@pytest.mark.parametrize("reduction", ops.REDUCTIONS)
@pytest.mark.parametrize("variant", ["", "tw"])
@pytest.mark.parametrize(("shape", "size"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_triton_matches_reference(dtype, shape, size, reduction, variant):
    x, t, w = make_inputs(shape, size, dtype, variant)
    loss, grad = loss_and_grad(ops.artifact_confidence_loss, x, size, reduction, t, w, "triton")
    ref_loss, ref_grad = loss_and_grad(reference, x, size, reduction, t, w)
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss, ref_loss, rtol=tol, atol=tol * 1e-2)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=tol * scale + 1e-12)


def test_triton_max_ties_go_to_the_first_pixel():
    x = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    loss, grad = loss_and_grad(
        ops.artifact_confidence_loss, x, (16, 16), "max", None, None, "triton"
    )
    ref_loss, ref_grad = loss_and_grad(reference, x, (16, 16), "max", None, None)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_triton_gradcheck_fp64():
    x, t, _ = make_inputs((1, 1, 2, 3), (4, 5), torch.float64, "t", seed=5)
    x.requires_grad_()

    def fn(x):
        return ops.artifact_confidence_loss(x, (4, 5), "mean", t, kernel="triton")

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


def test_triton_opcheck():
    x, t, w = make_inputs((2, 1, 5, 4), (11, 9), torch.float64, "tw")
    args = (x.requires_grad_(), [11, 9], "weighted", t, w, 0.2, "triton")
    opcheck(torch.ops.dd.artifact_confidence_loss.default, args)


def test_triton_refuses_sizes_beyond_its_32_bit_pixel_index(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(DDError, match="32-bit pixel index"):
        ops.artifact_confidence_loss(torch.zeros(1, 1, 2, 2), (50_000, 50_000))


def test_triton_is_never_the_automatic_choice_on_cpu():
    """Interpreted Triton is for tests: the automatic choice on CPU stays the C++ op or
    the reference."""
    assert ops.select_kernel(torch.zeros(1, 1, 2, 2), (4, 4)) in ("cpp", "reference")
