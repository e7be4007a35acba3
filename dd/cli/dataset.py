"""``dd dataset``: import artifact datasets and show what a dataset holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="dataset",
    help="Import artifact datasets (RichHF-18K), show their class balance, pack them "
    "into WebDataset shards.",
    no_args_is_help=True,
)


@app.command("import-richhf")
def import_richhf_cmd(
    tfrecords: Annotated[
        list[Path], typer.Argument(help="RichHF-18K TFRecord files (train/dev/test.tfrecord).")
    ],
    images: Annotated[
        Path,
        typer.Option(help="Folder with the Pick-a-Pic images (searched recursively by stem)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder to write.")],
    copy: Annotated[
        bool, typer.Option("--copy", help="Copy images instead of hard-linking them.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report to stdout.")] = (
        False
    ),
    overwrite: Annotated[
        bool,
        typer.Option(help="Write into a non-empty --out that holds no dataset (its files stay)."),
    ] = False,
) -> None:
    """Import RichHF-18K artifact maps as a dd dataset (no TensorFlow needed).

    Images are matched by the stem of each record's filename; records whose image is not
    found are listed in OUT/missing.txt and skipped. Re-running is safe: nothing is
    duplicated and samples already in OUT are kept.
    """
    from dd.data.richhf import import_richhf
    from dd.runtime.io import check_dataset_folder
    from dd.runtime.progress import progress_bar

    check_dataset_folder(out, "dataset import-richhf", overwrite=overwrite)

    err = Console(stderr=True)
    with progress_bar("import", console=err, unit="bytes") as progress:
        task = progress.add_task("import", total=None)
        report = import_richhf(
            tfrecords,
            images,
            out,
            copy=copy,
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    if as_json:
        typer.echo(json.dumps({**report.to_json(), "missing_files": report.missing}, indent=2))
        return
    console = Console()
    console.print(
        f"{report.records} records: {report.imported} imported ({report.positives} with "
        f"artifacts, {report.negatives} clean), {len(report.missing)} images missing, "
        f"{report.reused} images already in place. Dataset: {out}",
        highlight=False,
    )
    if report.missing:
        shown = ", ".join(report.missing[:10]) + (" ..." if len(report.missing) > 10 else "")
        console.print(
            f"[yellow]missing images[/yellow] ({len(report.missing)}, all listed in "
            f"{out / 'missing.txt'}): {shown}",
            highlight=False,
        )
    if report.duplicates:
        console.print(
            f"[yellow]{report.duplicates} records repeat an earlier record's image[/yellow] "
            "(the later one was kept)",
            highlight=False,
        )
    if report.ambiguous:
        console.print(
            f"[yellow]{len(report.ambiguous)} stems match several files under {images}[/yellow]"
            f" (the first in sorted order was used), e.g. {report.ambiguous[0]}",
            highlight=False,
        )


@app.command("pack")
def pack(
    dataset: Annotated[str, typer.Argument(help="Dataset folder (or shards) to pack.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder of the shards to write.")],
    shard_size: Annotated[int, typer.Option(min=1, help="Samples per shard.")] = 1000,
    resume: Annotated[
        bool, typer.Option(help="Keep complete shards in --out, write the rest.")
    ] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace the shards in --out.")] = False,
) -> None:
    """Write a dataset as WebDataset shards (KEY.png, KEY.mask.png, KEY.json, KEY.txt), each
    shard atomically; every command that reads datasets reads them (docs/datasets.md)."""
    from dd.data.pack import pack_dataset

    counts = pack_dataset(dataset, out, shard_size=shard_size, resume=resume, overwrite=overwrite)
    Console().print(
        f"{counts['samples']} samples: {counts['shards_written']} shard(s) written, "
        f"{counts['shards_kept']} kept, in {out}",
        highlight=False,
    )


def _balance_table(title: str, label: str, groups: dict[str, dict[str, int]]) -> Table:
    table = Table(title=title)
    table.add_column(label)
    for col in ("positives", "negatives", "total", "positive share"):
        table.add_column(col, justify="right")
    for name, g in groups.items():
        share = g["positives"] / g["total"] if g["total"] else 0.0
        table.add_row(
            name, str(g["positives"]), str(g["negatives"]), str(g["total"]), f"{share:.1%}"
        )
    return table


@app.command("info")
def info(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder (images/, masks/, manifest).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON to stdout.")] = False,
) -> None:
    """Show a dataset's class balance: positives (with a mask) and negatives by category.

    Also counts per source, and listed image or mask files that do not exist.
    """
    from dd.data.datasets import dataset_summary

    summary = dataset_summary(dataset)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console = Console()
    console.print(_balance_table("class balance by category", "category", summary["by_category"]))
    console.print(_balance_table("by source", "source", summary["by_source"]))
    console.print(
        f"{summary['samples']} samples: {summary['positives']} positives, "
        f"{summary['negatives']} negatives.",
        highlight=False,
    )
    for key, what in (("missing_images", "image"), ("missing_masks", "mask")):
        if summary[key]:
            console.print(
                f"[yellow]{summary[key]} {what} file(s) listed but not found[/yellow]",
                highlight=False,
            )
