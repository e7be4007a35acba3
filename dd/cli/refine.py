"""``dd refine``: late-step SDEdit repair of images, and ``dd refine train`` (seed 002).

``dd refine IMAGES... [OPTIONS]`` refines images (it is ``dd refine run IMAGES...``: the group
forwards anything that is not a subcommand name to ``run``); ``dd refine train ...`` trains a
model on a late-step range. An image literally named ``train`` or ``run`` needs the explicit
``dd refine run train``.
"""

from __future__ import annotations

import typer

import dd.cli.options as opt
from dd.cli.groups import DefaultCommandGroup
from dd.engines.refine import RefineConfig
from dd.engines.refine_train import RefineTrainConfig

DEFAULT_COMMAND = "run"


class RefineGroup(DefaultCommandGroup):
    """A group whose default command is ``run``: ``dd refine a.png`` = ``dd refine run a.png``."""

    default_command = DEFAULT_COMMAND


app = typer.Typer(
    cls=RefineGroup,
    name="refine",
    help="Repair images by redoing the late diffusion steps (SDEdit), whole or masked by the "
    "detector, optionally detector-guided (--guide); "
    "`dd refine IMAGES... --backbone B --model M --late-steps A-B --out DIR`. "
    "`dd refine train` trains a model on a late-step range.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _run(ctx: typer.Context, values: dict, images: list[str]) -> None:
    """Run dd refine with the settings given (see RefineConfig) and print the outcome."""
    from rich.console import Console

    from dd.engines.refine import refine
    from dd.runtime.progress import ConsoleReporter

    cfg = RefineConfig(inputs=list(images), **values)
    result = refine(cfg, reporter=ConsoleReporter(Console(stderr=True)))
    s = result.summary
    console = Console()
    if s["images"]:
        console.print(
            f"refined {s['images']} image(s) -> {cfg.out}; artifact confidence, averaged over "
            f"the images: per-image max {s['before_max']:.4f} -> {s['after_max']:.4f}, "
            f"per-image mean {s['before_mean']:.4f} -> {s['after_mean']:.4f}",
            highlight=False,
        )
    for f in result.failures:
        # load errors already name the file
        where = "" if f["error"].startswith(f["image"]) else f"{f['image']}: "
        console.print(f"failed: {where}{f['error']}", highlight=False)
    if result.failures:
        from dd.errors import EXIT_SOME_INPUTS_FAILED

        raise typer.Exit(EXIT_SOME_INPUTS_FAILED)


# Every option comes from RefineConfig's declarations (one declaration per setting).
app.command("run")(
    opt.config_command(
        RefineConfig,
        _run,
        name="run",
        doc="""Refine images: noise them part-way and redo the late steps (seed 002, SDEdit).

    Writes to --out: images/ (refined), compare/ (before/after with both artifact maps),
    masks/, report.jsonl, report.csv, summary.json and plan.txt (the resolved timesteps).
    """,
        leading=[
            opt.argument_parameter(
                "images", "Image files, folders (recursive), globs, or .txt/.jsonl manifests."
            )
        ],
    )
)


def _train(ctx: typer.Context, values: dict) -> None:
    """Run dd refine train with the settings given (see RefineTrainConfig)."""
    from rich.console import Console

    from dd.engines.refine_train import refine_train
    from dd.runtime.progress import ConsoleReporter

    cfg = RefineTrainConfig(**values)
    result = refine_train(cfg, reporter=ConsoleReporter(Console(stderr=True)))
    if result.main:
        Console().print(
            f"range loss {result.first_loss:.5f} -> {result.last_loss:.5f} "
            f"(step {result.step}); model: {result.out}",
            highlight=False,
        )


# Every option comes from RefineTrainConfig's declarations (one declaration per setting).
app.command("train")(
    opt.config_command(
        RefineTrainConfig,
        _train,
        name="train",
        doc="""Train a model on a late-step range only (seed 002).

    Full fine-tuning for a small LDM, a LoRA for SD1.5; timesteps uniform over the range,
    EMA, checkpoints, --resume. The output folder loads with `dd refine --segment A-B=OUT`
    (or just `--segment OUT`). Several GPUs: `accelerate launch -m dd refine train ...`.
    """,
    )
)
