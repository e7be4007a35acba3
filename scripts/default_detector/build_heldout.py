"""Build the held-out set of the default detector from a package that training never uses.

    python scripts/default_detector/build_heldout.py --out tests/data/heldout-photos

Sources: every distinct picture of Debian's ``mate-backgrounds`` (set aside: no training
command reads it), fetched by ``fetch_photos.py``; watermark fonts from ``fonts-lato``,
``fonts-crosextra-caladea``, ``fonts-open-sans`` and ``fonts-comic-neue`` (not installed, so
``dd synth`` never draws with them) and texts that ``dd synth`` does not write.

For each source picture: ``--crops`` clean crops and ``--crops`` other crops with artifacts
(default: watermarks at opacity 0.6-1.0; ``--kinds`` and ``--opacity`` build the sets that
show what the detector cannot see), crop sides drawn log-uniformly from 10-100 % of the picture,
written at ``--size`` pixels (JPEG q92; masks as PNG) in dd's dataset format. Each manifest
row says the source, its group (``photo``: the photographs of ``nature/``;
``graphic``: the abstract and flat designs) and its split
(``calibration`` or ``test``, by source picture, alternating in name order), so that the
image-level threshold is chosen on one half and reported on the other.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dd.data.datasets import Sample, save_mask, write_manifest
from dd.data.synth import _crop_photo, make_sample

HERE = Path(__file__).resolve().parent
FONT_PACKAGES = ("fonts-lato", "fonts-crosextra-caladea", "fonts-open-sans", "fonts-comic-neue")
TEXTS = (
    "ARCHIVE COPY",
    "\u00a9 Northwind Media",
    "unlicensed",
    "fotobank.example",
    "ORIGINAL",
    "Property of Halden Co.",
    "@greyheron_pix",
    "NOT FOR RESALE",
    "Lumen Agency 2019",
    "REVIEW ONLY",
)
PHOTOS = ("nature-",)
SKIP = ("Float-into-MATE", "GreenTraditional")  # MATE logos: clean images with a mark


def fonts(cache: Path) -> list[str]:
    from fetch_photos import unpack  # type: ignore[import-not-found]

    files: list[str] = []
    for package in FONT_PACKAGES:
        root = unpack(package, cache)
        files += sorted(str(p) for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf"))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="dataset folder (must not exist)")
    ap.add_argument("--cache", type=Path, default=Path("data/debs"))
    ap.add_argument("--crops", type=int, default=8, help="clean and watermarked crops per picture")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--opacity", default="0.6-1.0", help="watermark opacity range LOW-HIGH")
    ap.add_argument(
        "--kinds", default="watermark", help="artifact kinds (watermark,warp,patch,smear)"
    )
    args = ap.parse_args(argv)
    opacity = tuple(float(v) for v in args.opacity.split("-"))
    kinds = [k for k in args.kinds.split(",") if k]
    if args.out.exists():
        print(f"Error: {args.out} exists (hint: choose a new --out)", file=sys.stderr)
        return 1
    sys.path.insert(0, str(HERE))
    pics = args.cache / "mate-pictures"
    if not pics.is_dir():
        subprocess.run(
            [sys.executable, str(HERE / "fetch_photos.py"), "--out", str(pics)]
            + ["--cache", str(args.cache), "mate-backgrounds"],
            check=True,
        )
    font_files = fonts(args.cache)
    tmp = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    sources = sorted(p for p in pics.glob("*.jpg") if not any(s in p.name for s in SKIP))
    samples: list[Sample] = []
    n = 0
    for k, src in enumerate(sources):
        key = src.stem.removeprefix("mate-backgrounds-")
        group = "photo" if key.startswith(PHOTOS) else "graphic"
        split = ("calibration", "test")[k % 2]
        photo = np.asarray(Image.open(src).convert("RGB"))
        rng = np.random.default_rng([args.seed, k])
        for j in range(2 * args.crops):
            clean = _crop_photo(rng, photo, args.size, args.size, (0.1, 1.0))
            meta = {"picture": key, "group": group, "split": split}
            image_path = tmp / "images" / f"{n:05d}.jpg"
            if j < args.crops:
                Image.fromarray(clean).save(image_path, quality=92)
                samples.append(Sample(image_path, None, "real", None, 1.0, meta))
            else:
                image, mask, cats = make_sample(
                    rng,
                    clean,
                    kinds,
                    watermark_opacity=opacity,
                    watermark_fonts=font_files,
                    watermark_texts=TEXTS,
                )
                if not cats:
                    continue
                Image.fromarray(image).save(image_path, quality=92)
                mask_path = tmp / "masks" / f"{n:05d}.png"
                save_mask(mask_path, mask)
                samples.append(Sample(image_path, mask_path, "synthetic", cats[0], 1.0, meta))
            n += 1
    write_manifest(tmp, samples)
    lines = [
        "Held-out set of the default detector, built by",
        "scripts/default_detector/build_heldout.py from Debian's mate-backgrounds",
        "(pictures GPL-2+, copyright holders in that package's copyright file:",
        "/usr/share/doc/mate-backgrounds/copyright) with watermarks drawn in fonts from",
        f"{', '.join(FONT_PACKAGES)} (SIL OFL / Apache-2.0).",
        "",
        "source pictures:",
        *(f"  {s.name}" for s in sources),
    ]
    (tmp / "SOURCES.txt").write_text("\n".join(lines) + "\n")
    copyright_file = args.cache / "mate-backgrounds/usr/share/doc/mate-backgrounds/copyright"
    shutil.copyfile(copyright_file, tmp / "COPYRIGHT-mate-backgrounds")
    tmp.rename(args.out)
    print(f"{len(samples)} samples from {len(sources)} pictures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
