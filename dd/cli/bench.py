"""``dd bench``: side-by-side benchmarks of the kernels, the treat step and detect.

Each command runs the baseline and dd's implementation in one process, prints a table and the
ratios the targets are about (docs/performance.md), and can write the results as JSON and a
PNG plot. Run on a quiet machine with ``OMP_WAIT_POLICY=PASSIVE``; the load average at the
start is recorded with the results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

app = typer.Typer(
    name="bench",
    help="Benchmarks: fused loss kernels, the treat step (memory vs K), detect throughput, "
    "quantised parameter memory; `dd bench gpu`: every GPU check in one command.",
    no_args_is_help=True,
)

DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Write the results here (JSON).")]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a PNG plot here.")]
MarkdownOpt = Annotated[
    bool, typer.Option("--markdown", help="Print markdown tables (as in docs/performance.md).")
]
ThreadsOpt = Annotated[int, typer.Option(min=0, help="torch threads (0: torch's default).")]


def _ints(text: str, what: str) -> list[int]:
    from dd.errors import DDError

    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise DDError(f"bad {what} {text!r}", hint="comma-separated integers, e.g. 1,4,8") from None
    if not values or any(v < 1 for v in values):
        raise DDError(f"bad {what} {text!r}", hint="comma-separated positive integers")
    return values


def _names(text: str) -> list[str]:
    return [t.strip().lower() for t in text.split(",") if t.strip()]


@contextmanager
def _progress(label: str) -> Iterator[Callable[[int, int], None]]:
    from dd.runtime.progress import progress_bar

    with progress_bar(label, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)


def _report(
    result: dict[str, Any],
    to_markdown: Callable[[dict[str, Any]], str],
    to_panels: Callable[[dict[str, Any]], list] | None,
    json_out: Path | None,
    plot: Path | None,
    markdown: bool,
) -> None:
    """Print the benchmark's tables (``to_markdown``) and targets; write the JSON and the
    plot of its panels (``to_panels``) where asked."""
    text = to_markdown(result)
    panels = to_panels(result) if to_panels is not None and plot is not None else []
    from rich.markdown import Markdown

    from dd.engines.bench import save_outputs

    console = Console()
    if markdown:
        typer.echo(text)
    else:
        console.print(Markdown(text))
    for t in result.get("targets", []):
        mark = "[green]met[/green]" if t["met"] else "[bold red]MISSED[/bold red]"
        console.print(f"target {t['name']}: {t['value']} (target {t['target']}) {mark}")
    save_outputs(result, panels, json_out=json_out, plot=plot)


def _setup_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


@app.command("kernels")
def kernels(
    device: DeviceOpt = "auto",
    kernel: Annotated[
        str,
        typer.Option(
            "--kernels",
            help="Kernels to run beside the reference (unavailable ones are skipped, said so).",
        ),
    ] = "cpp,cuda,triton",
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,4,8",
    sizes: Annotated[str, typer.Option(help="Output sides H = W, comma-separated.")] = "512,1024",
    logits: Annotated[int, typer.Option(min=1, help="Logits side h = w.")] = 128,
    reductions: Annotated[
        str, typer.Option(help="mean, max, sum, weighted, mse (= mean with a target map).")
    ] = "mean,max,weighted,mse",
    repeat: Annotated[int, typer.Option(min=1, help="Timed runs per configuration.")] = 5,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """Time and peak extra memory of dd.ops.artifact_confidence_loss vs its eager reference.

    Forward + backward of loss.mean() on the same logits, each kernel interleaved with the
    reference; ratios = reference / kernel time and kernel / reference memory.
    """
    from dd.engines.bench import bench_kernels, kernels_markdown, kernels_panels
    from dd.runtime.device import resolve_device

    _setup_threads(threads)
    dev = resolve_device(device)
    with _progress("kernels") as progress:
        result = bench_kernels(
            device=dev,
            kernels=_names(kernel),
            batches=_ints(batch, "--batch"),
            sizes=_ints(sizes, "--sizes"),
            logits_side=logits,
            reductions=_names(reductions),
            repeat=repeat,
            on_progress=progress,
        )
    err = Console(stderr=True)
    for name, why in result["skipped"].items():
        err.print(f"[yellow]skipped[/yellow] {name}: {why}", highlight=False)
    _report(result, kernels_markdown, kernels_panels, json_out, plot, markdown)


@app.command("treat")
def treat(
    device: DeviceOpt = "auto",
    backbone: Annotated[str, typer.Option(help="Backbone plugin: flux, sd15, sd3, sdxl.")] = "flux",
    model: Annotated[
        str | None,
        typer.Option(help="Benchmark this model (folder, file or hub id) instead of a built one."),
    ] = None,
    full_size: Annotated[
        str | None,
        typer.Option(
            "--full-size",
            help="flux: FLUX.1-dev's real transformer (~12B) and VAE with random bf16 weights "
            "and a SegFormer MiT-b5 (needs a GPU; --device meta counts parameters and FLOPs).",
        ),
    ] = None,
    resolution: Annotated[
        str | None,
        typer.Option(help="Image sides, comma-separated (default 64,128; full size 1024)."),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(min=1, help="Sampling steps (default 4; full size 10 as flux-dev)."),
    ] = None,
    grad_steps: Annotated[
        str | None,
        typer.Option(help="K values: tracked steps, e.g. 1,2,all (full size: 1,all)."),
    ] = None,
    modes: Annotated[
        str | None,
        typer.Option(
            help="naive (no checkpointing), blocks (denoiser blocks only), checkpointed "
            "(dd treat's: steps, blocks, VAE, detector). Default naive,checkpointed; "
            "full size checkpointed,naive."
        ),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="Frozen models' dtype (default fp32; full size bf16).")
    ] = None,
    lora_rank: Annotated[int, typer.Option(min=1, help="LoRA rank.")] = 16,
    batch: Annotated[int, typer.Option(min=1, help="Images per step.")] = 1,
    detector_variant: Annotated[
        str | None,
        typer.Option(help="SegFormer variant, random weights (default small; else b5)."),
    ] = None,
    detector_size: Annotated[
        int | None,
        typer.Option(min=32, help="Detector input side (default 64; else 512)."),
    ] = None,
    repeat: Annotated[int, typer.Option(min=1, help="Timed steps per configuration.")] = 3,
    flops: Annotated[
        bool, typer.Option(help="Count FLOPs of each configuration (one more step each).")
    ] = True,
    peak_tflops: Annotated[
        float | None,
        typer.Option(help="Device peak TFLOP/s for the FLOP-bound fraction (default: table)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of weights, noise and LoRA init.")] = 0,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """Peak memory and time of one treat step vs K, resolution and checkpointing.

    The step is dd treat's: sample with gradients through the last K denoising steps, decode,
    detector, loss, backward. With checkpointing, peak memory should not grow with K; naive
    backprop keeps every tracked step's activations.
    """
    from dd.engines.bench import (
        bench_treat,
        full_size_flux_setup,
        parse_grad_steps,
        pretrained_treat_setup,
        tiny_treat_setup,
        treat_markdown,
        treat_panels,
    )
    from dd.errors import DDError, UsageError
    from dd.runtime.device import resolve_device, resolve_dtype

    _setup_threads(threads)
    dev = resolve_device(device)
    big = full_size is not None or model is not None
    dt = resolve_dtype(dtype or ("bf16" if full_size else "fp32"))
    variant = detector_variant or ("b5" if big else "small")
    det_size = detector_size or (512 if big else 64)
    err = Console(stderr=True)
    if full_size is not None:
        if full_size.lower() != "flux":
            raise DDError(f"no full-size configuration {full_size!r}", hint="use --full-size flux")
        if model is not None or backbone != "flux":
            raise UsageError(
                "--full-size flux builds its own model", hint="drop --model/--backbone"
            )
        if dev.type not in ("cuda", "meta"):
            raise DDError(
                f"--full-size flux needs a GPU (about 40 GiB), not {dev}",
                hint="run it on a CUDA machine, or --device meta to count parameters and FLOPs",
            )
        n_steps = steps or 10
        err.print(f"building FLUX.1-dev at full size on {dev} ...", highlight=False)
        setup = full_size_flux_setup(
            device=dev,
            dtype=dt,
            steps=n_steps,
            lora_rank=lora_rank,
            batch=batch,
            seed=seed,
            detector_variant=variant,
            detector_size=det_size,
        )
        sides = _ints(resolution or "1024", "--resolution")
        ks = parse_grad_steps(grad_steps or "1,all", n_steps)
        mode_list = _names(modes or "checkpointed,naive")
    else:
        if dev.type == "meta":
            raise UsageError("--device meta is for --full-size flux", hint="use cpu or cuda")
        if model is not None:
            setup = pretrained_treat_setup(
                backbone,
                model,
                device=dev,
                dtype=dt,
                steps=steps,
                lora_rank=lora_rank,
                detector_variant=variant,
                detector_size=det_size,
                batch=batch,
                seed=seed,
            )
            default_sides = str(setup.backbone.default_resolution)
        else:
            setup = tiny_treat_setup(
                backbone,
                device=dev,
                dtype=dt,
                steps=steps or 4,
                lora_rank=lora_rank,
                detector_variant=variant,
                detector_size=det_size,
                batch=batch,
                seed=seed,
            )
            default_sides = "64,128"
        sides = _ints(resolution or default_sides, "--resolution")
        ks = parse_grad_steps(grad_steps or "1,2,all", setup.steps)
        mode_list = _names(modes or "naive,checkpointed")
    with _progress("treat") as progress:
        result = bench_treat(
            setup,
            resolutions=sides,
            grad_steps=ks,
            modes=mode_list,
            repeat=repeat,
            flops=flops,
            peak_tflops=peak_tflops,
            on_progress=progress,
        )
    _report(result, treat_markdown, treat_panels, json_out, plot, markdown)


@app.command("detect")
def detect(
    device: DeviceOpt = "auto",
    weights: Annotated[
        str | None,
        typer.Option(help="SegFormer weights (file, folder or hub id); default: random --variant."),
    ] = None,
    variant: Annotated[
        str, typer.Option(help="Variant of the random detector when no --weights (b5: released).")
    ] = "b5",
    input_size: Annotated[
        int | None, typer.Option(min=32, help="Detector input side (default: the weights', 512).")
    ] = None,
    images: Annotated[int, typer.Option(min=1, help="Number of synthetic test images.")] = 32,
    size: Annotated[int, typer.Option(min=32, help="Side of the test images.")] = 1024,
    repeat: Annotated[int, typer.Option(min=1, help="Alternating rounds of both approaches.")] = 3,
    batch_size: Annotated[int, typer.Option(min=1, help="dd detect's batch size.")] = 8,
    workers: Annotated[int, typer.Option(min=1, help="dd detect's loader/writer threads.")] = 4,
    overlays: Annotated[
        bool, typer.Option(help="dd detect writes overlays (--no-overlays: maps and reports).")
    ] = True,
    full_size_outputs: Annotated[
        bool, typer.Option(help="dd detect writes full-size PNG maps and overlays.")
    ] = False,
    dtype: Annotated[
        str, typer.Option(help="dd detect's dtype: auto (its default), fp32 or bf16.")
    ] = "auto",
    seed: Annotated[int, typer.Option(help="Seed of the images and random weights.")] = 0,
    threads: ThreadsOpt = 0,
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
    markdown: MarkdownOpt = False,
) -> None:
    """Images per second of dd detect vs the released per-image loop, same images and weights.

    The released loop (DiffDoctor's demo): one image per forward in fp32, cv2 read and resize,
    the SegFormer image processor, model, upsample, sigmoid, heat-map overlay, cv2 write.
    dd detect as a user runs it by default: threaded decoding, batches, --dtype auto (bf16 where
    the device has native bf16), working-size maps, overlay thumbnails, reports.
    """
    import torch

    from dd.api.plugins import get_detector_class
    from dd.engines.bench import bench_detect, detect_markdown, detect_panels
    from dd.runtime.device import resolve_device

    _setup_threads(threads)
    dev = resolve_device(device)
    cls = get_detector_class("segformer")
    det = cls.load(
        weights,
        device=dev,
        dtype=torch.float32,
        variant=None if weights else variant,
        input_size=input_size,
        seed=seed,
    )
    with _progress("detect") as progress:
        result = bench_detect(
            det,
            images=images,
            size=size,
            repeat=repeat,
            batch_size=batch_size,
            workers=workers,
            overlays=overlays,
            full_size_outputs=full_size_outputs,
            dtype=dtype,
            seed=seed,
            on_progress=progress,
        )
    _report(result, detect_markdown, detect_panels, json_out, plot, markdown)


@app.command("quantize")
def quantize(
    modes: Annotated[
        str, typer.Option(help="Comma-separated --quantize modes to measure.")
    ] = "none,int8,fp8,nf4",
    num_layers: Annotated[
        int, typer.Option(min=1, help="Double blocks of the FLUX-structured transformer.")
    ] = 2,
    num_single_layers: Annotated[int, typer.Option(min=1, help="Its single blocks.")] = 4,
    heads: Annotated[
        int, typer.Option(min=1, help="Attention heads of width 128 (FLUX.1: 24).")
    ] = 8,
    json_out: JsonOpt = None,
    markdown: MarkdownOpt = False,
    threads: ThreadsOpt = 0,
) -> None:
    """Parameter memory of a frozen FLUX-structured transformer per --quantize mode.

    The transformer has FLUX.1-dev's config with fewer, narrower blocks (the defaults: about
    0.2B parameters); it is built in bf16 and quantised as `dd treat --quantize` does. The
    ratios to bf16 are what a 24/48/80 GB card budget needs (docs/performance.md).
    """
    from dd.engines.bench import bench_quantize, quantize_markdown
    from dd.errors import UsageError
    from dd.ops.quantize import QUANTIZE_MODES

    _setup_threads(threads)
    names = _names(modes)
    bad = [m for m in names if m not in QUANTIZE_MODES]
    if bad or not names:
        raise UsageError(
            f"unknown --modes {','.join(bad) or modes!r}", hint=f"from {', '.join(QUANTIZE_MODES)}"
        )
    config = {"num_layers": num_layers, "num_single_layers": num_single_layers,
              "num_attention_heads": heads}  # fmt: skip
    with _progress("quantize") as progress:
        result = bench_quantize(names, config=config, on_progress=progress)
    _report(result, quantize_markdown, None, json_out, None, markdown)


@app.command("gpu")
def gpu(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the report.")] = Path(
        "dd-gpu-check"
    ),
    budget_s: Annotated[
        float,
        typer.Option(
            min=10,
            help="Seconds the whole check may take (checks that would not fit "
            "are skipped and say so).",
        ),
    ] = 480.0,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the report of an earlier check in --out.")
    ] = False,
) -> None:
    """Everything dd has not yet run on a GPU, in one command within a budget.

    In order of value: the fused-loss CUDA/Triton kernels against the reference; treat,
    detect, refine and generate one step each on tiny pipelines in bf16 and fp16 and with each
    --quantize mode; a FLUX.1-dev treat step at 1024² (bf16 and quantised: memory, time, share
    of the FLOP bound); dd bench detect with MiT-b5. Each check runs in its own process, a
    failure never stops the rest. Writes OUT/gpu-check.json and OUT/gpu-check.md and prints a
    verdict per check; exit 1 when a check failed.
    """
    from dd.engines.gpu_check import run_gpu_check
    from dd.errors import DDError
    from dd.runtime.io import check_output_folder, mark_run_folder
    from dd.runtime.progress import ConsoleReporter

    check_output_folder(out, "bench gpu", overwrite=overwrite)
    if (out / "gpu-check.json").exists() and not overwrite:
        raise DDError(
            f"{out} already holds a gpu-check.json",
            hint="pass --overwrite to replace it, or choose a new --out",
        )
    out.mkdir(parents=True, exist_ok=True)
    mark_run_folder(out, "bench gpu")
    report = run_gpu_check(out, budget_s=budget_s, reporter=ConsoleReporter(Console()))
    Console().print(f"report: {out / 'gpu-check.md'}", highlight=False)
    if any(c["verdict"] == "fail" for c in report["checks"]):
        raise typer.Exit(1)
