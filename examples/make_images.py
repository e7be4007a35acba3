"""Regenerate the bundled example images (synthetic, so no licence questions).

python examples/make_images.py
"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).parent / "images"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:320] / 256.0
    # A sky-and-ground landscape with a sun.
    sky = np.stack([0.35 + 0.3 * yy, 0.55 + 0.3 * yy, 0.95 - 0.2 * yy], -1)
    img = Image.fromarray((sky * 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle([0, 170, 320, 256], fill=(70, 120, 50))
    d.ellipse([230, 30, 280, 80], fill=(255, 230, 120))
    img.save(OUT / "landscape.png")
    # A "hand" with six fingers: the classic artifact.
    img = Image.new("RGB", (256, 256), (225, 215, 200))
    d = ImageDraw.Draw(img)
    d.ellipse([80, 120, 180, 220], fill=(230, 180, 150))
    for i in range(6):
        x = 78 + i * 19
        d.rounded_rectangle([x, 40 + abs(i - 2.5) * 10, x + 14, 150], 7, fill=(230, 180, 150))
    img.save(OUT / "six_fingers.png")
    # Noisy texture with a blown-out patch.
    arr = (rng.normal(0.45, 0.12, (240, 240, 3)).clip(0, 1) * 255).astype(np.uint8)
    arr[60:120, 140:220] = 255
    Image.fromarray(arr).save(OUT / "blown_out.png")
    # A portrait-like face with misplaced eyes.
    img = Image.new("RGB", (224, 288), (40, 40, 60))
    d = ImageDraw.Draw(img)
    d.ellipse([52, 60, 172, 220], fill=(220, 185, 160))
    d.ellipse([80, 110, 100, 125], fill=(30, 30, 30))
    d.ellipse([128, 95, 148, 110], fill=(30, 30, 30))
    d.arc([85, 160, 140, 195], 20, 160, fill=(120, 40, 40), width=4)
    img.save(OUT / "face.jpg", quality=90)


if __name__ == "__main__":
    main()
