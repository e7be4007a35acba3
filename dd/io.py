"""Atomic file output: a run killed at any moment leaves whole files or none."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
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

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
