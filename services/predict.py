"""`flclustering predict`: classify images with a run's saved model, reading a line of
handwritten symbols as the seed's expression reader does.

An image with several symbols is cut into them by connected components of its ink
(scipy.ndimage, which scikit-learn already brings; the seed used OpenCV contours):
components whose columns overlap are one symbol (an '=' sign, a broken stroke), specks are
dropped, and the symbols are read left to right. Each is cropped, scaled into the model's
input keeping its aspect ratio, centred, and normalised as the training data was. When the
model's classes include arithmetic operators (a `folder` dataset of symbol images), the
expression's value is printed too: parsed, never `eval`ed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from services.core.errors import ConfigError
from services.core.model_file import ModelCard

INK_THRESHOLD = 0.25  # of the image's strongest ink: fainter pixels are background
SPECK_FRACTION = 0.05  # components under this share of the largest one are noise
# Class names of operators, as a folder of symbol images may name them.
OPERATORS = {
    "+": "+",
    "plus": "+",
    "add": "+",
    "-": "-",
    "minus": "-",
    "sub": "-",
    "*": "*",
    "x": "*",
    "times": "*",
    "mul": "*",
    "/": "/",
    "div": "/",
    "forward_slash": "/",
    "(": "(",
    ")": ")",
    "=": "=",
    "equals": "=",
}


@dataclass(frozen=True)
class Symbol:
    """One symbol read off an image: its class, probability and box (rows, columns)."""

    label: str
    probability: float
    box: tuple[int, int, int, int]  # top, left, bottom, right (exclusive)


def read_image(path: Path) -> np.ndarray:
    """An image file as float pixels in [0, 1], (H, W) or (H, W, 3); one clear error."""
    import matplotlib.image as mpimg

    try:
        pixels = np.asarray(mpimg.imread(str(path)), dtype=np.float64)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConfigError(f"{path}: not an image ({exc})") from None
    if pixels.size and pixels.max() > 1.0:  # 8-bit images (JPEG) come as 0-255
        pixels = pixels / 255.0
    if pixels.ndim == 3:
        pixels = pixels[..., :3]  # no alpha
    if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 1:
        raise ConfigError(f"{path}: not a 2-D image")
    return pixels


def ink_of(pixels: np.ndarray) -> np.ndarray:
    """Grey levels with the ink bright on a dark background (the training data's way):
    the background is the majority, so a light one is inverted."""
    grey = pixels.mean(axis=2) if pixels.ndim == 3 else pixels
    return 1.0 - grey if float(np.median(grey)) > 0.5 else grey


def segment(ink: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Boxes (top, left, bottom, right) of the symbols, left to right."""
    from scipy import ndimage

    peak = float(ink.max()) if ink.size else 0.0
    if peak <= 0:
        return []
    labels, count = ndimage.label(ink > INK_THRESHOLD * peak, structure=np.ones((3, 3)))
    if count == 0:
        return []
    areas = np.bincount(labels.ravel())[1:]
    boxes = []
    for i, found in enumerate(ndimage.find_objects(labels)):
        if found is None or areas[i] < SPECK_FRACTION * areas.max():
            continue
        rows, cols = found
        boxes.append([rows.start, cols.start, rows.stop, cols.stop])
    boxes.sort(key=lambda b: b[1])
    merged: list[list[int]] = []
    for b in boxes:  # overlapping columns: one symbol
        if merged and b[1] < merged[-1][3]:
            m = merged[-1]
            m[:] = [min(m[0], b[0]), min(m[1], b[1]), max(m[2], b[2]), max(m[3], b[3])]
        else:
            merged.append(b)
    return [(t, left, bottom, right) for t, left, bottom, right in merged]


def fit(crop: np.ndarray, height: int, width: int) -> torch.Tensor:
    """A crop scaled to fit (height, width) keeping its aspect ratio, centred, in [0, 1]."""
    h, w = crop.shape
    scale = min(height / h, width / w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None, None]
    mode = "area" if scale < 1 else "bilinear"
    kwargs: dict[str, Any] = {} if mode == "area" else {"align_corners": False}
    small = F.interpolate(x, size=(nh, nw), mode=mode, **kwargs)[0, 0]
    out = torch.zeros(height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    out[top : top + nh, left : left + nw] = small
    peak = float(out.max())
    return (out / peak if peak > 0 else out).clamp(0, 1)


def read_symbols(model: nn.Module, card: ModelCard, pixels: np.ndarray) -> list[Symbol]:
    """The symbols of one image, left to right (a colour model classifies it whole)."""
    channels, height, width = card.input_shape
    if channels != 1:
        rgb = pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, axis=2)
        x = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1), dtype=np.float32))
        x = F.interpolate(x[None], size=(height, width), mode="area")
        boxes = [(0, 0, pixels.shape[0], pixels.shape[1])]
    else:
        ink = ink_of(pixels)
        boxes = segment(ink)
        if not boxes:
            return []
        x = torch.stack([fit(ink[t:b, le:r], height, width)[None] for t, le, b, r in boxes])
    with torch.no_grad():
        probs = torch.softmax(model(card.normalise(x)), dim=1)
    best = probs.max(dim=1)
    return [
        Symbol(card.classes[int(i)], float(p), box)
        for p, i, box in zip(best.values, best.indices, boxes, strict=True)
    ]


def expression_value(tokens: list[str]) -> float | None:
    """The value of digits and + - * / ( ) (the part before an '='), or None when the
    tokens are not such an expression. A small recursive-descent parser: nothing is eval'ed."""
    if "=" in tokens:
        tokens = tokens[: tokens.index("=")]
    pos = 0

    def peek() -> str | None:
        return tokens[pos] if pos < len(tokens) else None

    def take() -> str:
        nonlocal pos
        pos += 1
        return tokens[pos - 1]

    def number() -> float:
        digits = ""
        while peek() is not None and str(peek()).isdigit():
            digits += take()
        if not digits:
            raise ValueError("a number was expected")
        return float(digits)

    def factor() -> float:
        if peek() == "-":
            take()
            return -factor()
        if peek() == "(":
            take()
            value = expr()
            if peek() != ")":
                raise ValueError("')' was expected")
            take()
            return value
        return number()

    def term() -> float:
        value = factor()
        while peek() in ("*", "/"):
            op, rhs = take(), factor()
            value = value * rhs if op == "*" else value / rhs
        return value

    def expr() -> float:
        value = term()
        while peek() in ("+", "-"):
            op, rhs = take(), term()
            value = value + rhs if op == "+" else value - rhs
        return value

    try:
        value = expr()
    except (ValueError, ZeroDivisionError):
        return None
    if pos != len(tokens) or not math.isfinite(value):
        return None
    return value


def describe(card: ModelCard, symbols: list[Symbol]) -> dict[str, Any]:
    """What predict reports for one image: the symbols, the text, the expression's value
    when the model knows operators."""
    tokens = [OPERATORS.get(s.label, s.label) for s in symbols]
    report: dict[str, Any] = {
        "symbols": [
            {"symbol": s.label, "probability": round(s.probability, 4), "box": list(s.box)}
            for s in symbols
        ],
        "text": "".join(tokens),
    }
    if any(c in OPERATORS for c in card.classes) and tokens:
        report["value"] = expression_value(tokens)
    return report
