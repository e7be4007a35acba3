"""Checkpoint files shared by the training engines (detector training, treat, ...).

A checkpoint is a folder written under a temporary name and swapped in atomically
(:func:`swap_in`): at every moment either ``last`` or ``last.old`` is complete, and
:func:`find_checkpoint` looks at both. Tensors are stored with ``torch.save`` of plain
tensors/dicts and read back only with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dd.errors import DDError
from dd.io import atomic_write_bytes

#: The file a complete checkpoint folder always holds (written last).
MARKER = "trainer.json"


def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states as plain tensors and numbers."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    n = state["numpy"]
    key = n["key"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", key, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_tensors(path: Path, obj: Any) -> None:
    """``torch.save`` of plain tensors/dicts/lists, atomically (read with load_tensors)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_tensors(path: Path) -> Any:
    """Read a :func:`save_tensors` file with ``weights_only=True`` (never arbitrary pickles)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DDError(
            f"cannot read checkpoint file {path}: {type(e).__name__}: {str(e)[:200]}",
            hint="the checkpoint is damaged; start a new run or restore it",
        ) from None


def fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())


def swap_in(tmp: Path, final: Path) -> None:
    """Replace the folder ``final`` by ``tmp``: at every moment one of ``final`` or
    ``final.old`` holds a complete copy (:func:`find_checkpoint` looks at both)."""
    fsync_tree(tmp)
    old = final.with_name(final.name + ".old")
    if old.exists() and final.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(folder: Path) -> Path | None:
    """``folder`` or ``folder.old``, whichever is a complete checkpoint, else None."""
    for cand in (folder, folder.with_name(folder.name + ".old")):
        if (cand / MARKER).is_file():
            return cand
    return None


def read_trainer_state(folder: Path, world_size: int) -> dict[str, Any]:
    """The checkpoint's ``trainer.json``; refuses one written by another number of
    processes (the data order depends on it)."""
    try:
        trainer = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError) as e:
        raise DDError(f"cannot read {folder / MARKER}: {e}") from None
    if trainer.get("world_size") != world_size:
        raise DDError(
            f"the checkpoint in {folder} was written by {trainer.get('world_size')} "
            f"process(es), this run has {world_size}",
            hint="resume with the same number of processes (the data order depends on it)",
        )
    return trainer
