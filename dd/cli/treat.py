"""``dd treat``: tune a diffusion model's LoRA so a detector finds fewer artifacts."""

from __future__ import annotations

import typer
from rich.console import Console

import dd.cli.options as opt
from dd.engines.treat import TreatConfig
from dd.runtime.progress import ConsoleReporter


def _treat(ctx: typer.Context, values: dict, config: str | None) -> None:
    """Run dd treat with the settings given (see TreatConfig) and print the outcome."""
    from dd.engines.treat import treat as run

    cfg, source = opt.config_from_flags(ctx, TreatConfig, values, config, {})

    err = Console(stderr=True)
    if source is not None:
        err.print(f"preset {source}", highlight=False)
    if cfg.plan or cfg.max_memory:
        _plan(cfg)
        return
    result = run(cfg, reporter=ConsoleReporter(err))
    if not result.main:
        return
    console = Console()
    base, best, last = result.base, result.best, result.last_eval

    def fmt(r: dict | None) -> str:
        if not r:
            return "-"
        return f"step {r['step']}: mean {r['mean']:.5f}, max {r['max']:.5f}, drift {r['drift']:.4f}"

    console.print(f"untreated  {fmt(base)}", highlight=False)
    console.print(f"best       {fmt(best)}  -> {result.best_lora.parent}", highlight=False)
    console.print(f"final      {fmt(last)}  -> {result.lora}", highlight=False)
    console.print(f"stopped: {result.stop_reason}", highlight=False)


def _plan(cfg: TreatConfig) -> None:
    """``dd treat --plan``: the memory estimate, nothing loaded, nothing written."""
    from dd.engines.plan import plan_treat, render
    from dd.errors import UsageError

    if not cfg.plan:
        raise UsageError("--max-memory goes with --plan", hint="dd treat --plan --max-memory 24GB")
    for key in ("backbone", "model"):
        if not getattr(cfg, key):
            raise UsageError(f"--{key} is required", hint=f"pass --{key} or set {key} in --config")
    for line in render(plan_treat(cfg, cfg.max_memory)):
        Console().print(line, highlight=False)


# Every option comes from TreatConfig's declarations (one declaration per setting).
treat = opt.config_command(
    TreatConfig,
    _treat,
    name="treat",
    doc="""Treat a diffusion model: tune a LoRA so the artifact detector finds fewer artifacts.

    DiffDoctor's pixel-aware treating (Sec. 3.3): generate, detect, back-propagate the
    artifact confidence through the last K denoising steps; optionally regularise with the
    diffusion loss on real images. Writes to --out: pytorch_lora_weights.safetensors (final),
    best/ (best eval mean confidence), checkpoints/, eval/ grids, metrics.jsonl, curves.png,
    config.toml and README.md. Several GPUs: `accelerate launch -m dd treat ...`.
    """,
    leading=[
        opt.preset_parameter(
            "Preset name (flux-schnell, flux-dev, sd15, sd3, sdxl) or TOML file; "
            "flags given here override it."
        )
    ],
)
