"""``dd synth``: a synthetic artifact dataset (watermarks, warps, patches, smears) with masks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dd.cli.options import interrupt_hint


@interrupt_hint("samples already written are kept; the same command continues the dataset")
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to write.")],
    count: Annotated[int, typer.Option(min=1, help="Number of samples.")] = 200,
    size: Annotated[int, typer.Option(min=32, help="Image side in pixels.")] = 256,
    seed: Annotated[int, typer.Option(min=0, help="Random seed (sample i uses (seed, i)).")] = 0,
    kinds: Annotated[
        str, typer.Option(help="Comma-separated artifact kinds: watermark,warp,patch,smear.")
    ] = "watermark,warp,patch,smear",
    negative_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Fraction of clean negatives (no mask).")
    ] = 0.3,
    photos: Annotated[
        Path | None, typer.Option(help="Folder of your own photos to use as clean images.")
    ] = None,
    no_skimage: Annotated[
        bool, typer.Option("--no-skimage", help="Do not use scikit-image's sample photos.")
    ] = False,
    workers: Annotated[int, typer.Option(min=1, help="Processes rendering samples.")] = 1,
    watermark_opacity: Annotated[
        str, typer.Option(help="Opacity range LOW-HIGH of watermarks (0.6-1.0: plainly visible).")
    ] = "0.25-0.85",
    photo_scale: Annotated[
        str | None,
        typer.Option(
            help="Crop photos at sides drawn log-uniformly from LOW-HIGH of the largest crop "
            "(e.g. 0.05-1.0: close-ups to whole views; default 0.45-1.0 uniformly)."
        ),
    ] = None,
    scene_text: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Probability that a clean image gets opaque text on a sign or label "
            "(a hard negative: scene text is not a watermark).",
        ),
    ] = 0.0,
    procedural_share: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Probability of a procedural clean image; the rest are drawn from all photos "
            "alike (default: procedural, scikit-image and --photos equally often).",
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace a dd synth dataset in --out made with other settings."),
    ] = False,
) -> None:
    """Write clean images and copies with synthetic artifacts plus their exact masks.

    The output is a dd dataset (images/, masks/, manifest.jsonl) for train-detector and
    eval-detector. Rerunning with the same arguments resumes: finished samples are kept
    (a larger --count adds samples). Other settings need --overwrite; a folder that synth
    did not write is refused.
    Synthetic artifacts model watermarks and local edits, not real hand/face distortions.
    """
    from dd.data.synth import synthesize

    def span(value: str, flag: str) -> tuple[float, float]:
        try:
            lo, hi = (float(v) for v in value.split("-"))
        except ValueError:
            lo = hi = math.nan
        if not 0.0 < lo <= hi <= 1.0:  # NaN fails too
            raise typer.BadParameter(
                f"{value!r} is not LOW-HIGH with 0 < LOW <= HIGH <= 1 (e.g. 0.6-1.0)",
                param_hint=f"'{flag}'",
            )
        return lo, hi

    lo, hi = span(watermark_opacity, "--watermark-opacity")
    scale = span(photo_scale, "--photo-scale") if photo_scale is not None else None
    report = synthesize(
        out,
        count,
        size=size,
        seed=seed,
        kinds=[k.strip() for k in kinds.split(",") if k.strip()],
        negative_ratio=negative_ratio,
        photos_dir=photos,
        use_skimage=not no_skimage,
        workers=workers,
        watermark_opacity=(lo, hi),
        photo_scale=scale,
        scene_text=scene_text,
        procedural_share=procedural_share,
        overwrite=overwrite,
    )
    console = Console()
    table = Table(title=f"dd synth: {report.samples} samples in {out}")
    for col in ("category", "samples", "procedural", "photo", "mask area"):
        table.add_column(col, justify="left" if col == "category" else "right")
    for cat, row in report.categories.items():
        table.add_row(
            cat,
            str(int(row["samples"])),
            str(int(row["procedural"])),
            str(int(row["photo"])),
            f"{row['coverage']:.2%}",
        )
    console.print(table)
    applied = ", ".join(f"{k} {n}" for k, n in report.artifacts.items()) or "none"
    pools = ", ".join(
        f"{k} ({n} {'generators' if k == 'procedural' else 'photos'})"
        for k, n in report.clean_sources.items()
    )
    console.print(f"artifacts applied (combined ones counted each): {applied}", highlight=False)
    console.print(f"clean images from: {pools}", highlight=False)
    if not no_skimage and "skimage" not in report.clean_sources:
        console.print(
            "scikit-image is not installed: no sample photos (pip install scikit-image).",
            highlight=False,
        )
    console.print(
        f"{report.generated} generated, {report.resumed} resumed in {report.seconds:.1f}s. "
        f"Manifest: {report.manifest}",
        highlight=False,
    )
