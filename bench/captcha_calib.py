"""Calibration and evaluation images for ddddocr's captcha recognizer (``common.onnx`` of the ddddocr
wheel: a convolutional encoder, an LSTM and a CTC head over 8,210 characters): rendered text captchas,
preprocessed as ddddocr does.

Run::

    python bench/captcha_calib.py --out captchas.npz [--images 800] [--seed 0] [--png DIR]

Image i: a ``--width`` x 64 canvas of a random light colour holding 4 or 5 characters drawn from
``ALPHABET`` (letters and digits, without the look-alikes 0/O, 1/l/I), each in its own dark colour and
vertical offset, in one DejaVu font (sans, serif, mono; regular, bold, oblique, condensed) at 30 to 40
px, with 0 to 3 random lines across it. Everything is drawn from ``random.Random(seed)``: the same
arguments give the same images. ddddocr's own preprocessing follows (``core/ocr_engine.py`` of
ddddocr 1.6.1: height 64, greyscale, pixel / 255), NCHW float32 ``[images, 1, 64, width]`` under the
model's input name (``input1``), stored uncompressed (``numpy.savez``: memory-mapped by ``--calib``).
The rendered text of every image goes to ``OUT.labels.json``.

The unpruned model reads these: 763 of the 800 images of seed 0 exactly (95%), ignoring case (the
charset has both cases of several letters, which these captchas do not distinguish), through
ddddocr's beta charset and greedy CTC decoding (``ctc_decode``).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
from orientation_calib import FONTS, _pillow, fonts

ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789ABCDEFGHJKLMNPQRSTUVWXYZ"
HEIGHT = 64


def captcha(rng: random.Random, text: str, width: int, font_files: list[str]):
    """One rendered captcha (a PIL RGB image)."""
    Image, ImageDraw, ImageFont = _pillow()
    img = Image.new("RGB", (width, HEIGHT), tuple(rng.randint(180, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    font = ImageFont.truetype(rng.choice(font_files), rng.randint(30, 40))
    x = rng.randint(2, 12)
    for ch in text:
        draw.text((x, rng.randint(4, 18)), ch, font=font, fill=tuple(rng.randint(0, 120) for _ in range(3)))
        x += int(draw.textlength(ch, font=font)) + rng.randint(-2, 4)
    for _ in range(rng.randint(0, 3)):
        ends = [(rng.randint(0, width), rng.randint(0, HEIGHT)) for _ in range(2)]
        draw.line(ends, fill=tuple(rng.randint(0, 200) for _ in range(3)), width=rng.randint(1, 2))
    return img


def to_tensor(img) -> np.ndarray:
    """ddddocr's preprocessing of an image already HEIGHT high: greyscale (PIL's "L"), / 255."""
    return (np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[None]


def ctc_decode(logits: np.ndarray) -> tuple[int, ...]:
    """Greedy CTC over a ``[T, 1, C]`` (or ``[T, C]``) output: argmax per step, repeats merged, the
    blank (class 0, ddddocr's empty first character) dropped: the class indices read."""
    idx = np.asarray(logits).reshape(-1, np.asarray(logits).shape[-1]).argmax(-1)
    out, prev = [], 0
    for k in idx.tolist():
        if k != prev and k != 0:
            out.append(k)
        prev = k
    return tuple(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="captchas.npz", help="the .npz to write (default captchas.npz)")
    ap.add_argument("--images", type=int, default=800, help="images to render (default 800)")
    ap.add_argument("--width", type=int, default=160, help="image width in pixels (default 160)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fonts", default=FONTS, help=f"folder of DejaVu fonts (default {FONTS})")
    ap.add_argument("--input-name", default="input1", help="the model's input name (default input1)")
    ap.add_argument("--png", metavar="DIR", help="also write the images as PNG files into DIR")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    font_files = [f for f in fonts(args.fonts) if "ExtraLight" not in f]  # hairlines no captcha uses
    x = np.empty((args.images, 1, HEIGHT, args.width), np.float32)
    texts = []
    if args.png:
        Path(args.png).mkdir(parents=True, exist_ok=True)
    for i in range(args.images):
        text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 5)))
        img = captcha(rng, text, args.width, font_files)
        x[i] = to_tensor(img)
        texts.append(text)
        if args.png:
            img.save(Path(args.png) / f"captcha{i:05d}.png")
    np.savez(args.out, **{args.input_name: x})
    Path(args.out + ".labels.json").write_text(json.dumps(texts))
    print(f"{args.out}: {args.input_name} {list(x.shape)} float32, {args.images} captchas of 4-5 characters "
          f"(texts in {args.out}.labels.json)")


if __name__ == "__main__":
    main()
