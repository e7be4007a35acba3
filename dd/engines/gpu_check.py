"""``dd bench gpu``: everything dd has not yet run on a GPU, in one command within a budget.

A GPU is often lent for minutes, so the checks run in order of value and each is given only
what is left of ``budget_s``:

1. ``kernels``: the fused-loss CUDA and Triton kernels against the PyTorch reference (loss
   and gradient, several shapes including odd ones, fp32/bf16/fp16, every reduction, with a
   target and a weight map), then their time and memory beside the reference
   (:func:`dd.engines.bench.bench_kernels`).
2. ``pipelines``: ``dd treat``, ``dd detect``, ``dd refine`` and ``dd generate`` one step each
   on the tiny pipelines in bf16 and fp16 on CUDA, and ``dd treat`` with each ``--quantize``
   mode, through the real command line.
3. ``flux-dev``: one treat step of FLUX.1-dev at full size (random weights, 1024², K = 1 and
   K = all, checkpointed) in bf16 and with each quantisation: peak memory, step time and the
   fraction of the bf16 FLOP bound (counted FLOPs, recomputation included, / (step time x
   peak)); target >= 40 % for bf16, K = 1.
4. ``detect-b5``: ``dd bench detect``'s comparison with MiT-b5 (dd's loop against the
   released one).

Each check runs in its own process (``python -m dd.engines.gpu_check ITEM DIR``) with a
timeout of the budget left, so a crash, an out-of-memory or a hang of one check cannot stop
the others; a check that would not fit in what is left (its ``estimate_s`` on an H100-class
GPU) is skipped and says so. Without a CUDA GPU every check is skipped with that reason. The
results go to ``OUT/gpu-check.json`` and ``OUT/gpu-check.md`` (a table a person reads, and
each check's own figures), one line per check is printed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CHECKS", "Check", "gpu_markdown", "no_gpu_reason", "run_gpu_check"]

#: Verdicts of a check.
PASS, FAIL, SKIP = "pass", "fail", "skip"


@dataclass(frozen=True)
class Check:
    """One item of ``dd bench gpu``."""

    name: str
    title: str
    #: Expected seconds on an H100-class GPU, model loading included (budget planning).
    estimate_s: float


#: The checks, in order of value.
CHECKS = (
    Check("kernels", "fused-loss CUDA/Triton kernels vs the reference", 60),
    Check(
        "pipelines", "treat/detect/refine/generate on tiny pipelines, bf16/fp16, --quantize", 120
    ),
    Check("flux-dev", "FLUX.1-dev treat step at 1024², bf16 and quantised", 240),
    Check("detect-b5", "dd bench detect with MiT-b5 vs the released loop", 60),
)


def no_gpu_reason() -> str | None:
    """Why the checks cannot run here (None when a CUDA GPU is usable)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False)"
    return None


#: ``runner(check, out_dir, timeout_s) -> result dict``; the default runs the check's process.
Runner = Callable[[Check, Path, float], dict[str, Any]]


def _subprocess_runner(check: Check, out_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Run ``check`` in its own process; a crash or a timeout is a failed check."""
    result_file = out_dir / f"{check.name}.json"
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "dd.engines.gpu_check", check.name, str(out_dir)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"verdict": FAIL, "summary": f"timed out after {timeout_s:.0f} s (budget left)"}
    if result_file.is_file():
        return json.loads(result_file.read_text())
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"verdict": FAIL, "summary": f"exit {proc.returncode}: {' | '.join(tail)[-300:]}"}


def run_gpu_check(
    out: Path,
    *,
    budget_s: float = 480.0,
    checks: tuple[Check, ...] = CHECKS,
    runner: Runner | None = None,
    clock: Callable[[], float] = time.monotonic,
    gpu_missing: str | None | bool = True,
    reporter: Any = None,
) -> dict[str, Any]:
    """Run ``checks`` in order within ``budget_s`` (see the module docstring) and write
    ``out/gpu-check.json`` and ``out/gpu-check.md``. ``gpu_missing``: True to ask
    :func:`no_gpu_reason`, else the reason (or None: tests drive the budget logic with a
    fake ``runner`` and ``clock``)."""
    from dd.runtime.io import atomic_write_json, atomic_write_text
    from dd.runtime.progress import as_reporter

    rep = as_reporter(reporter)
    missing = no_gpu_reason() if gpu_missing is True else gpu_missing
    runner = runner or _subprocess_runner
    out = Path(out)
    items_dir = out / "items"
    items_dir.mkdir(parents=True, exist_ok=True)
    start = clock()
    results = []
    for check in checks:
        left = budget_s - (clock() - start)
        t0 = clock()
        if missing:
            res = {"verdict": SKIP, "summary": missing}
        elif left < check.estimate_s:
            res = {
                "verdict": SKIP,
                "summary": f"budget: needs ~{check.estimate_s:.0f} s, {max(left, 0):.0f} s left "
                "(raise --budget-s)",
            }
        else:
            try:
                res = runner(check, items_dir, left)
            except Exception as e:  # never stop at the first failure
                res = {"verdict": FAIL, "summary": f"{type(e).__name__}: {e}"[:300]}
        res = {"name": check.name, "title": check.title, "seconds": clock() - t0, **res}
        results.append(res)
        rep.message(f"{res['verdict'].upper():4} {check.name}: {res['summary']}")
    report = {
        "budget_s": budget_s,
        "seconds": clock() - start,
        "gpu": _gpu_name(),
        "checks": results,
    }
    atomic_write_json(out / "gpu-check.json", report)
    atomic_write_text(out / "gpu-check.md", gpu_markdown(report))
    return report


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def gpu_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: one row per check, then each check's own table."""
    lines = [
        "# dd bench gpu",
        "",
        f"GPU: {report.get('gpu') or 'none'}; budget {report['budget_s']:.0f} s, used "
        f"{report['seconds']:.0f} s.",
        "",
        "| check | verdict | seconds | summary |",
        "| --- | --- | --- | --- |",
    ]
    for c in report["checks"]:
        summary = str(c["summary"]).replace("|", "/")
        lines.append(f"| {c['name']} | {c['verdict']} | {c['seconds']:.0f} | {summary} |")
    for c in report["checks"]:
        rows = c.get("rows") or []
        if not rows:
            continue
        cols = list(rows[0])
        lines += ["", f"## {c['name']}: {c['title']}", ""]
        lines.append("| " + " | ".join(cols) + " |")
        lines.append("| " + " | ".join("---" for _ in cols) + " |")
        for r in rows:
            lines.append("| " + " | ".join(_cell(r.get(k)) for k in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v).replace("|", "/")


# ------------------------------------------------------------------------------------------
# The checks (each in its own process, on CUDA)
# ------------------------------------------------------------------------------------------
#: Largest error of the fused op against the fp64 reference, relative to the loss scale.
KERNEL_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 5e-3}


def check_kernels(
    device: str = "cuda",
    kernels: tuple[str, ...] = ("cuda", "triton"),
    dtypes: tuple[str, ...] = ("float32", "bfloat16", "float16"),
    timing: bool = True,
) -> dict[str, Any]:
    """Loss and gradient of each usable kernel against the fp64 reference, then their
    timing. (Tests run the comparison with the CPU kernel: ``device="cpu", kernels=("cpp",)``.)"""
    import torch

    from dd.engines.bench import bench_kernels
    from dd.ops import REDUCTIONS, artifact_confidence_loss, kernel_rows
    from dd.ops.reference import artifact_confidence_loss_reference

    dev = torch.device(device)
    usable = {r["name"].split()[0]: r for r in kernel_rows()}  # "cuda (csrc)" -> "cuda"
    kernels = tuple(k for k in kernels if usable.get(k, {}).get("available"))
    rows, failed = [], 0
    shapes = [((1, 1, 32, 32), (512, 512)), ((4, 1, 128, 128), (1024, 1024)),
              ((3, 1, 37, 53), (301, 451))]  # fmt: skip
    for kernel in kernels:
        for dtype in (getattr(torch, d) for d in dtypes):
            worst_loss = worst_grad = 0.0
            for shape, size in shapes:
                g = torch.Generator(device="cpu").manual_seed(0)
                x64 = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dev)
                full = (shape[0], 1, *size)
                t = torch.rand(full, generator=g, dtype=torch.float64).to(dev)
                w = torch.rand(full, generator=g, dtype=torch.float64).to(dev)
                for reduction in REDUCTIONS:
                    for target, weight in ((None, None), (t, w)):
                        ref_x = x64.clone().requires_grad_()
                        ref = artifact_confidence_loss_reference(
                            ref_x, size, reduction, target, 0.1, weight
                        )
                        (ref_grad,) = torch.autograd.grad(ref.sum(), ref_x)
                        x = x64.to(dtype).clone().requires_grad_()
                        got = artifact_confidence_loss(
                            x, size, reduction, None if target is None else target.to(dtype),
                            0.1, None if weight is None else weight.to(dtype), kernel=kernel,
                        )  # fmt: skip
                        (grad,) = torch.autograd.grad(got.float().sum(), x)
                        ref, got = ref.detach(), got.detach()
                        scale = float(ref.abs().max()) + 1e-12
                        worst_loss = max(
                            worst_loss, float((got.double() - ref).abs().max()) / scale
                        )
                        gscale = float(ref_grad.abs().max()) + 1e-12
                        worst_grad = max(
                            worst_grad, float((grad.double() - ref_grad).abs().max()) / gscale
                        )
            tol = KERNEL_TOLERANCE[str(dtype).removeprefix("torch.")]
            ok = worst_loss <= tol and worst_grad <= tol
            failed += not ok
            rows.append({"kernel": kernel, "dtype": str(dtype).removeprefix("torch."),
                         "loss rel. error": worst_loss, "grad rel. error": worst_grad,
                         "tolerance": tol, "ok": ok})  # fmt: skip
    if not kernels:
        return {"verdict": FAIL, "summary": "neither the CUDA nor the Triton kernel is usable"}
    times = None
    if timing:
        times = bench_kernels(device=dev, kernels=kernels, batches=(1, 8), sizes=(1024,), repeat=3)
    return {
        "verdict": PASS if not failed else FAIL,
        "summary": f"{len(rows) - failed}/{len(rows)} kernel x dtype match the reference",
        "rows": rows,
        "timing": times,
    }


def _tiny_assets(tmp: Path) -> dict[str, Path]:
    """A tiny FLUX pipeline, a tiny detector, prompts and two images in ``tmp``."""
    import numpy as np
    from PIL import Image

    from dd.api.plugins import get_host
    from dd.testing.tiny import build_tiny

    flux = build_tiny("flux", tmp / "flux")
    det = get_host().detectors.get("segformer").load(None, variant="tiny", input_size=64)
    det_dir = Path(det.save_pretrained(tmp / "det"))
    (tmp / "prompts.txt").write_text("a red cat\na hand\n")
    (tmp / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(
            tmp / "images" / f"{i}.png"
        )
    return {"flux": flux, "det": det_dir, "prompts": tmp / "prompts.txt", "images": tmp / "images"}


def check_pipelines(
    device: str = "cuda", dtypes: tuple[str, ...] = ("bf16", "fp16"), quantize: bool = True
) -> dict[str, Any]:
    """Every command one step on CUDA in bf16 and fp16 through the real CLI, and treat with
    each quantisation mode. (Tests run the same command lines on the CPU in fp32.)"""
    from dd.ops.quantize import QUANTIZE_MODES

    rows = []
    with tempfile.TemporaryDirectory(prefix="dd-gpu-") as tmpdir:
        tmp = Path(tmpdir)
        a = _tiny_assets(tmp)
        flux = ["--backbone", "flux", "--model", a["flux"], "-B", "max_sequence_length=32",
                "--device", device]  # fmt: skip
        det = ["--weights", a["det"], "-O", "input_size=64"]
        runs: list[tuple[str, list[Any]]] = []
        for dtype in dtypes:
            runs += [
                (f"treat {dtype}", ["treat", *flux, *det, "--dtype", dtype, "--prompts",
                 a["prompts"], "--eval-prompts", a["prompts"], "--resolution", "64", "--steps",
                 "2", "--train-steps", "1", "--eval-every", "1", "--eval-seeds", "1"]),
                (f"detect {dtype}", ["detect", a["images"], *det, "--device", device,
                 "--dtype", dtype]),
                (f"refine {dtype}", ["refine", a["images"], *flux, "--detector-weights",
                 a["det"], "-O", "input_size=64", "--dtype", dtype, "--late-steps", "500-1000",
                 "--steps", "2", "--prompt", "a cat"]),
                (f"generate {dtype}", ["generate", *flux, "--dtype", dtype, "--prompts",
                 a["prompts"], "--seeds", "1", "--resolution", "64", "--steps", "2"]),
            ]  # fmt: skip
        for mode in QUANTIZE_MODES if quantize else ():
            if mode != "none":
                runs.append((f"treat --quantize {mode}", ["treat", *flux, *det, "--dtype",
                             "bf16", "--quantize", mode, "--prompts", a["prompts"],
                             "--eval-prompts", a["prompts"], "--resolution", "64", "--steps",
                             "2", "--train-steps", "1", "--eval-every", "1", "--eval-seeds",
                             "1"]))  # fmt: skip
        for k, (name, argv) in enumerate(runs):  # the real command line, as a user runs it
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "dd", *map(str, argv), "--out", str(tmp / f"o{k}")]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                code, text = proc.returncode, proc.stdout + proc.stderr
            except subprocess.TimeoutExpired:
                code, text = -1, "timed out after 600 s"
            last = (text.strip().splitlines() or [""])[-1][:160]
            rows.append({"run": name, "exit": code, "seconds": time.perf_counter() - t0,
                         "last line": last})  # fmt: skip
    failed = [r["run"] for r in rows if r["exit"] != 0]
    return {
        "verdict": PASS if not failed else FAIL,
        "summary": f"{len(rows) - len(failed)}/{len(rows)} runs exit 0"
        + (f"; failed: {', '.join(failed)}" if failed else ""),
        "rows": rows,
    }


#: The bf16 FLUX.1-dev treat step, K = 1, checkpointed, should reach this share of the bound.
FLOP_TARGET = 0.40


def check_flux_dev() -> dict[str, Any]:
    """One FLUX.1-dev treat step at 1024² per quantisation (bf16 first), K = 1 and K = all,
    checkpointed: peak memory, time, fraction of the bf16 FLOP bound."""
    import gc

    import torch

    from dd.engines.bench import bench_treat, full_size_flux_setup, peak_tflops_for
    from dd.ops.quantize import QUANTIZE_MODES

    dev = torch.device("cuda")
    peak = peak_tflops_for(torch.cuda.get_device_name(0), torch.bfloat16)
    rows, errors = [], []
    for mode in QUANTIZE_MODES:
        try:
            setup = full_size_flux_setup(device=dev, dtype=torch.bfloat16, steps=10, quantize=mode)
            res = bench_treat(
                setup,
                resolutions=[1024],
                grad_steps=[1, setup.steps],
                modes=["checkpointed"],
                repeat=2,
                flops=True,
                peak_tflops=peak,
            )
            for r in res["rows"]:
                keys = ("grad_steps", "status", "ms", "peak_mib", "total_peak_mib",
                        "tflops_per_s", "flop_fraction")  # fmt: skip
                rows.append({"quantize": mode, **{k: r.get(k) for k in keys}})
        except Exception as e:  # the next mode still runs
            errors.append(f"{mode}: {type(e).__name__}: {str(e)[:120]}")
        finally:
            setup = None
            gc.collect()
            torch.cuda.empty_cache()
    k1 = [r for r in rows if r["quantize"] == "none" and r.get("grad_steps") == 1]
    frac = k1[0].get("flop_fraction") if k1 else None
    met = frac is not None and frac >= FLOP_TARGET
    summary = (f"bf16 K=1 at {frac:.0%} of the FLOP bound (target {FLOP_TARGET:.0%})"
               if frac is not None else "no bf16 K=1 figure")  # fmt: skip
    if errors:
        summary += "; " + "; ".join(errors)
    return {"verdict": PASS if met and not errors else FAIL, "summary": summary, "rows": rows}


def check_detect_b5() -> dict[str, Any]:
    """``dd bench detect`` with a random MiT-b5 at 512 on 32 images of 1024²."""
    from dd.api.plugins import get_host
    from dd.engines.bench import bench_detect

    det = get_host().detectors.get("segformer").load(None, variant="b5", input_size=512,
                                                      device="cuda")  # fmt: skip
    res = bench_detect(det, images=32, size=1024, repeat=2)
    rows = res.get("rows") or []
    speedup = res.get("speedup")
    return {
        "verdict": PASS,
        "summary": f"dd's loop {speedup:.2f}x the released one" if speedup else "measured",
        "rows": rows,
    }


ITEMS: dict[str, Callable[[], dict[str, Any]]] = {
    "kernels": check_kernels,
    "pipelines": check_pipelines,
    "flux-dev": check_flux_dev,
    "detect-b5": check_detect_b5,
}


def _main(argv: list[str]) -> int:
    """``python -m dd.engines.gpu_check ITEM DIR``: run one check, write ``DIR/ITEM.json``."""
    from dd.runtime.io import atomic_write_json

    name, out_dir = argv[0], Path(argv[1])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        res = ITEMS[name]()
    except Exception as e:
        res = {"verdict": FAIL, "summary": f"{type(e).__name__}: {str(e)[:200]}",
               "traceback": traceback.format_exc()[-4000:]}  # fmt: skip
    atomic_write_json(out_dir / f"{name}.json", _json_safe(res))
    return 0


def _json_safe(obj: Any) -> Any:
    import math

    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
