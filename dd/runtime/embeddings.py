"""Prompt embeddings on disk: computed once per (text encoders, prompt), reused by later
runs and by ``--resume``, so training holds only a bounded number of them in memory and
the text encoders can leave the GPU before the first step.

Layout: ``ROOT/<namespace>/<key[:2]>/<key>.safetensors``, one file per prompt, written
atomically. ``namespace`` is a hash of what the embedding depends on (the backbone's model,
its text-encoder files, dtype, device type, encoder options: see
``dd.api.backbones.Backbone.embedding_namespace``); ``key`` is the backbone's cache key of the
prompt (a hash of the prompt and anything the encoding adds to it, such as SD1.5's negative
prompt). ``ROOT`` is ``--embedding-cache``, else ``$DD_CACHE_DIR/embeddings``, else
``$DD_HOME/embeddings``, else ``$XDG_CACHE_HOME/dd/embeddings`` (``~/.cache/dd/embeddings``).
Delete the folder to reclaim the space: everything in it is recomputed on demand.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from dd.runtime.io import atomic_write_bytes

__all__ = ["EmbeddingStore", "default_cache_root"]


def default_cache_root() -> Path:
    """Where embeddings go unless a command is told otherwise: ``$DD_CACHE_DIR/embeddings``,
    else ``$DD_HOME/embeddings`` (dd's data folder, as ``dd eval gen`` uses it), else
    ``$XDG_CACHE_HOME/dd/embeddings`` (``~/.cache/dd/embeddings``)."""
    for var in ("DD_CACHE_DIR", "DD_HOME"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser() / "embeddings"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dd" / "embeddings"


class EmbeddingStore:
    """Named tensors (``None`` allowed) per key, in one namespace of a cache folder."""

    def __init__(self, root: str | os.PathLike, namespace: str):
        self.root = Path(root).expanduser()
        self.folder = self.root / namespace
        self.namespace = namespace

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> dict[str, torch.Tensor | None] | None:
        """The tensors stored under ``key`` (on the CPU), or None (missing or unreadable:
        the caller recomputes and stores them again)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                out: dict[str, torch.Tensor | None] = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            for name in json.loads(meta.get("none", "[]")):
                out[name] = None
            order = json.loads(meta.get("order", "[]"))
        except Exception:  # a torn or foreign file: recompute
            return None
        return {k: out[k] for k in order if k in out} if order else out

    def put(self, key: str, tensors: dict[str, torch.Tensor | None]) -> None:
        """Store ``tensors`` under ``key`` (atomically; a concurrent writer of the same key
        writes the same bytes)."""
        from safetensors.torch import save

        real = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items() if v is not None}
        meta = {
            "none": json.dumps([k for k, v in tensors.items() if v is None]),
            "order": json.dumps(list(tensors)),
        }
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save(real, metadata=meta))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.safetensors")) if self.folder.is_dir() else 0
