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
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dd.errors import DDError
from dd.runtime.io import atomic_write_bytes, atomic_write_json

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


def write_trainer_state(
    folder: Path, state: dict[str, Any], scheduler: Any, world_size: int, **extra: Any
) -> None:
    """``folder/trainer.json`` (written last: it marks the checkpoint complete): the loop
    ``state``, the learning-rate ``scheduler``'s state, the number of processes and
    ``extra`` fields (read back with :func:`read_trainer_state`)."""
    trainer = {"state": state, "scheduler": scheduler.state_dict(), "world_size": world_size}
    atomic_write_json(folder / MARKER, {**trainer, **extra})


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


# ------------------------------------------------------------------------------------------
# Run folders and checkpoints of the LoRA / fine-tuning engines (treat, dreambooth,
# refine train): OUT/config.toml, OUT/checkpoints/last/ (trainable.safetensors, state.pt,
# rng_rank*.pt, trainer.json), OUT/pytorch_lora_weights.safetensors.
# ------------------------------------------------------------------------------------------
#: The diffusers-format LoRA file of a run (and of each checkpoint).
LORA_FILE = "pytorch_lora_weights.safetensors"
#: The trained parameters in a checkpoint, by name, in float32.
TRAINABLE_FILE = "trainable.safetensors"


def prepare_run_folder(
    out: Path,
    resume: bool,
    what: str,
    files: Sequence[str],
    log: Callable[[str], None] | None = None,
    *,
    overwrite: bool = False,
    command: str | None = None,
    allowed: tuple[str, ...] = (),
) -> Path | None:
    """The checkpoint ``out/checkpoints/last`` to resume from (None: a new run).

    Refuses to start a new ``what`` run in a folder that already holds one of ``files``
    unless ``resume`` or ``overwrite`` (which deletes that run's ``files``, ``best/``,
    ``config.toml`` and dd's record, so nothing of it can be resumed or mistaken for the new
    run's); a folder holding another command's results or files dd did not write is refused
    unless ``overwrite`` (:func:`dd.runtime.io.check_output_folder`, ``command`` defaults to
    ``what``; ``allowed`` entries are the command's own inputs). ``log``, if given, is told
    when ``resume`` finds such a folder but no checkpoint (the run then starts from step 0).
    """
    from dd.errors import UsageError
    from dd.runtime.io import RUN_MARKER, check_output_folder

    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other", hint="pick one")
    if not any((out / p).exists() for p in files):  # not this kind of run: the general rule
        check_output_folder(out, command or what, overwrite=overwrite, allowed=allowed)
    if overwrite:
        # Every process of a multi-GPU run gets here: a file another one removed is fine.
        for name in (*files, "best", "config.toml", RUN_MARKER):
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return None
    last = find_checkpoint(out / "checkpoints" / "last") if resume else None
    if last is None:
        taken = [p for p in files if (out / p).exists()]
        if taken and not resume:
            raise DDError(
                f"{out} already holds a {what} run",
                hint="pass --resume to continue it, --overwrite to replace it, "
                "or choose a new --out folder",
            )
        if taken and log is not None:
            log(f"[yellow]no checkpoint in {out}; starting from step 0[/yellow]")
    return last


def check_resume_config(
    out: Path,
    now: dict[str, Any],
    resumable: Collection[str],
    defaults: dict[str, Any] | None = None,
) -> None:
    """Refuses to resume the run in ``out`` with settings (other than ``resumable`` ones)
    that differ from its ``config.toml``; a setting the file lacks (a run of an older dd)
    counts as its default in ``defaults``."""
    from dd.runtime.config import load_toml

    saved = out / "config.toml"
    try:
        before = load_toml(saved)
    except DDError:
        raise DDError(f"{saved} is missing or damaged; cannot resume") from None
    check_same_settings(out, saved.name, {**(defaults or {}), **before}, now, resumable)


def check_same_settings(
    out: Path,
    saved: str,
    before: dict[str, Any],
    now: dict[str, Any],
    resumable: Collection[str],
) -> None:
    """Refuses to resume the run in ``out`` when settings ``now`` (other than ``resumable``
    ones) differ from those it saved (``before``, read from the file named ``saved``)."""
    diff = sorted(k for k in now if k not in resumable and before.get(k) != now.get(k))
    if diff:
        raise DDError(
            f"--resume with different settings than the run in {out}: "
            + ", ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in diff),
            hint=f"resume with the original options (see {saved}) or use a new --out",
        )


def save_run_config(
    out: Path,
    resolved: dict[str, Any],
    command: str,
    *,
    resuming: bool,
    resumable: Collection[str],
    main: bool,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Checks a resumed run's settings against ``out/config.toml`` (see
    :func:`check_resume_config`), then (on the main process) writes ``resolved`` there."""
    from dd.runtime.config import save_config
    from dd.runtime.io import mark_run_folder, record_paths

    resolved = record_paths(resolved)
    if resuming:
        check_resume_config(out, resolved, resumable, record_paths(defaults or {}))
    if main:
        header = [
            f"dd {command}: resolved configuration of the run in {out}",
            "Read it back with --config; (unset) lines take the defaults.",
        ]
        mark_run_folder(out, command, not_inputs=("curves.png",))  # once the models loaded
        save_config(out / "config.toml", resolved, header=header)


def save_lora_file(backbone: Any, folder: Path) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` written whole or not at all."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".lora-{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        written = backbone.save_lora(tmp)
        with open(written, "rb") as f:
            os.fsync(f.fileno())
        os.replace(written, folder / LORA_FILE)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder / LORA_FILE


def trainable_weights(
    names: Sequence[str], params: Sequence[torch.nn.Parameter]
) -> dict[str, torch.Tensor]:
    """The trained parameters by name, as contiguous float32 CPU tensors."""
    return {
        n: p.detach().to("cpu", torch.float32).contiguous()
        for n, p in zip(names, params, strict=True)
    }


def open_checkpoint(acc: Any, ckpt_dir: Path, step: int) -> Path:
    """Starts the checkpoint of ``step``: the main process makes an empty
    ``ckpt_dir/.tmp-step-N``, then every process saves its RNG state there."""
    tmp = ckpt_dir / f".tmp-step-{step}"
    acc.wait_for_everyone()
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    save_tensors(tmp / f"rng_rank{acc.process_index}.pt", rng_state())
    return tmp


def save_optimizer_state(folder: Path, optimizer: Any, acc: Any) -> None:
    """``folder/state.pt``: the optimizer's and the grad scaler's states."""
    scaler = acc.scaler.state_dict() if acc.scaler is not None else None
    save_tensors(folder / "state.pt", {"optimizer": optimizer.state_dict(), "scaler": scaler})


def commit_checkpoint(tmp: Path, ckpt_dir: Path, step: int, keep_step: bool) -> None:
    """Makes the complete folder ``tmp`` the checkpoint ``ckpt_dir/last`` (main process
    only); with ``keep_step`` it is kept as ``ckpt_dir/step-N`` too."""
    if keep_step:
        named = ckpt_dir / f"step-{step}"
        fsync_tree(tmp)
        shutil.rmtree(named, ignore_errors=True)
        os.replace(tmp, named)
        copy = ckpt_dir / ".last.tmp"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(named, copy)
        swap_in(copy, ckpt_dir / "last")
    else:
        swap_in(tmp, ckpt_dir / "last")


def load_optimizer_state(last: Path, optimizer: Any, acc: Any) -> None:
    """Restores what :func:`save_optimizer_state` and :func:`open_checkpoint` saved in
    ``last``: optimizer, grad scaler and this process's RNG states."""
    state = load_tensors(last / "state.pt")
    optimizer.load_state_dict(state["optimizer"])
    if acc.scaler is not None and state.get("scaler"):
        acc.scaler.load_state_dict(state["scaler"])
    set_rng_state(load_tensors(last / f"rng_rank{acc.process_index}.pt"))
