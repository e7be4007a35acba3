"""Atomic file output: a run killed at any moment leaves whole files or none."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success fsync and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_image_atomic(image: Any, path: str | os.PathLike, **save_kwargs: Any) -> None:
    """Save a PIL image (format from the suffix) atomically."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(
        path.suffix.lower(), "PNG"
    )
    with atomic_open(path, "wb") as f:
        image.save(f, format=fmt, **save_kwargs)


class Journal:
    """An append-only JSONL log that survives being killed mid-write.

    Each record is one line, flushed and fsynced. On reopen, a torn last line (no newline,
    or not JSON) is dropped and the file is rewritten atomically without it.
    """

    def __init__(self, path: str | os.PathLike, *, fresh: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: list[dict[str, Any]] = []
        #: Called with each appended record once it is on disk (a run's tracker).
        self.on_append: Any = None
        if fresh and self.path.exists():
            self.path.unlink()
        if self.path.exists():
            raw = self.path.read_bytes()
            lines = raw.split(b"\n")
            good: list[bytes] = []
            for line in lines[:-1]:  # the part after the last newline is torn or empty
                try:
                    self.records.append(json.loads(line))
                    good.append(line)
                except ValueError:
                    continue
            if lines[-1] or len(good) != len(lines) - 1:
                atomic_write_bytes(self.path, b"".join(g + b"\n" for g in good))
        self._f = open(self.path, "ab")  # noqa: SIM115 - closed in close()

    def append(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True).encode() + b"\n")
        self._f.flush()
        os.fsync(self._f.fileno())
        self.records.append(record)
        if self.on_append is not None:
            self.on_append(record)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ------------------------------------------------------------------------------------------
# Output folders. Every command that writes a folder of results marks it with RUN_MARKER
# (a ``.dd/`` folder holding ``run.json``), so input scans can leave dd's own outputs alone.
# ------------------------------------------------------------------------------------------
RUN_MARKER = ".dd"


def output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """``path`` as an output folder: created if missing; an error if it is a file."""
    from dd.errors import DDError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DDError(
            f"{what} {path} is a file, not a folder",
            hint="name a new or existing folder for the results",
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DDError(
            f"cannot create the {what} folder {path}: {e.strerror or e}",
            hint="name a folder you can write to",
        ) from None
    return path


def mark_run_folder(
    path: str | os.PathLike, command: str, not_inputs: tuple[str, ...] = ()
) -> Path:
    """Create the output folder ``path`` and mark it as written by ``dd COMMAND``.

    ``not_inputs`` names the entries of the folder (files or subfolders) that are pictures
    about the results, not results a later command should take as input images (a grid,
    overlays, maps, masks): a folder named as input skips them (see
    :func:`dd.data.images.collect_inputs`)."""
    from dd import __version__

    path = output_dir(path)
    marker = path / RUN_MARKER / "run.json"
    record = {"command": command, "dd_version": __version__}
    if not_inputs:
        record["not_inputs"] = sorted(not_inputs)
    try:
        same = json.loads(marker.read_text()).get("not_inputs", []) == record.get("not_inputs", [])
    except (OSError, ValueError, AttributeError):
        same = False
    if not marker.exists() or not same:
        atomic_write_json(marker, record)
    return path


def not_inputs(folder: str | os.PathLike) -> set[str]:
    """Names of the entries of ``folder`` that are not input images: what its dd command
    declared (:func:`mark_run_folder`), and ``masks`` of a dataset (``manifest.jsonl`` beside
    ``masks/``)."""
    folder = Path(folder)
    names: set[str] = set()
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        names.update(json.loads((folder / RUN_MARKER / "run.json").read_text())["not_inputs"])
    if (folder / "manifest.jsonl").is_file() and (folder / "masks").is_dir():
        names.add("masks")
    return names


def run_command(path: str | os.PathLike) -> str | None:
    """The ``dd`` command whose results folder ``path`` is (its marker), or None."""
    try:
        return json.loads((Path(path) / RUN_MARKER / "run.json").read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        return None


def check_output_folder(
    path: str | os.PathLike,
    command: str,
    *,
    overwrite: bool = False,
    what: str = "--out",
    allowed: tuple[str, ...] = (),
) -> None:
    """The one rule for an existing output folder, checked before anything is loaded or
    written: new or empty is fine; one holding another command's run, or files no dd
    command wrote, is refused unless ``overwrite``. A folder holding a ``dd COMMAND`` run is
    left to the command (resume it, or refuse it with its own words). ``allowed`` names
    entries the command itself reads there (DreamBooth's ``class_images``)."""
    from dd.errors import DDError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DDError(
            f"{what} {path} is a file, not a folder",
            hint="name a new or existing folder for the results",
        )
    if overwrite or not path.is_dir():
        return
    kind = run_command(path)
    if kind == command:
        return
    entries = [p.name for p in path.iterdir() if p.name != RUN_MARKER and p.name not in allowed]
    if kind is not None:
        raise DDError(
            f"{what} {path} holds the results of `dd {kind}`",
            hint=f"choose a new folder for `dd {command}`, or pass --overwrite to write into it",
        )
    if entries:
        raise DDError(
            f"{what} {path} is not empty ({len(entries)} entries dd {command} did not write)",
            hint="choose a new or empty folder, or pass --overwrite to write into it",
        )


#: What a dataset folder holds (dd.data.datasets); importers merge into such a folder.
DATASET_ENTRIES = frozenset({"images", "masks", "manifest.jsonl", "missing.txt", RUN_MARKER})


def check_dataset_folder(
    path: str | os.PathLike, command: str, *, overwrite: bool = False, what: str = "--out"
) -> None:
    """The rule for an importer's output: a new folder, or one holding a dataset (its
    samples are kept and merged with the new ones); a folder holding anything else is
    refused unless ``overwrite`` (see :func:`check_output_folder`)."""
    path = Path(path)
    if (
        path.is_dir()
        and all(p.name in DATASET_ENTRIES for p in path.iterdir())
        and run_command(path) in (None, command)
    ):
        return
    check_output_folder(path, command, overwrite=overwrite, what=what)


def _tree(folder: Path) -> set[Path]:
    return set(folder.rglob("*")) if folder.is_dir() else set()


@contextlib.contextmanager
def undo_if_nothing_written(
    folder: str | os.PathLike, bookkeeping: tuple[str, ...] = ()
) -> Iterator[None]:
    """Runs the body; if it fails (an error or Ctrl-C) before writing any result into
    ``folder``, removes what it wrote there (its marker, settings, empty journal,
    ``bookkeeping`` files given by name relative to ``folder``) and the folder itself if the
    body created it. So a run that fails on its inputs leaves nothing that blocks the
    corrected rerun. Results are new non-empty files outside ``.dd/`` other than
    ``bookkeeping``;
    once one exists, everything stays (``--resume`` continues from it)."""
    folder = Path(folder)
    existed = folder.exists()
    before = _tree(folder)
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            new = _tree(folder) - before
            results = [
                p
                for p in new
                if not p.is_dir()
                and p.stat().st_size > 0  # an empty journal or shard holds no result
                and p.relative_to(folder).parts[0] != RUN_MARKER
                and p.relative_to(folder).as_posix() not in bookkeeping
                and not p.name.endswith(".tmp")
            ]
            if not results:
                for p in new:
                    if not p.is_dir():
                        p.unlink()
                for d in sorted((d for d in new if d.is_dir()), key=lambda d: -len(d.parts)):
                    if not any(d.iterdir()):
                        d.rmdir()
                if not existed and not any(folder.iterdir()):
                    folder.rmdir()
        raise


def is_run_folder(path: str | os.PathLike) -> bool:
    """True for a folder some dd command wrote its results to (see :func:`mark_run_folder`)."""
    return (Path(path) / RUN_MARKER).is_dir()


INCOMPLETE = f"{RUN_MARKER}/incomplete.json"


def mark_incomplete(folder: str | os.PathLike, command: str) -> None:
    """Say that ``dd COMMAND`` is writing ``folder``; :func:`mark_complete` takes it back.
    A folder still marked (the command failed or was killed) is refused by readers."""
    atomic_write_json(Path(folder) / INCOMPLETE, {"command": command})


def mark_complete(folder: str | os.PathLike) -> None:
    with contextlib.suppress(FileNotFoundError):
        (Path(folder) / INCOMPLETE).unlink()


def check_complete(folder: str | os.PathLike, what: str = "dataset") -> None:
    """A ``DDError`` if a command that wrote ``folder`` did not finish."""
    path = Path(folder) / INCOMPLETE
    if not path.is_file():
        return
    from dd.errors import DDError

    try:
        command = json.loads(path.read_text()).get("command", "a dd command")
    except (OSError, ValueError, AttributeError):
        command = "a dd command"
    raise DDError(
        f"{folder} is an incomplete {what}: `{command}` did not finish writing it",
        hint=f"rerun `{command}` with the same arguments, or delete the folder",
    )


#: Settings that name an input file or folder. Run records store them absolute, so a record
#: read from another directory (``dd refine --segment RUN``, ``--resume``) finds them.
PATH_SETTINGS = frozenset(
    {
        "model",
        "init",
        "init_lora",
        "data",
        "dataset",
        "datasets",
        "val",
        "val_data",
        "instance_dir",
        "class_dir",
        "mask",
        "weights",
        "detector_weights",
        "prompts",
        "eval_prompts",
        "reg_data",
        "instance_data",
        "class_data",
        "refs",
        "inception",
        "clip_model",
        "pickscore_model",
        "image_reward_model",
        "loras",
        "inputs",
        "segments",
        "out",
    }
)


def absolute_path(value: Any) -> Any:
    """A relative path that exists (or an ``out`` folder) made absolute; anything else (a
    hub id such as ``org/model``, None) unchanged."""
    if isinstance(value, (list, tuple)):
        return type(value)(absolute_path(v) for v in value)
    if not isinstance(value, (str, os.PathLike)):
        return value
    text = os.fspath(value)
    expanded = os.path.expanduser(text)
    if os.path.isabs(expanded) or not os.path.exists(expanded):
        return expanded if os.path.isabs(expanded) else value
    return os.path.abspath(expanded)


def record_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with every input path (:data:`PATH_SETTINGS`) absolute."""
    out = dict(settings)
    for key in PATH_SETTINGS & set(out):
        if key == "out" and isinstance(out[key], (str, os.PathLike)):
            out[key] = os.path.abspath(os.path.expanduser(os.fspath(out[key])))
        else:
            out[key] = absolute_path(out[key])
    return out


def absolutize(cfg: Any) -> Any:
    """A copy of the dataclass ``cfg`` with its input paths (:data:`PATH_SETTINGS` but
    ``out``) absolute: engines call it first, so every record they write is self-contained."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(cfg)} & (PATH_SETTINGS - {"out", "segments"})
    return dataclasses.replace(cfg, **{n: absolute_path(getattr(cfg, n)) for n in names})


# ------------------------------------------------------------------------------------------
# Shared JSON-lines logs (labelling decisions, study votes): many writers, whole lines.
# ------------------------------------------------------------------------------------------
try:  # POSIX only; on other systems the thread lock alone guards appends
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class JsonlLog:
    """An append-only JSON-lines file shared by threads and processes.

    Each :meth:`append` writes one complete line with a single ``write`` on an ``O_APPEND``
    descriptor while holding a thread lock and an exclusive ``flock``, then fsyncs; readers
    (:func:`read_jsonl`) skip a torn last line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        line = json.dumps(record, sort_keys=True, ensure_ascii=False).encode() + b"\n"
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    # A torn last line (a killed writer) would glue onto ours: start fresh.
                    size = os.fstat(fd).st_size
                    if size:
                        with open(self.path, "rb") as f:
                            f.seek(size - 1)
                            if f.read(1) != b"\n":
                                line = b"\n" + line
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    if fcntl is not None:
                        fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        return record

    def read(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; blank, torn or non-object lines are skipped."""
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError):
        for line in Path(path).read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out
