"""``dd dreambooth``: teach a model a prompt from exemplar images (DreamBooth-LoRA)."""

from __future__ import annotations

import typer
from rich.console import Console

import dd.cli.options as opt
from dd.engines.dreambooth import DreamBoothConfig
from dd.runtime.progress import ConsoleReporter


def _dreambooth(ctx: typer.Context, values: dict, config: str | None) -> None:
    """Run dd dreambooth with the settings given (see DreamBoothConfig)."""
    from dd.engines.dreambooth import dreambooth as run

    cfg, source = opt.config_from_flags(ctx, DreamBoothConfig, values, config, {})
    err = Console(stderr=True)
    if source is not None:
        err.print(f"config {source}", highlight=False)
    result = run(cfg, reporter=ConsoleReporter(err))
    if not result.main:
        return
    first, last = result.first_instance_loss, result.last_instance_loss
    msg = f"step {result.step}: LoRA {result.lora}"
    if first is not None and last is not None:
        msg += f"; instance loss {first:.5f} -> {last:.5f}"
    Console().print(msg, highlight=False)


# Every option comes from DreamBoothConfig's declarations (one declaration per setting).
dreambooth = opt.config_command(
    DreamBoothConfig,
    _dreambooth,
    name="dreambooth",
    doc="""DreamBooth-LoRA fine-tuning on exemplar images (SD3, FLUX, SD1.5).

    Writes to --out: pytorch_lora_weights.safetensors (load it with
    pipe.load_lora_weights(OUT) or continue with `dd treat --init-lora OUT`), checkpoints/,
    class_images/, validation/, metrics.jsonl, curves.png, config.toml and README.md.
    Several GPUs: `accelerate launch -m dd dreambooth ...`.
    """,
    leading=[opt.preset_parameter("TOML file of settings; flags given here override it.")],
)
