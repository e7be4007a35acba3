"""Fetch Debian's wallpaper packages and turn them into a folder of photos for ``dd synth``.

    python scripts/default_detector/fetch_photos.py --out data/photos-train \
        plasma-workspace-wallpapers gnome-backgrounds

Each package is downloaded with ``apt-get download`` (no root, nothing is installed) into
``--cache`` and unpacked with ``dpkg-deb -x``. Every distinct picture is kept once (the largest
of its resolutions; plasma's portrait variants and screenshots are left out), scaled to at most
``--max-side`` pixels and written as a high-quality JPEG. ``SOURCES.tsv`` lists each output
with its package, original path and the package's copyright file; the pictures keep their
packages' licences (GPL-2+, LGPL, CC-BY-SA: read the copyright files) and are never committed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image

Image.MAX_IMAGE_PIXELS = 40_000_000
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def unpack(package: str, cache: Path) -> Path:
    root = cache / package
    if (root / ".done").is_file():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    for old in cache.glob(f"{package}_*.deb"):
        old.unlink()
    subprocess.run(["apt-get", "download", package], cwd=cache, check=True)
    (deb,) = cache.glob(f"{package}_*.deb")
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    (root / ".done").write_text(deb.name + "\n")
    return root


def pictures(root: Path) -> dict[str, Path]:
    """One file per distinct picture: key -> the largest file of that picture."""
    best: dict[str, tuple[int, Path]] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() not in SUFFIXES or not p.is_file() or "screenshot" in p.name:
            continue
        with Image.open(p) as im:
            w, h = im.size
        if min(w, h) < 512 or h > w:  # thumbnails and portrait re-crops of the same picture
            continue
        if "contents" in p.parts:  # plasma: Name/contents/images[_dark]/WxH.ext
            i = p.parts.index("contents")
            key = f"{p.parts[i - 1]}-{p.parent.name}"
        else:  # mate: Elephants_3840x2160.jpg is Elephants.jpg at another size
            stem = re.sub(r"_\d+x\d+$", "", p.stem)
            key = f"{p.parent.name}-{stem}"
        if key not in best or w * h > best[key][0]:
            best[key] = (w * h, p)
    return {k: v for k, (_, v) in sorted(best.items())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packages", nargs="+", help="Debian package names")
    ap.add_argument("--out", type=Path, required=True, help="folder to write (must not exist)")
    ap.add_argument("--cache", type=Path, default=Path("data/debs"), help="download cache")
    ap.add_argument("--max-side", type=int, default=1600)
    ap.add_argument("--exclude", action="append", default=[], help="skip keys containing this")
    args = ap.parse_args(argv)
    if args.out.exists():
        print(f"Error: {args.out} exists (hint: choose a new --out)", file=sys.stderr)
        return 1
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rows = ["file\tpackage\tsource\tcopyright"]
    for package in args.packages:
        root = unpack(package, args.cache)
        copyright_file = next(iter(root.glob("usr/share/doc/*/copyright")), None)
        for key, path in pictures(root).items():
            if any(x in key for x in args.exclude):
                continue
            with Image.open(path) as im:
                im = im.convert("RGB")
                im.thumbnail((args.max_side, args.max_side), Image.LANCZOS)
                name = f"{package}-{key}.jpg"
                im.save(tmp / name, quality=95)
            rel = path.relative_to(root).as_posix()
            rows.append(f"{name}\t{package}\t/{rel}\t{copyright_file}")
    (tmp / "SOURCES.tsv").write_text("\n".join(rows) + "\n")
    tmp.rename(args.out)
    print(f"{len(rows) - 1} pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
