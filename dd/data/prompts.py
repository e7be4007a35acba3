"""Prompt files, seed lists and regularisation data (image, prompt pairs) that jobs read."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from dd.errors import DDError

__all__ = ["MAX_SEEDS", "parse_seeds", "read_prompts", "read_reg_data"]


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a ``.txt`` (one per line; blank lines and ``#`` comments skipped), a
    ``.jsonl`` (objects with a ``prompt`` field) or a ``.json`` list of strings."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise DDError(f"cannot read prompts {p}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise DDError(f"prompts file {p} is not UTF-8 text") from None
    prompts: list[str] = []
    if p.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DDError(f"{p}:{n}: not a JSON object") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise DDError(f"{p}:{n}: needs a string field 'prompt'")
            prompts.append(obj["prompt"])
    elif p.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise DDError(f"{p}: invalid JSON: {e}") from None
        if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
            raise DDError(f"{p}: must be a JSON list of prompt strings")
        prompts = list(obj)
    else:
        prompts = [s.strip() for s in text.splitlines()]
        prompts = [s for s in prompts if s and not s.startswith("#")]
    if not prompts:
        raise DDError(f"no prompts in {p}", hint="one prompt per line (.txt) or .jsonl")
    return prompts


#: More seeds than anyone generates per prompt: a larger count is a seed typed as a count.
MAX_SEEDS = 100_000


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """``"0,1,2"`` or ``[0, 1, 2]``: those seeds; ``"4"`` (one number): seeds 0..3;
    ``"5-7"``: seeds 5, 6, 7."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    s = text.strip() if isinstance(text, str) else ""
    try:
        if not isinstance(text, str):
            seeds = [int(x) for x in text]
        elif "," in s:
            seeds = [int(x) for x in s.split(",") if x.strip()]
        elif "-" in s:
            lo, hi = s.split("-", 1)
            if int(hi) - int(lo) >= MAX_SEEDS:
                raise OverflowError
            seeds = list(range(int(lo), int(hi) + 1))
        else:
            n = int(s)
            if n < 1:
                raise ValueError
            if n > MAX_SEEDS:
                raise OverflowError
            seeds = list(range(n))
    except OverflowError:
        raise DDError(
            f"--seeds {text} would make more than {MAX_SEEDS:,} seeds (one number is a count)",
            hint=f"to name one seed, write {s.split('-')[0]}, (a list of one)",
        ) from None
    except ValueError:
        seeds = []
    if not seeds:
        raise DDError(f"bad seeds {text!r}", hint="a count N, a list 0,1,2 or a range 5-7")
    if len(set(seeds)) != len(seeds):
        raise DDError(f"seeds {text!r} repeat a seed", hint="list each seed once")
    return seeds


def read_reg_data(folder: str | os.PathLike) -> list[tuple[Path, str]]:
    """(image, prompt) pairs of a folder: ``manifest.jsonl`` lines with ``image`` (relative
    to the folder) and ``prompt``, or else every image (recursively) with a sidecar ``.txt``
    of the same stem holding its prompt."""
    from dd.data.datasets import read_dataset
    from dd.data.images import IMAGE_SUFFIXES
    from dd.data.shards import is_shard_spec

    if is_shard_spec(str(folder)):  # WebDataset shards (img2dataset: KEY.jpg + KEY.txt)
        samples = read_dataset(str(folder))
        missing = [s.meta.get("shard_key") for s in samples if not s.meta.get("prompt")]
        if missing:
            raise DDError(
                f"{len(missing)} shard sample(s) have no caption (.txt), e.g. {missing[0]}",
                hint="regularisation pairs need KEY.txt captions beside the images",
            )
        return [(s.image, str(s.meta["prompt"])) for s in samples]
    root = Path(folder)
    if not root.is_dir():
        raise DDError(f"--reg-data folder not found: {root}")
    pairs: list[tuple[Path, str]] = []
    manifest = root / "manifest.jsonl"
    if manifest.is_file():
        for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise DDError(f"{manifest}:{n}: not a JSON object") from None
            if (
                not isinstance(obj, dict)
                or not obj.get("image")
                or not isinstance(obj.get("prompt"), str)
            ):
                raise DDError(f"{manifest}:{n}: needs fields 'image' and 'prompt'")
            img = Path(obj["image"])
            pairs.append((img if img.is_absolute() else root / img, obj["prompt"]))
    else:
        missing = []
        for img in sorted(root.rglob("*")):
            if img.suffix.lower() not in IMAGE_SUFFIXES or img.name.startswith("."):
                continue
            txt = img.with_suffix(".txt")
            if txt.is_file():
                pairs.append((img, txt.read_text(encoding="utf-8").strip()))
            else:
                missing.append(img.name)
        if missing:
            raise DDError(
                f"{len(missing)} image(s) in {root} have no prompt, e.g. {missing[0]}",
                hint="put the prompt in a .txt of the same name, or write a manifest.jsonl",
            )
    if not pairs:
        raise DDError(
            f"no (image, prompt) pairs in {root}",
            hint="images with sidecar .txt prompts, or manifest.jsonl with image and prompt",
        )
    return pairs
