"""``dd eval``: evaluate generation (``gen``) and run preference studies (``study``).

``dd eval study DIR_A DIR_B --out STUDY`` creates a study (``create`` is implied when the
first word is not ``serve`` or ``report``), ``dd eval study serve STUDY`` shows the page and
``dd eval study report STUDY`` computes the win rates.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dd.cli.groups import DefaultCommandGroup
from dd.cli.options import (
    BatchSize,
    DetectorPlugin,
    Device,
    Dtype,
    Guidance,
    GuideEvery,
    GuideLoss,
    GuideScale,
    GuideSteps,
    PromptsFile,
    Seeds,
    interrupt_hint,
)

app = typer.Typer(
    help="Evaluate models' generations (metrics, grids) and run preference studies.",
    no_args_is_help=True,
)


class _StudyGroup(DefaultCommandGroup):
    """``study DIR_A DIR_B ...`` means ``study create DIR_A DIR_B ...``."""

    default_command = "create"


study_app = typer.Typer(
    cls=_StudyGroup,
    help="A pairwise preference study: DIR_A DIR_B --out STUDY creates it; `serve STUDY` "
    "shows the page; `report STUDY` computes win rates.",
    no_args_is_help=True,
)
app.add_typer(study_app, name="study")


@app.command("gen")
@interrupt_hint("images already generated are kept; the same command reuses them")
def gen(
    backbone: Annotated[
        str | None, typer.Option(help="Backbone plugin: flux, sd15, sd3, sdxl.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Diffusers folder, file or hub id.")] = None,
    backbone_option: Annotated[
        list[str] | None, typer.Option("--backbone-option", "-B", help="Backbone option K=V.")
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(help="A LoRA folder or .safetensors to compare with the base (repeatable)."),
    ] = None,
    prompts: PromptsFile = None,
    seeds: Seeds = "4",
    refs: Annotated[
        str | None,
        typer.Option(
            help="Reference images: all for FID/KID; PPPP-seedS.png / PPPP.png paired with "
            "generated images for SSIM/PSNR."
        ),
    ] = None,
    out: Annotated[str | None, typer.Option("--out", "-o", help="Output folder.")] = None,
    resolution: Annotated[int | None, typer.Option(min=8, help="Image size (square).")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="Sampling steps.")] = None,
    guidance: Guidance = None,
    dtype: Dtype = "fp32",
    device: Device = "auto",
    batch_size: BatchSize = 1,
    detector: DetectorPlugin = "segformer",
    detector_weights: Annotated[
        str | None, typer.Option("--detector-weights", "--weights", help="Detector weights.")
    ] = None,
    detector_option: Annotated[
        list[str] | None,
        typer.Option("--option", "--detector-option", "-O", help="Detector option K=V."),
    ] = None,
    inception: Annotated[
        str | None,
        typer.Option(
            help="TorchScript inception-2015-12-05.pt for FID/KID (default "
            "$DD_HOME/inception-2015-12-05.pt, DD_HOME=~/.cache/dd)."
        ),
    ] = None,
    kid_subset_size: Annotated[int, typer.Option(min=2, help="KID subset size.")] = 1000,
    kid_subsets: Annotated[int, typer.Option(min=1, help="KID subsets.")] = 100,
    clip_model: Annotated[
        str | None, typer.Option(help="Local CLIPModel folder: adds the CLIP score.")
    ] = None,
    pickscore_model: Annotated[
        str | None, typer.Option(help="Local PickScore (CLIP) folder: adds PickScore.")
    ] = None,
    image_reward_model: Annotated[
        str | None,
        typer.Option(help="Local ImageReward.pt (+ med_config.json; needs image-reward)."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Regenerate images in --out that were made with other settings."),
    ] = False,
    guide: Annotated[
        bool,
        typer.Option(
            help="Add a row per model sampled with detector guidance (<model>+guide; as dd "
            "generate --guide)."
        ),
    ] = False,
    guide_scale: GuideScale = 12.0,
    guide_steps: GuideSteps = None,
    guide_loss: GuideLoss = "mean",
    guide_every: GuideEvery = 1,
    best_of: Annotated[
        int,
        typer.Option(
            min=1,
            help="Add a row per model keeping the best of N candidates per image (the lowest "
            "mean confidence; <model>+best-of-N).",
        ),
    ] = 1,
    quality: Annotated[
        str | None,
        typer.Option(
            help="Quality scorers, comma-separated (built-ins: detail, drift; `dd plugins` "
            "lists more), each row against the base model's images."
        ),
    ] = None,
    quality_weights: Annotated[
        list[str] | None,
        typer.Option(help="Local weights of a quality scorer: NAME=PATH (repeatable)."),
    ] = None,
) -> None:
    """Generate with the base model and each LoRA at identical seeds, then score them.

    Artifact confidence (mean, max), artifact frequency and pixel ratio from the detector;
    FID/KID against --refs (local Inception weights only); SSIM/PSNR against paired
    references; optional CLIP score, PickScore, ImageReward from local weights; time per
    image and peak memory of each row; --quality scorers. With --guide and --best-of N each
    model also gets a guided and a best-of-N row: base, guided, best-of-N, treated (--lora)
    and treated+guided side by side at the same seeds. Writes
    results.md, results.json, grids/prompt-PPPP.png, bars.png and images/<model>/ to --out
    (images made with the same settings are reused: rerun to resume; other settings need
    --overwrite).
    """
    from dd.cli.options import parse_options, split_list
    from dd.data.prompts import parse_seeds
    from dd.engines.eval_gen import EvalGenConfig, _fmt, columns, eval_gen

    cfg = EvalGenConfig(
        backbone=backbone,
        model=model,
        backbone_options=parse_options(backbone_option),
        loras=list(lora or []),
        prompts=prompts,
        seeds=parse_seeds(seeds),
        refs=refs,
        out=out,
        resolution=resolution,
        steps=steps,
        guidance=guidance,
        dtype=dtype,
        device=device,
        batch_size=batch_size,
        detector=detector,
        detector_weights=detector_weights,
        detector_options=parse_options(detector_option),
        inception=inception,
        kid_subset_size=kid_subset_size,
        kid_subsets=kid_subsets,
        clip_model=clip_model,
        pickscore_model=pickscore_model,
        image_reward_model=image_reward_model,
        overwrite=overwrite,
        guide=guide,
        guide_scale=guide_scale,
        guide_steps=guide_steps,
        guide_loss=guide_loss,
        guide_every=guide_every,
        best_of=best_of,
        quality=split_list(quality) or [],
        quality_weights=parse_options(quality_weights),
    )
    results = eval_gen(cfg, console=Console(stderr=True))
    con = Console()
    for row in results["models"]:
        parts = [f"{h} {_fmt(k, row[k])}" for k, h, _ in columns(results) if row.get(k) is not None]
        con.print(f"{row['model']}: " + ", ".join(parts), highlight=False)
    con.print(f"report: {Path(out or '.') / 'results.md'}", highlight=False)


@study_app.command("create", hidden=True)
def study_create(
    dir_a: Annotated[Path, typer.Argument(help="Images of model A (e.g. the base).")],
    dir_b: Annotated[Path, typer.Argument(help="Images of model B (same file names).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Study folder to create.")],
    name_a: Annotated[str | None, typer.Option(help="Display name of A (default: folder).")] = None,
    name_b: Annotated[str | None, typer.Option(help="Display name of B (default: folder).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the left/right draw.")] = 0,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Replace a study in --out that has no votes yet, or use a non-empty folder."
        ),
    ] = False,
) -> None:
    """Create a study from two folders of images paired by file name."""
    from dd.engines.study import create_study

    study = create_study(
        dir_a, dir_b, out, name_a=name_a, name_b=name_b, seed=seed, overwrite=overwrite
    )
    msg = f"{len(study['pairs'])} pairs of {study['models']['a']} vs {study['models']['b']}"
    skipped = sum(len(v) for v in study["unpaired"].values())
    if skipped:
        msg += f" ({skipped} image(s) without a partner left out)"
    Console().print(f"{msg} -> {out}. Next: dd eval study serve {out}", highlight=False)


@study_app.command("serve")
def study_serve(
    study: Annotated[Path, typer.Argument(help="The study folder.")],
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind (default: this machine only). Any other (e.g. 0.0.0.0) "
            "requires the secret access link dd prints."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: any free one).")] = 8766,
    participant: Annotated[
        list[str] | None,
        typer.Option(
            help="Beyond this machine: one private link per participant name (repeatable); "
            "their votes carry that name. Without it: one shared link."
        ),
    ] = None,
) -> None:
    """Serve the study page; votes go to STUDY/votes/<participant>.jsonl."""
    from dd.cli.serving import print_links, team_tokens
    from dd.engines.study import PARTICIPANT, serve_study
    from dd.errors import DDError

    for name in participant or []:
        if not PARTICIPANT.match(name):
            raise DDError(f"bad participant name {name!r}", hint="1-64 letters, digits, - or _")
    server = serve_study(study, host=host, port=port, tokens=team_tokens(host, participant or []))
    err = Console(stderr=True)
    print_links(err, server, f"Study {study} (votes in {study / 'votes'})")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()


@study_app.command("report")
def study_report_cmd(
    study: Annotated[Path, typer.Argument(help="The study folder.")],
    confidence: Annotated[float, typer.Option(help="Confidence of the intervals.")] = 0.95,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Win rates per question with Wilson score intervals (writes report.md/.json)."""
    import json

    from dd.engines.study import format_rates, study_report

    report: dict[str, Any] = study_report(study, confidence=confidence)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    con = Console()
    con.print(
        f"{report['participants']} participant(s), {report['votes']} vote(s)", highlight=False
    )
    for line in format_rates(report):
        con.print(line, highlight=False)
