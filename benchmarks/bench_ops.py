"""The kernels benchmark as a script: a thin wrapper of ``dd bench kernels`` (same code,
:func:`dd.bench.bench_kernels`), kept for the option style of earlier runs.

    python benchmarks/bench_ops.py                      # CPU: reference vs cpp
    python benchmarks/bench_ops.py --device cuda        # GPU: reference vs cuda, triton
    python benchmarks/bench_ops.py --markdown --json bench.json

is ``dd bench kernels --device cpu|cuda [--markdown] [--json bench.json]`` with lists given
as space-separated values here (``--batch 1 4 8``) and comma-separated there. See
docs/performance.md for what is measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from dd.bench import KERNEL_REDUCTIONS, bench_kernels, kernels_markdown, kernels_panels
from dd.io import atomic_write_text
from dd.plot import plot_panels


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
        choices=KERNEL_REDUCTIONS,
        help="mse = mean with a target map",
    )
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write a PNG plot here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table on stdout")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = bench_kernels(
        device=torch.device(args.device),
        kernels=args.kernels,
        batches=args.batch,
        sizes=args.sizes,
        logits_side=args.logits,
        reductions=args.reductions,
        repeat=args.repeat,
    )
    for name, why in result["skipped"].items():
        print(f"skipping {name}: {why}", file=sys.stderr)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.plot:
        plot_panels(kernels_panels(result), args.plot)
    if args.markdown:
        print(kernels_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
