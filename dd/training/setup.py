"""Settings every training job declares the same way."""

from __future__ import annotations

from typing import Any

__all__ = [
    "EMBEDDING_CACHE_HELP",
    "PRECISIONS",
    "RESUMABLE",
    "embed_prompts",
    "training_accelerator",
]

#: dd's precision names (``--dtype``/``--precision``) -> accelerate's ``mixed_precision``.
PRECISIONS: dict[str, str] = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

#: Settings a resumed training run may change (they do not change its results); an engine
#: adds its own (train-detector: ``workers``).
RESUMABLE: frozenset[str] = frozenset({"resume", "overwrite", "stop_at", "report_to"})


def training_accelerator(device: str, mixed_precision: str, hint: str | None = None) -> Any:
    """The ``accelerate.Accelerator`` of a training job run by :func:`dd.training.loop.fit`
    (``device``: auto, cpu or cuda; ``mixed_precision``: accelerate's no, bf16 or fp16). The
    loop accumulates gradients itself, so accelerate's accumulation stays at one step."""
    from dd.runtime.device import make_accelerator

    return make_accelerator(device, mixed_precision, 1, hint=hint)


#: Help of every training command's ``--embedding-cache``.
EMBEDDING_CACHE_HELP = (
    "Folder of prompt embeddings, reused across runs and by --resume (default "
    "$DD_CACHE_DIR/embeddings or ~/.cache/dd/embeddings); 'none' keeps them in memory only."
)


def embed_prompts(
    backbone: Any,
    prompts: list[str],
    *,
    cache: str | None,
    offload: bool,
    reporter: Any,
) -> None:
    """A training job's prompts embedded once before its first step: into the store on
    disk (``cache``: a folder, None for the default, ``"none"`` for none), then, with
    ``offload``, the text encoders leave the GPU (a FLUX user gets T5-XXL's ~9.5 GB back).
    Training then holds at most ``backbone.prompt_memory`` embeddings in memory."""
    if cache == "none":
        return
    store = backbone.use_embedding_store(cache)
    unique = list(dict.fromkeys(prompts))
    bar = reporter.progress("embed prompts")
    with bar:
        task = bar.add_task("embed", total=len(unique))
        done = len(unique) - backbone.embed_prompts(unique, on_batch=lambda n: bar.advance(task, n))
        bar.update(task, completed=len(unique))
    reporter.message(
        f"prompt embeddings: {len(unique) - done} computed, {done} reused ({store.folder})"
    )
    if offload:
        backbone.release_text_encoders()
