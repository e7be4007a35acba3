"""Test helpers: fake installed distributions with dd entry points."""

from __future__ import annotations

from pathlib import Path

#: ``-O`` options of a random tiny SegFormer at 32 px (fast CPU runs of detector commands).
TINY_DETECTOR = ["-O", "variant=tiny", "-O", "input_size=32"]


def make_dist(site: Path, name: str, version: str, entry_points: dict[str, str]) -> Path:
    """Create ``NAME-VERSION.dist-info`` in ``site`` declaring ``[dd]`` entry points.

    With ``site`` on ``sys.path`` (or PYTHONPATH), ``importlib.metadata`` sees an installed
    distribution, exactly as after ``pip install``.
    """
    d = site / f"{name.replace('-', '_')}-{version}.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (d / "entry_points.txt").write_text(f"[dd]\n{lines}")
    return d


# -- the fused op's tests (test_ops.py, test_ops_triton.py) ----------------------------------
def make_inputs(shape, size, dtype, variant, seed=0):
    """Logits ``shape``, and a target (``t`` in ``variant``) and weight map (``w``) of the
    output ``size``, seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    full = (shape[0], 1, *size)
    t = torch.rand(full, generator=g, dtype=torch.float64).to(dtype) if "t" in variant else None
    w = torch.rand(full, generator=g, dtype=torch.float64).to(dtype) if "w" in variant else None
    return x, t, w


def loss_and_grad(fn, x, size, reduction, t, w, kernel=None):
    """Per-image losses and the gradient of a weighted sum of them (distinct per image)."""
    import torch

    x = x.detach().clone().requires_grad_()
    kw = {"kernel": kernel} if kernel else {}
    loss = fn(x, size, reduction, t, 0.1, w, **kw)
    coef = torch.arange(1, x.shape[0] + 1, dtype=loss.dtype)
    (grad,) = torch.autograd.grad((loss * coef).sum(), x)
    return loss.detach(), grad


# -- several processes (accelerate launch, torchrun) on the CPU -----------------------------
def free_port() -> int:
    """A TCP port nothing listens on now (for a torchrun rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_process_env() -> dict[str, str]:
    """The environment of a two-process run on this machine: one thread each, offline."""
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def launch_dd_twice(args: list[str], timeout: int = 300):
    """``accelerate launch`` of ``dd ARGS`` in two CPU processes (gloo); the finished
    process (its ``returncode`` asserted to be 0, with the end of stderr as the message)."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "-m", "dd", *map(str, args),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=two_process_env(), capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def assert_two_rank_checkpoint(run: Path) -> Path:
    """The run's last checkpoint was written by a world of 2, with each rank's RNG state."""
    import json

    last = run / "checkpoints" / "last"
    assert json.loads((last / "trainer.json").read_text())["world_size"] == 2
    assert (last / "rng_rank0.pt").is_file() and (last / "rng_rank1.pt").is_file()
    return last


# -- reference images from the diffusers pipeline itself -----------------------------------
def seeded_pipeline_images(pipe, prompt: str, seeds, **call):
    """``pipe(prompt, ...)`` once per seed, each with its own CPU generator (the draw
    ``Backbone.generate`` makes), as ``(1, 3, H, W)`` tensors in [0, 1]. The tiny FLUX
    defaults: 64 px, 2 steps, 32 T5 tokens (``call`` overrides them)."""
    import torch

    kw = {"height": 64, "width": 64, "num_inference_steps": 2, "max_sequence_length": 32}
    kw.update(call)
    out = []
    for s in seeds:
        with torch.no_grad():
            g = torch.Generator("cpu").manual_seed(s)
            out.append(pipe(prompt, generator=g, output_type="pt", **kw).images)
    return out
