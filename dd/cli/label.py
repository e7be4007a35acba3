"""``dd label``: hard-case mining, the labelling page, pseudo-labels, import/export, status."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dd.cli.options import (
    DetectorName,
    DetectorOptions,
    DetectorWeights,
    Device,
    Dtype,
    parse_pair,
)

app = typer.Typer(
    name="label",
    help="Human-in-the-loop labelling: mine hard cases, paint masks, pseudo-label the rest.",
    no_args_is_help=True,
)

Weights = DetectorWeights
Options = DetectorOptions
AsJson = Annotated[bool, typer.Option("--json", help="Print a JSON report to stdout.")]


def _detector(name, weights, option, device, dtype):
    """The detector the engine loads (``--detector``, ``--weights``, ``-O``, ...)."""
    from dd.api.plugins import DetectorRef
    from dd.cli.options import parse_options

    return DetectorRef(name, weights, parse_options(option), device, dtype)


@app.command("mine")
def mine(
    pool: Annotated[
        list[str],
        typer.Argument(help="Generated images: folders, globs, .txt/.jsonl manifests."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Queue folder to write.")],
    weights: Weights = None,
    detector: DetectorName = "segformer",
    option: Options = None,
    budget: Annotated[int, typer.Option(min=1, help="Most hard cases to select.")] = 2000,
    high: Annotated[
        float, typer.Option(help="Max confidence at or above which a flagged image is hard.")
    ] = 0.5,
    band: Annotated[
        str, typer.Option(help="Uncertainty band LO,HI of max confidence (any category).")
    ] = "0.35,0.65",
    flag_z: Annotated[
        float,
        typer.Option(help="Flag a category when (mean - mean of the rest) / std of the rest >= Z."),
    ] = 0.5,
    flag_gap: Annotated[
        float,
        typer.Option(help="... and when its mean max confidence exceeds the rest's by this much."),
    ] = 0.05,
    min_count: Annotated[
        int, typer.Option(min=1, help="Images a category needs before it can be flagged.")
    ] = 5,
    flag: Annotated[
        list[str] | None, typer.Option(help="Always treat this category as flagged (repeatable).")
    ] = None,
    categories: Annotated[
        Path | None,
        typer.Option(help="Keyword rules (TOML/JSON: category = [keywords]) for prompts."),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 8,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding and writing.")] = 4,
    device: Device = "auto",
    dtype: Dtype = "fp32",
    resume: Annotated[bool, typer.Option(help="Reuse detector results already in --out.")] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the queue in --out (never people's decisions).")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Run the detector over POOL, flag biased categories, and queue the hard cases.

    Categories come from the manifest's `category` field, else keyword rules applied to the
    prompt (`prompt` field or a sidecar .txt). Writes OUT/queue.jsonl (with the detector's
    map per item) for `dd label serve` and prints the per-category table.
    """
    from dd.engines.mine import MineConfig, check_mine_out, load_rules, run_mine
    from dd.runtime.progress import ConsoleReporter

    err = Console(stderr=True)
    cfg = MineConfig(
        budget=budget,
        high=high,
        band=parse_pair(band, "--band"),
        flag_z=flag_z,
        min_gap=flag_gap,
        min_count=min_count,
        force_flag=tuple(flag or ()),
    )
    cfg.check()
    check_mine_out(out, resume=resume, overwrite=overwrite)
    res = run_mine(
        pool,
        _detector(detector, weights, option, device, dtype),
        out,
        cfg,
        rules=load_rules(categories),
        batch_size=batch_size,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        reporter=ConsoleReporter(err),
    )
    for f in res.failures:
        err.print(f"[yellow]skipped[/yellow] {f['path']}: {f['reason']}", highlight=False)
    if as_json:
        typer.echo(
            json.dumps(
                {"pool": res.pool, "selected": len(res.selected), "categories": res.stats},
                indent=2,
            )
        )
        return
    console = Console()
    table = Table(title=f"predicted max confidence by category ({res.pool} images)")
    cols = ("category", "images", "mean", "median", "p90", f">= {high:g}", "d", "flag", "queued")
    for col in cols:
        table.add_column(col, justify="left" if col in ("category", "flag") else "right")
    for s in res.stats:
        table.add_row(
            s["category"],
            str(s["n"]),
            f"{s['mean_max']:.3f}",
            f"{s['median_max']:.3f}",
            f"{s['p90_max']:.3f}",
            f"{s['high_share']:.1%}",
            "-" if s["d"] is None else f"{s['d']:+.2f}",
            ("[red]FLAGGED[/red]" + (" (forced)" if s["forced"] else "")) if s["flagged"] else "",
            str(s["selected"]),
        )
    console.print(table)
    if res.selected:
        console.print(
            f"{len(res.selected)} hard cases queued in {out / 'queue.jsonl'} "
            f"(budget {budget}). Next: dd label serve {out}",
            highlight=False,
        )
    else:
        console.print(
            "[yellow]no image met the hard-case rules; nothing queued[/yellow] "
            "(widen --band, lower --high or --flag a category)",
            highlight=False,
        )


@app.command("serve")
def serve(
    queue: Annotated[Path, typer.Argument(help="Queue folder (from `dd label mine`).")],
    port: Annotated[int, typer.Option(help="Port (0: any free port).")] = 8765,
    host: Annotated[
        str,
        typer.Option(
            help="Address to bind; the default serves this machine only. Any other (e.g. "
            "0.0.0.0 for a team) requires the secret access link dd prints."
        ),
    ] = "127.0.0.1",
    annotator: Annotated[
        list[str] | None,
        typer.Option(
            help="Annotator name (repeatable). On this machine: the name recorded with each "
            "decision (default $USER). Beyond it: one private link per name, and each "
            "decision records the name of the link used."
        ),
    ] = None,
) -> None:
    """Open the labelling page: paint masks, mark 'no artifact', 'uncertain' or skip.

    Masks go to QUEUE/masks/ (8-bit PNG, written atomically), decisions to
    QUEUE/decisions.jsonl with the annotator; reopening resumes at the first item without a
    decision.
    """
    from dd.cli.serving import print_links, team_tokens
    from dd.label.serve import make_server

    names = list(annotator or [])
    default = names[0] if names else (os.environ.get("USER") or "anonymous")
    server = make_server(
        queue, host=host, port=port, annotator=default, tokens=team_tokens(host, names)
    )
    err = Console(stderr=True)
    print_links(err, server, f"Labelling {queue}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        err.print("stopped; every saved mask and decision is on disk.")


@app.command("pseudo")
def pseudo(
    pool: Annotated[
        list[str],
        typer.Argument(
            help="Images: folders, files, .txt/.jsonl manifests, WebDataset shards "
            "('shards/{000000..000099}.tar')."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to write.")],
    weights: Weights = None,
    detector: DetectorName = "segformer",
    option: Options = None,
    shards: Annotated[
        bool,
        typer.Option(
            "--shards",
            help="Write WebDataset shards OUT/shards/r<rank>-<n>.tar (image, KEY.mask.png, "
            "KEY.json per sample) instead of OUT/masks/.",
        ),
    ] = False,
    shard_size: Annotated[
        int, typer.Option(min=1, help="Samples per written shard (with --shards).")
    ] = 1000,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(help="Human-labelled datasets or queues whose images are skipped."),
    ] = None,
    shrink_threshold: Annotated[
        float,
        typer.Option(help="Mark images whose max confidence is below this for shrink-and-pad."),
    ] = 0.3,
    shrink_scale: Annotated[
        str, typer.Option(help="Shrink-and-pad scale LO,HI recorded for those images.")
    ] = "0.3,0.7",
    positive_threshold: Annotated[
        float,
        typer.Option(
            help="An image counts as showing an artifact (a positive for class balance) when "
            "its max confidence is at least this; recorded in the manifest."
        ),
    ] = 0.5,
    floor: Annotated[float, typer.Option(help="Confidences below this are stored as 0.")] = 0.0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per model call.")] = 16,
    workers: Annotated[int, typer.Option(min=1, help="Threads decoding and writing.")] = 4,
    rank: Annotated[
        int | None, typer.Option(help="This process's shard (default: $RANK or 0).")
    ] = None,
    world_size: Annotated[
        int | None, typer.Option(help="Number of shards (default: $WORLD_SIZE or 1).")
    ] = None,
    device: Device = "auto",
    dtype: Dtype = "fp32",
    resume: Annotated[bool, typer.Option(help="Continue a run in --out.")] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Start this rank's labels in --out afresh (or use a non-empty folder)."),
    ] = False,
    categories: Annotated[
        Path | None,
        typer.Option(help="Keyword rules (TOML/JSON: category = [keywords]) for prompts."),
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Pseudo-label every pool image not labelled by people, sharded and resumable.

    Run it under `torchrun --nproc-per-node N -m dd label pseudo ...` or `accelerate
    launch` to split the pool over processes; OUT/manifest.jsonl appears when all are done.
    """
    import torch

    from dd.engines.mine import load_rules
    from dd.engines.pseudo import PseudoConfig, dist_env, run_pseudo
    from dd.runtime.progress import ConsoleReporter

    err = Console(stderr=True)
    env_rank, env_world, local_rank = dist_env()
    cfg = PseudoConfig(
        out=out,
        batch_size=batch_size,
        workers=workers,
        resume=resume,
        overwrite=overwrite,
        shrink_threshold=shrink_threshold,
        positive_threshold=positive_threshold,
        shrink_scale=parse_pair(shrink_scale, "--shrink-scale"),
        floor=floor,
        rank=env_rank if rank is None else rank,
        world_size=env_world if world_size is None else world_size,
        rules=load_rules(categories),
        shards=shards,
        shard_size=shard_size,
    )
    cfg.check()
    if device == "auto" and torch.cuda.is_available() and cfg.world_size > 1:
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    tag = f"pseudo r{cfg.rank}/{cfg.world_size}" if cfg.world_size > 1 else "pseudo"
    res = run_pseudo(
        pool,
        _detector(detector, weights, option, device, dtype),
        cfg,
        exclude=exclude,
        reporter=ConsoleReporter(err),
    )
    for f in (res.failures or [])[:20]:
        err.print(f"[yellow]skipped[/yellow] {f['reason']}", highlight=False)
    if as_json:
        typer.echo(json.dumps(res.to_json(), indent=2))
    else:
        _print_pseudo(res, tag)
    if res.failed:
        from dd.errors import EXIT_SOME_INPUTS_FAILED

        raise typer.Exit(EXIT_SOME_INPUTS_FAILED)


def _print_pseudo(res: Any, tag: str) -> None:
    Console().print(
        f"{tag}: {res.processed} images labelled in {res.seconds:.1f}s "
        f"({res.images_per_second:.2f} images/s), {res.shrink} marked for shrink-and-pad, "
        f"{res.skipped_done} already done, {res.skipped_excluded} human-labelled skipped, "
        f"{res.failed} failed."
        + (
            f" Manifest: {res.manifest}"
            if res.manifest
            else " Other ranks still running: the last to finish writes manifest.jsonl."
        ),
        highlight=False,
    )


@app.command("import")
def import_(
    sources: Annotated[
        list[Path],
        typer.Argument(help="Mask folder, COCO/Label Studio JSON, CVAT zip, TFRecords or queue."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to write.")],
    fmt: Annotated[
        str,
        typer.Option("--format", help="auto, png, coco, label-studio, cvat, richhf or queue."),
    ] = "auto",
    images: Annotated[
        Path | None, typer.Option(help="Folder with the images the masks belong to.")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Only these label/category names count as artifact (repeatable)."),
    ] = None,
    source: Annotated[
        str, typer.Option(help="Manifest source: human, pseudo, real or synthetic.")
    ] = "human",
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy images instead of hard-linking them.")
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(help="Write into a non-empty --out that holds no dataset (its files stay)."),
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Import masks into the dataset format (re-running replaces, never duplicates)."""
    from dd.label.formats import import_any
    from dd.runtime.io import check_dataset_folder

    check_dataset_folder(out, "label import", overwrite=overwrite)
    report = import_any(fmt, sources, out, images=images, copy=copy, source=source, labels=label)
    data = report.to_json()
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    Console().print(
        f"imported {data['imported']} samples ({data['positives']} with artifacts, "
        f"{data['negatives']} clean) into {out}; {data['missing']} without an image"
        + (f", {data['skipped']} without a final label" if data.get("skipped") else ""),
        highlight=False,
    )


@app.command("export")
def export(
    src: Annotated[Path, typer.Argument(help="A queue (label-studio, coco) or dataset (coco).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSON file to write.")],
    fmt: Annotated[str, typer.Option("--format", help="label-studio or coco.")] = "label-studio",
    threshold: Annotated[
        float, typer.Option(help="Confidence at or above which a pixel is painted.")
    ] = 0.5,
    rle: Annotated[
        str, typer.Option(help="COCO counts: 'string' (compressed) or 'list'.")
    ] = "string",
    image_prefix: Annotated[
        str, typer.Option(help="Label Studio: prefix of task image URLs.")
    ] = "/data/local-files/?d=",
    image_root: Annotated[
        Path | None,
        typer.Option(help="Label Studio: image paths are made relative to this folder."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option(help="Replace an existing --out file (and its label config).")
    ] = False,
    as_json: AsJson = False,
) -> None:
    """Export a queue as Label Studio tasks with predictions, or masks as COCO RLE."""
    from dd.errors import DDError, UsageError
    from dd.label.formats import export_coco, export_label_studio

    if fmt not in ("label-studio", "coco"):
        raise UsageError(f"unknown export format {fmt!r}", hint="use label-studio or coco")
    if fmt == "coco" and rle not in ("string", "list"):
        raise UsageError(f"--rle must be 'string' or 'list', got {rle!r}")
    if out.is_dir():
        raise DDError(f"--out {out} is a folder", hint="name the JSON file to write")
    if out.exists() and not overwrite:
        raise DDError(
            f"--out {out} already exists", hint="pass --overwrite to replace it, or pick a new name"
        )

    if fmt == "label-studio":
        info = export_label_studio(
            src, out, threshold=threshold, image_prefix=image_prefix, image_root=image_root
        )
        msg = (
            f"{info['tasks']} Label Studio tasks with predictions in {out}; labelling "
            f"interface: {info['config']}"
        )
    else:  # coco
        info = export_coco(src, out, threshold=threshold, compressed=rle == "string")
        msg = f"{info['images']} images, {info['annotations']} RLE masks in {out}"
    if as_json:
        typer.echo(json.dumps(info, indent=2))
    else:
        Console().print(msg, highlight=False)


@app.command("status")
def status(
    path: Annotated[Path, typer.Argument(help="Dataset folder, or a labelling queue.")],
    as_json: AsJson = False,
) -> None:
    """Class balance of a dataset by source and category (or a queue's progress)."""
    from dd.cli.dataset import _balance_table
    from dd.label.status import status as get_status

    info = get_status(path)
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console = Console()
    if info["kind"] == "queue":
        from dd.label.queue import LABELS

        table = Table(title=f"labelling progress: {info['done']} / {info['total']}")
        for col in ("category", "total", "todo", *LABELS):
            table.add_column(col, justify="left" if col == "category" else "right")
        for cat, row in info["by_category"].items():
            table.add_row(cat, *(str(row[c]) for c in ("total", "todo", *LABELS)))
        console.print(table)
        console.print(
            f"annotators: {', '.join(f'{k} ({v})' for k, v in info['annotators'].items()) or '-'}",
            highlight=False,
        )
        return
    console.print(_balance_table("by source", "source", info["by_source"]))
    console.print(_balance_table("by category", "category", info["by_category"]))
    sources = info["sources"]
    table = Table(title="positives / negatives by category and source")
    table.add_column("category")
    for s in sources:
        table.add_column(s, justify="right")
    for cat, row in info["by_category_source"].items():
        cells = []
        for s in sources:
            c = row.get(s)
            cells.append(f"{c['positives']} / {c['negatives']}" if c else "-")
        table.add_row(cat, *cells)
    console.print(table)
    console.print(
        f"{info['samples']} samples: {info['positives']} positives, {info['negatives']} "
        f"negatives; {info['shrink_pad']} marked for shrink-and-pad.",
        highlight=False,
    )
