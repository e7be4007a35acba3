"""The C++ CPU op against the PyTorch reference, its torch.library registration, the dispatch
registry and the build.

The native op is built here through the same first-use path users get (cached under
~/.cache/dd/torch_extensions, keyed by a hash of the sources, so only the first run
compiles). A machine without a C++ compiler fails these tests with the reason.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import loss_and_grad, make_inputs
from torch.library import opcheck

import dd.ops as ops
from dd.errors import DDError
from dd.ops import build, dispatch
from dd.ops.reference import artifact_confidence_loss_reference as reference

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def native():
    """Build (first run) or load (later runs) the native op, as a user's first call does."""
    return build.require_native()


@pytest.fixture(autouse=True)
def _no_kernel_override(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


SHAPES = [
    ((1, 1, 7, 5), (517, 389)),  # tiny to large, odd sizes
    ((3, 1, 128, 128), (517, 389)),
    ((2, 1, 1, 1), (5, 3)),  # a single logit per image
    ((2, 1, 33, 17), (33, 17)),  # equal sizes: a copy
    ((2, 1, 64, 48), (31, 20)),  # downsampling
    ((1, 1, 5, 40), (80, 9)),  # up in one axis, down in the other
]
VARIANTS = ["", "t", "tw", "w"]


def every_case(test):
    """Parametrise ``test`` over every reduction, target/weight variant and shape."""
    for mark in (
        pytest.mark.parametrize(("shape", "size"), SHAPES),
        pytest.mark.parametrize("variant", VARIANTS),
        pytest.mark.parametrize("reduction", ops.REDUCTIONS),
    ):
        test = mark(test)
    return test


@every_case
def test_cpp_matches_reference_fp64(shape, size, reduction, variant):
    x, t, w = make_inputs(shape, size, torch.float64, variant)
    loss, grad = loss_and_grad(ops.artifact_confidence_loss, x, size, reduction, t, w, "cpp")
    ref_loss, ref_grad = loss_and_grad(reference, x, size, reduction, t, w)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-11, atol=1e-13)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-11 * ref_grad.abs().max().item())


@every_case
def test_cpp_matches_reference_fp32(shape, size, reduction, variant):
    """fp32: close to the fp32 reference, and at least as close to the fp64 truth."""
    x, t, w = make_inputs(shape, size, torch.float32, variant)
    loss, grad = loss_and_grad(ops.artifact_confidence_loss, x, size, reduction, t, w, "cpp")
    ref_loss, ref_grad = loss_and_grad(reference, x, size, reduction, t, w)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-4 * scale + 1e-12)
    d = [None if v is None else v.double() for v in (t, w)]
    true_loss, true_grad = loss_and_grad(reference, x.double(), size, reduction, *d)
    err = (grad.double() - true_grad).abs().max().item()
    ref_err = (ref_grad.double() - true_grad).abs().max().item()
    assert err <= max(2 * ref_err, 1e-6 * true_grad.abs().max().item(), 1e-12)
    loss_err = (loss.double() - true_loss).abs().max().item()
    ref_loss_err = (ref_loss.double() - true_loss).abs().max().item()
    assert loss_err <= max(2 * ref_loss_err, 1e-6 * true_loss.abs().max().item(), 1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "max", "weighted"])
def test_cpp_half_inputs_accumulate_in_fp32(dtype, reduction):
    """bf16/fp16 logits: the op computes in fp32, so it matches the fp32 reference on the
    same values to the output dtype's precision."""
    size = (97, 61)
    x, t, _ = make_inputs((2, 1, 16, 12), size, dtype, "t")
    loss, grad = loss_and_grad(ops.artifact_confidence_loss, x, size, reduction, t, None, "cpp")
    assert loss.dtype == dtype and grad.dtype == dtype
    ref_loss, ref_grad = loss_and_grad(reference, x.float(), size, reduction, t.float(), None)
    torch.testing.assert_close(loss.float(), ref_loss, rtol=1e-2, atol=1e-4)
    scale = ref_grad.abs().max().item()
    torch.testing.assert_close(grad.float(), ref_grad, rtol=2e-2, atol=1e-2 * scale)


GRADCHECK = [((2, 1, 4, 3), (7, 5)), ((1, 1, 6, 5), (3, 2)), ((1, 1, 1, 2), (3, 3))]


@pytest.mark.parametrize("reduction", ops.REDUCTIONS)
@pytest.mark.parametrize("variant", ["", "tw"])
@pytest.mark.parametrize(("shape", "size"), GRADCHECK)
def test_cpp_gradcheck_fp64(shape, size, reduction, variant):
    x, t, w = make_inputs(shape, size, torch.float64, variant, seed=3)
    x.requires_grad_()

    def fn(x):
        return ops.artifact_confidence_loss(x, size, reduction, t, 0.3, w, kernel="cpp")

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    ("reduction", "variant", "dtype"),
    [("mean", "", torch.float32), ("max", "tw", torch.float64), ("weighted", "w", torch.float64)],
)
def test_opcheck(reduction, variant, dtype):
    size = (11, 9)
    x, t, w = make_inputs((2, 1, 5, 4), size, dtype, variant)
    args = (x.requires_grad_(), [11, 9], reduction, t, w, 0.2, "cpp")
    opcheck(torch.ops.dd.artifact_confidence_loss.default, args)
    loss, aux = torch.ops.dd.artifact_confidence_loss(*args)
    grad = torch.ones_like(loss)
    opcheck(
        torch.ops.dd.artifact_confidence_loss_backward.default,
        (grad, x.detach(), aux, [11, 9], reduction, t, w, 0.2, "cpp"),
    )


def test_torch_compile_fullgraph_keeps_the_fused_op():
    size = (40, 30)
    x, t, _ = make_inputs((2, 1, 8, 6), size, torch.float32, "t")
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def fn(x):
        return ops.artifact_confidence_loss(x, size, "weighted", t).mean()

    for backend in (capture, "aot_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(fn, backend=backend, fullgraph=True)
        xc = x.clone().requires_grad_()
        out = compiled(xc)
        out.backward()
        xe = x.clone().requires_grad_()
        fn(xe).backward()
        torch.testing.assert_close(out, fn(x))
        torch.testing.assert_close(xc.grad, xe.grad)
    assert "dd.artifact_confidence_loss" in graphs[0]


def test_results_do_not_depend_on_thread_count():
    size = (300, 257)
    x, t, _ = make_inputs((2, 1, 32, 32), size, torch.float32, "t")
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(loss_and_grad(ops.artifact_confidence_loss, x, size, "mean", t, None))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_max_ties_go_to_the_first_pixel_like_the_reference():
    """Constant logits: every pixel ties; the gradient goes to the first pixel's taps."""
    x = torch.zeros(2, 1, 4, 4, dtype=torch.float64)
    loss, grad = loss_and_grad(ops.artifact_confidence_loss, x, (16, 16), "max", None, None)
    ref_loss, ref_grad = loss_and_grad(reference, x, (16, 16), "max", None, None)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert grad[0, 0, 0, 0] > 0 and grad[0].count_nonzero() == 1


def test_weighted_with_no_pixel_over_threshold_is_zero():
    x = torch.full((1, 1, 3, 3), -8.0, dtype=torch.float64)
    loss, grad = loss_and_grad(ops.artifact_confidence_loss, x, (9, 9), "weighted", None, None)
    assert loss.item() == 0.0 and grad.count_nonzero() == 0
    ref_loss, _ = loss_and_grad(reference, x, (9, 9), "weighted", None, None)
    assert ref_loss.item() == 0.0


def test_weighted_gradient_treats_the_mask_as_constant():
    """d loss / d p_i = mask_i / count: the reference's autograd with a constant mask."""
    x, _, _ = make_inputs((1, 1, 6, 6), (12, 12), torch.float64, "")
    up = torch.nn.functional.interpolate(x, size=(12, 12), mode="bilinear", align_corners=False)
    p = torch.sigmoid(up).requires_grad_()
    mask = (p > 0.1).double()
    ((p * mask).sum() / mask.sum()).backward()
    torch.testing.assert_close(p.grad, mask / mask.sum())
    loss = ops.artifact_confidence_loss(x, (12, 12), "weighted")
    torch.testing.assert_close(loss, ((p * mask).sum() / mask.sum()).reshape(1))


def test_auto_choice_on_cpu_is_the_cpp_op():
    x = torch.zeros(1, 1, 2, 2)
    assert ops.select_kernel(x, (4, 4)) == "cpp"


def test_env_override_picks_the_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    x = torch.zeros(1, 1, 2, 2)
    assert ops.select_kernel(x, (4, 4)) == "reference"
    assert ops.select_kernel(x, (4, 4), kernel="cpp") == "cpp"  # the argument wins


def test_unknown_kernel_name_is_an_error(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(DDError, match="unknown kernel 'fast'"):
        ops.artifact_confidence_loss(torch.zeros(1, 1, 2, 2), (4, 4))


def test_explicit_cuda_on_this_machine_names_the_problem(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "cuda")
    with pytest.raises(DDError, match="cuda kernel") as e:
        ops.artifact_confidence_loss(torch.zeros(1, 1, 2, 2), (4, 4))
    assert e.value.hint


def _unbuilt_cpp(monkeypatch):
    why = "the C++ op is not built: no C++ compiler (c++) on PATH"
    kernel = dataclasses.replace(dispatch.REGISTRY["cpp"], unavailable=lambda build_now: why)
    monkeypatch.setitem(dispatch.REGISTRY, "cpp", kernel)
    monkeypatch.setattr(dispatch, "_logged", set())


def test_unavailable_auto_choice_falls_back_with_one_debug_line(monkeypatch, caplog):
    _unbuilt_cpp(monkeypatch)
    x, t, _ = make_inputs((1, 1, 4, 4), (9, 9), torch.float64, "t")
    with caplog.at_level(logging.DEBUG, logger="dd.ops"):
        first = ops.artifact_confidence_loss(x, (9, 9), "mean", t)
        ops.artifact_confidence_loss(x, (9, 9), "mean", t)
    lines = [r.getMessage() for r in caplog.records if r.name == "dd.ops"]
    assert len(lines) == 1 and "cpp kernel not used" in lines[0] and "not built" in lines[0]
    torch.testing.assert_close(first, reference(x, (9, 9), "mean", t))


def test_unavailable_explicit_choice_names_the_fix(monkeypatch):
    _unbuilt_cpp(monkeypatch)
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    with pytest.raises(DDError, match="not built") as e:
        ops.artifact_confidence_loss(torch.zeros(1, 1, 2, 2), (4, 4))
    assert "DD_BUILD_EXT=1" in e.value.hint


def test_target_requiring_grad_uses_the_reference_or_fails_explicitly(monkeypatch):
    x, t, _ = make_inputs((1, 1, 4, 4), (9, 9), torch.float64, "t")
    t.requires_grad_()
    assert ops.select_kernel(x, (9, 9), t) == "reference"
    ops.artifact_confidence_loss(x, (9, 9), "mean", t).sum().backward()
    assert t.grad is not None and t.grad.abs().sum() > 0
    monkeypatch.setenv(dispatch.ENV_VAR, "cpp")
    with pytest.raises(DDError, match="target requires grad"):
        ops.artifact_confidence_loss(x, (9, 9), "mean", t)


@pytest.mark.parametrize(
    ("shape", "size", "reduction", "message"),
    [
        ((1, 2, 4, 4), (8, 8), "mean", "B x 1 x h x w"),
        ((1, 1, 4, 4), (0, 8), "mean", "out_size"),
        ((1, 1, 4, 4), (8, 8), "median", "unknown reduction"),
    ],
)
def test_bad_arguments_are_dd_errors(shape, size, reduction, message):
    with pytest.raises(DDError, match=message):
        ops.artifact_confidence_loss(torch.zeros(shape), size, reduction)


def test_target_of_the_wrong_size_is_a_dd_error():
    with pytest.raises(DDError, match="target must be"):
        ops.artifact_confidence_loss(
            torch.zeros(1, 1, 4, 4), (8, 8), target=torch.zeros(1, 1, 4, 4)
        )


def test_build_is_cached_and_keyed_by_the_sources(native, monkeypatch):
    assert native.loaded and native.origin in ("prebuilt", "cached", "compiled")
    assert torch.ops.dd_native.build_info() == build.source_hash()
    assert build.load_native() is native  # loads once per process
    assert build.native_status() == (True, None)
    if native.origin != "prebuilt":
        assert native.path.parent == build.build_dir(False)
        assert native.path.parent.parent == build.cache_root()
    key = build.build_key(False)
    monkeypatch.setattr(build, "source_hash", lambda: "0" * 16)
    assert build.build_key(False) != key


def test_without_a_compiler_the_op_is_unavailable_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(build, "_state", build.NativeState())
    monkeypatch.setattr(build, "prebuilt_path", lambda: None)
    monkeypatch.setenv("DD_EXT_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "dd-no-such-compiler")
    ok, why = build.native_status()
    assert not ok and "no C++ compiler (dd-no-such-compiler)" in why
    state = build.load_native()
    assert not state.loaded and "not built" in state.error
    with pytest.raises(DDError) as e:
        build.require_native()
    assert "DD_BUILD_EXT=1 pip install --no-build-isolation -e ." in e.value.hint
    assert not list(tmp_path.iterdir())  # nothing was attempted


def test_setup_py_hook_describes_the_extension():
    kwargs = build.setup_extensions()
    (ext,) = kwargs["ext_modules"]
    assert ext.name == "dd.ops._native"
    assert all((REPO / s).is_file() for s in ext.sources)
    assert "build_ext" in kwargs["cmdclass"]
    flags = ext.extra_compile_args["cxx"] if isinstance(ext.extra_compile_args, dict) else []
    assert f"-DDD_NATIVE_SOURCE_HASH={build.source_hash()}" in flags


def test_kernel_status_rows_come_from_the_registry():
    from dd.ops.kernels import kernel_status

    rows = {r["name"]: r for r in kernel_status()}
    assert rows["cpp (csrc, CPU)"]["available"] is True
    assert rows["cpp (csrc, CPU)"]["default_on"] == ["cpu"]
    assert rows["reference (PyTorch)"]["available"] is True
    if not torch.cuda.is_available():
        assert rows["cuda (csrc)"]["available"] is False
        assert "CUDA" in rows["cuda (csrc)"]["reason"]


def test_benchmark_runs_and_the_op_is_leaner(tmp_path):
    """`dd bench kernels` end to end (its own process) at one size; the fused op's peak extra
    memory is a fraction of the reference's (it never stores the full-resolution map)."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "dd", "bench", "kernels", "--device", "cpu", "--batch", "2"]
    cmd += ["--sizes", "512", "--reductions", "mean,mse", "--repeat", "1"]
    cmd += ["--kernels", "cpp", "--threads", "1", "--json", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    result = json.loads(out.read_text())
    rows = {(r["reduction"], r["kernel"]): r for r in result["rows"]}
    for red in ("mean", "mse"):
        assert rows[(red, "reference")]["peak_mib"] > 4  # at least the 2 x 512² fp32 map
        assert rows[(red, "cpp")]["mem_ratio"] < 0.25
