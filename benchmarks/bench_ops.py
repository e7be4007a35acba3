"""Side-by-side benchmark of the artifact-confidence loss kernels against the reference.

For each batch size, output size and reduction, every kernel runs forward + backward on the
same inputs, interleaved with the reference in one process; the script reports the median
time and the peak extra memory of each, and the ratios against the reference measured in the
same run (speedup = reference time / kernel time; memory = kernel peak / reference peak).

    python benchmarks/bench_ops.py                      # CPU: reference vs cpp
    python benchmarks/bench_ops.py --device cuda        # GPU: reference vs cuda, triton
    python benchmarks/bench_ops.py --markdown --json bench.json

Peak extra memory is what one forward + backward allocates at its peak above what was live
before it (the same inputs for every kernel; the logits' gradient counts on both sides). On
CUDA it comes from the caching allocator's statistics; on CPU from the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``), with glibc's mmap threshold
pinned so that freed buffers go back to the system (the script re-executes itself with
``MALLOC_MMAP_THRESHOLD_`` set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"

if sys.platform.startswith("linux") and MMAP_ENV not in os.environ:
    # must be set before the process starts: glibc reads it once
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, MMAP_ENV: "65536"})

import torch  # noqa: E402

import dd.ops as ops  # noqa: E402
from dd.errors import DDError  # noqa: E402


def _status_bytes(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field}")
    return int(m.group(1)) * 1024


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated by ``fn()`` at its peak, above what was live before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not sys.platform.startswith("linux"):
        raise SystemExit("CPU peak memory is measured through /proc: Linux only")
    base = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fn()
    return max(_status_bytes("VmHWM") - base, 0)


def time_once(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def make_step(
    kernel: str,
    logits: torch.Tensor,
    size: tuple[int, int],
    reduction: str,
    target: torch.Tensor | None,
) -> Callable[[], None]:
    def step() -> None:
        x = logits.detach().requires_grad_()
        loss = ops.artifact_confidence_loss(x, size, reduction, target, kernel=kernel)
        loss.mean().backward()

    return step


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        m = re.search(r"model name\s*:\s*(.+)", cpuinfo.read_text())
        if m:
            name = m.group(1).strip()
    return f"{name}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = ["reference"]
    for k in args.kernels:
        if k == "reference":
            continue
        try:
            ops.select_kernel(torch.empty(1, 1, 1, 1, device=device), (1, 1), kernel=k)
        except DDError as e:
            print(f"skipping {k}: {e}", file=sys.stderr)
            continue
        kernels.append(k)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batch:
        for side in args.sizes:
            size = (side, side)
            logits = (torch.randn(batch, 1, args.logits, args.logits, generator=gen) * 2).to(device)
            for reduction in args.reductions:
                target = None
                red = reduction
                if reduction == "mse":
                    red = "mean"
                    target = torch.rand(batch, 1, *size, generator=gen).to(device)
                steps = {k: make_step(k, logits, size, red, target) for k in kernels}
                for step in steps.values():  # warm-up: builds, caches, allocator pools
                    step()
                times: dict[str, list[float]] = {k: [] for k in kernels}
                for _ in range(args.repeat):
                    for k in kernels:  # interleaved, so load changes hit every kernel alike
                        times[k].append(time_once(steps[k], device))
                mem = {k: peak_extra_memory(steps[k], device) for k in kernels}
                ref_t = statistics.median(times["reference"])
                for k in kernels:
                    t = statistics.median(times[k])
                    row = {
                        "batch": batch,
                        "logits": args.logits,
                        "out": side,
                        "reduction": reduction,
                        "kernel": k,
                        "ms": round(t * 1e3, 3),
                        "peak_mib": round(mem[k] / 2**20, 2),
                        "speedup": round(ref_t / t, 2),
                        "mem_ratio": round(mem[k] / mem["reference"], 3)
                        if mem["reference"]
                        else None,
                    }
                    rows.append(row)
                    print(
                        f"B={batch} {args.logits}²->{side}² {reduction:8s} {k:9s} "
                        f"{row['ms']:9.2f} ms {row['peak_mib']:8.2f} MiB  "
                        f"x{row['speedup']:<6} mem {row['mem_ratio']}",
                        file=sys.stderr,
                    )
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(device),
        "torch": torch.__version__,
        "device": str(device),
        "repeat": args.repeat,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    """One row per configuration: time and peak memory of every kernel, ratios to the reference."""
    configs: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        configs.setdefault((r["batch"], r["logits"], r["out"], r["reduction"]), {})[r["kernel"]] = r
    kernels = list(next(iter(configs.values()))) if configs else []
    others = [k for k in kernels if k != "reference"]
    head = ["B", "logits → out", "reduction", "reference ms"]
    head += [f"{k} ms (speedup)" for k in others] + ["reference MiB"]
    head += [f"{k} MiB (ratio)" for k in others]
    lines = [
        f"Machine: {result['machine']}; torch {result['torch']}; device {result['device']}; "
        f"fwd+bwd, median of {result['repeat']} interleaved runs; peak extra memory.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for (batch, logits, out, reduction), by_kernel in configs.items():
        ref = by_kernel["reference"]
        cells = [str(batch), f"{logits}² → {out}²", reduction, f"{ref['ms']:.1f}"]
        cells += [f"{by_kernel[k]['ms']:.1f} ({by_kernel[k]['speedup']:.1f}×)" for k in others]
        cells.append(f"{ref['peak_mib']:.1f}")
        for k in others:
            ratio = by_kernel[k]["mem_ratio"]
            shown = f"{ratio:.3f}" if ratio is not None else "-"
            cells.append(f"{by_kernel[k]['peak_mib']:.2f} ({shown})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument(
        "--kernels",
        nargs="+",
        default=["cpp", "cuda", "triton"],
        help="kernels to compare with the reference (unavailable ones are skipped, said so)",
    )
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4, 8])
    p.add_argument("--logits", type=int, default=128, help="logits side h = w")
    p.add_argument("--sizes", nargs="+", type=int, default=[512, 1024], help="output sides")
    p.add_argument(
        "--reductions",
        nargs="+",
        default=["mean", "max", "weighted", "mse"],
        choices=["mean", "max", "sum", "weighted", "mse"],
        help="mse = mean with a target map",
    )
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table on stdout")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.markdown:
        print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
