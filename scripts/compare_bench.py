"""The comparison table of docs/guide.md: base, guided, best-of-N, treated and treated+guided
at the same seeds on the CPU bench models (``dd.engines.bench.bench_backbone``: dd's tiny
pipelines with the benchmark denoisers, random weights) with dd's embedded default detector.

For each backbone: save the bench model as a pipeline folder, treat it briefly with
``dd treat`` (the LoRA the "treated" rows load), then ``dd eval gen --lora RUN --guide
--best-of N --quality detail,drift``; prints each ``results.md``.

    python scripts/compare_bench.py [--out DIR] [--backbones flux,sd15] [--train-steps 40]
        [--lr 5e-3] [--best-of 4]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

PROMPTS = [
    "a photo of a cat holding a cup",
    "a hand waving in front of a window",
    "a street sign with the word open",
    "a portrait of a smiling woman",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--backbones", default="flux,sd15")
    ap.add_argument("--train-steps", type=int, default=40)
    ap.add_argument("--lr", default="5e-3")
    ap.add_argument("--best-of", type=int, default=4)
    args = ap.parse_args()
    import torch
    from typer.testing import CliRunner

    from dd.cli import build_app
    from dd.engines.bench import bench_backbone

    out = args.out or Path(tempfile.mkdtemp(prefix="dd-compare-"))
    runner = CliRunner()

    def dd(*argv: object) -> None:
        res = runner.invoke(build_app(), [str(a) for a in argv])
        if res.exit_code != 0:
            raise SystemExit(f"dd {' '.join(map(str, argv))} failed:\n{res.output}")

    prompts = out / "prompts.txt"
    out.mkdir(parents=True, exist_ok=True)
    prompts.write_text("\n".join(PROMPTS) + "\n")
    for name in args.backbones.split(","):
        bb, _ = bench_backbone(name, device=torch.device("cpu"))
        model = out / name / "model"
        bb.pipe.save_pretrained(model)
        extra = ["-B", "max_sequence_length=32"] if name in ("flux", "sd3") else []
        common = ["--backbone", name, "--model", model, "--resolution", "64", "--steps", "4",
                  "--device", "cpu", *extra]  # fmt: skip
        run = out / name / "treated"
        dd("treat", *common, "--prompts", prompts, "--eval-prompts", prompts, "--out", run,
           "--train-steps", args.train_steps, "--eval-every", args.train_steps,
           "--save-every", args.train_steps, "--eval-seeds", "1", "--lr", args.lr)  # fmt: skip
        dd("eval", "gen", *common, "--lora", run, "--prompts", prompts, "--seeds", "0,1",
           "--guide", "--best-of", args.best_of, "--quality", "detail,drift",
           "--out", out / name / "eval")  # fmt: skip
        print(f"## {name}\n")
        print((out / name / "eval" / "results.md").read_text())


if __name__ == "__main__":
    main()
