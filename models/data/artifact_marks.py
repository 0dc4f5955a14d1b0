"""The style families of skin markers, timestamps and microscope borders, and the drawing helpers
every style family shares (:mod:`~medaudit.models.data.artifact_styles` names the styles).

:func:`apply_labels` is the one place a style writes pixels: a label layer, a colour and an
opacity per label; pixels under ``occupied`` are never written, and every written pixel changes,
so the returned mask is exactly the set of changed pixels.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medaudit.models.data import artifacts as _house

#: Pen colours of the skin-marker styles.
INKS: dict[str, tuple[int, int, int]] = {
    "purple": (118, 48, 160),
    "blue": (38, 72, 190),
    "black": (28, 26, 32),
    "green": (28, 135, 62),
}
TS_FONTS = ("sans", "bitmap", "segment", "dotmatrix")
TS_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (12, 12, 12),
    "yellow": (250, 222, 40),
    "orange": (255, 138, 20),
}
_TS_FORMATS = ("%Y-%m-%d %H:%M:%S", "%d.%m.%Y %H:%M", "%Y/%m/%d", "%m-%d-%y %H:%M")
Paint = Mapping[int, tuple[np.ndarray, float | np.ndarray]]


def jitter(rng: np.random.Generator, base: tuple[int, int, int] | np.ndarray, sd: float) -> np.ndarray:
    """``base`` plus Gaussian noise per channel, clipped to [0, 255] (float64)."""
    return np.clip(np.asarray(base, dtype=np.float64) + rng.normal(0, sd, 3), 0, 255)


def apply_labels(img: np.ndarray, labels: np.ndarray, paint: Paint, occupied: np.ndarray) -> np.ndarray:
    """Blend each label's colour at its opacity over ``img`` (in place) where ``labels > 0`` and
    not ``occupied``; returns that mask.

    ``paint[label] = (rgb, alpha)``, ``alpha`` a number or an H×W map. A pixel whose rounded new
    value equals its old one in every channel is moved by one level in red, so that the mask is
    exactly the pixels that changed.
    """
    lab = np.where(occupied, 0, labels)
    mask = lab > 0
    if not mask.any():
        return mask
    old = img[mask].astype(np.float64)
    new = old.copy()
    lab_m = lab[mask]
    for k, (rgb, alpha) in paint.items():
        sel = lab_m == k
        if not sel.any():
            continue
        a = np.asarray(alpha, dtype=np.float64)
        a = a[mask][sel][:, None] if a.ndim == 2 else a
        new[sel] = old[sel] * (1 - a) + np.asarray(rgb, dtype=np.float64) * a
    out = np.clip(np.rint(new), 0, 255).astype(np.uint8)
    same = (out == img[mask]).all(axis=1)
    if same.any():
        red = out[same, 0]
        out[same, 0] = np.where(red < 255, red + 1, 254)
    img[mask] = out
    return mask


def paste(layer: np.ndarray, y: int, x: int, shape: tuple[int, int]) -> np.ndarray:
    """``layer`` at (y, x) on an empty canvas of ``shape``, cropped at the borders."""
    H, W = shape
    h, w = layer.shape
    out = np.zeros(shape, dtype=layer.dtype)
    y0, y1, x0, x1 = max(0, y), min(H, y + h), max(0, x), min(W, x + w)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = layer[y0 - y : y1 - y, x0 - x : x1 - x]
    return out


def place(
    layer: np.ndarray,
    occupied: np.ndarray,
    rng: np.random.Generator,
    *,
    cut: bool = False,
    overhang: float = 0.0,
    tries: int = 60,
) -> np.ndarray | None:
    """A random position for a label layer where its visible part hits nothing occupied.

    Inside the image by default (a layer as wide as the image spans it); ``cut``: 20-45 % of it
    over one border; ``overhang``: anywhere up to that fraction of its size beyond the borders,
    with at least a quarter of it visible. None when no try fits.
    """
    H, W = occupied.shape
    h, w = layer.shape
    fg = layer > 0
    total = int(fg.sum())
    if total == 0:
        return None
    need = 0.25 if overhang > 0 else (0.5 if cut else 1.0)
    for _ in range(tries):
        lo_y, hi_y = min(0, H - h), max(0, H - h)
        lo_x, hi_x = min(0, W - w), max(0, W - w)
        if overhang > 0:
            oy, ox = int(overhang * h), int(overhang * w)
            lo_y, hi_y, lo_x, hi_x = lo_y - oy, hi_y + oy, lo_x - ox, hi_x + ox
        y, x = int(rng.integers(lo_y, hi_y + 1)), int(rng.integers(lo_x, hi_x + 1))
        if cut:
            side = int(rng.integers(4))
            frac = rng.uniform(0.2, 0.45)
            if side == 0:
                y = -int(frac * h)
            elif side == 1:
                x = W - w + int(frac * w)
            elif side == 2:
                y = H - h + int(frac * h)
            else:
                x = -int(frac * w)
        out = paste(layer, y, x, (H, W))
        vis = out > 0
        n_vis = int(vis.sum())
        if n_vis < need * total or n_vis == 0 or (cut and n_vis == total):
            continue
        if not (occupied & vis).any():
            return out
    return None


# ------------------------------------------------------------------------------------ skin markers


def skin_marker(
    img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, colour: str, mark: str
) -> np.ndarray:
    """Pen marks of ``mark`` (dots, circles, lines, arrows, script) around the lesion in ``colour``."""
    S = img.shape[0]
    ys, xs = np.nonzero(occupied)
    cy, cx = (float(ys.mean()), float(xs.mean())) if len(ys) else (S / 2, S / 2)
    reach = float(np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2).max()) if len(ys) else S * 0.2
    thick = max(1, int(round(S * rng.uniform(0.018, 0.03))))
    ink = jitter(rng, INKS[colour], 10)
    layer = np.zeros(occupied.shape, dtype=np.uint8)
    for _ in range(4):  # a draw that falls wholly off the image or on the lesion is drawn again
        r = reach + S * rng.uniform(0.04, 0.08)
        canvas = Image.new("L", (S, S), 0)
        _draw_mark(ImageDraw.Draw(canvas), mark, cx, cy, r, thick, S, rng)
        layer = np.asarray(canvas).copy()
        if (layer.astype(bool) & ~occupied).any():
            break
    return apply_labels(img, layer, {1: (ink, 1.0)}, occupied)


def _at(cx: float, cy: float, r: float, a: float) -> tuple[float, float]:
    return cx + r * float(np.cos(a)), cy + r * float(np.sin(a))


def _draw_mark(
    d: ImageDraw.ImageDraw,
    mark: str,
    cx: float,
    cy: float,
    r: float,
    t: int,
    S: int,
    rng: np.random.Generator,
) -> None:
    start = float(rng.uniform(0, 2 * np.pi))
    if mark == "dots":
        n = int(rng.integers(4, 10))
        for a in start + np.linspace(0, rng.uniform(1.5, 5.5), n):
            px, py = _at(cx, cy, r, a)
            d.ellipse((px - t, py - t, px + t, py + t), fill=1)
    elif mark == "circles":
        if rng.random() < 0.6:  # one ring around the lesion
            rx, ry = r * rng.uniform(1.0, 1.15), r * rng.uniform(0.9, 1.1)
            d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), outline=1, width=t)
        else:  # small hollow circles beside it
            rc = 2.5 * t + S * 0.02
            for a in start + np.linspace(0, 2 * np.pi, int(rng.integers(2, 5)), endpoint=False):
                px, py = _at(cx, cy, r + rc, a)
                d.ellipse((px - rc, py - rc, px + rc, py + rc), outline=1, width=max(1, t - 1))
    elif mark == "lines":
        n = int(rng.integers(2, 5))
        for a in start + np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.3, 0.3, n):
            if rng.random() < 0.5:  # radial tick
                p0, p1 = _at(cx, cy, r, a), _at(cx, cy, r + S * rng.uniform(0.06, 0.13), a)
            else:  # tangential dash
                mx, my = _at(cx, cy, r + S * 0.03, a)
                half = S * rng.uniform(0.04, 0.08)
                p0, p1 = _at(mx, my, half, a + np.pi / 2), _at(mx, my, -half, a + np.pi / 2)
            d.line([p0, p1], fill=1, width=t)
    elif mark == "arrows":
        n = 1 + int(rng.random() < 0.4)
        for a in start + np.linspace(0, 2 * np.pi, n, endpoint=False):
            tip, tail = _at(cx, cy, r + S * 0.01, a), _at(cx, cy, r + S * rng.uniform(0.16, 0.26), a)
            d.line([tail, tip], fill=1, width=t)
            head = max(3.0, 3.0 * t)
            d.polygon([tip, _at(*tip, head, a + 0.5), _at(*tip, head, a - 0.5)], fill=1)
    else:  # script: a looping handwriting-like stroke (a prolate cycloid with a wobble)
        loops = int(rng.integers(3, 7))
        amp = S * rng.uniform(0.025, 0.045)
        c = amp * rng.uniform(0.35, 0.6)
        u = np.linspace(0, 2 * np.pi * loops, 24 * loops)
        lx = c * u - amp * np.sin(u)
        ly = -amp * np.cos(u) + 0.3 * amp * np.sin(0.37 * u + rng.uniform(0, 2 * np.pi))
        lx -= lx.mean()
        ox, oy = _at(cx, cy, r + amp + S * rng.uniform(0.06, 0.1), start)
        rot = start + np.pi / 2
        px = ox + lx * np.cos(rot) - ly * np.sin(rot)
        py = oy + lx * np.sin(rot) + ly * np.cos(rot)
        d.line(list(zip(px.tolist(), py.tolist(), strict=True)), fill=1, width=max(1, t - 1), joint="curve")


# ------------------------------------------------------------------------------------ timestamps

_SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc",
    "5": "afgcd", "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg", "-": "g",
}  # fmt: skip
_DOTS = {
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "-": "00000 00000 00000 11111 00000 00000 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000",
    ".": "00000 00000 00000 00000 00000 01100 01100",
    "/": "00000 00001 00010 00100 01000 10000 00000",
    " ": "00000 00000 00000 00000 00000 00000 00000",
}


def _crop(a: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(a)
    return a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] if len(ys) else a[:1, :1]


def _pil_text(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, h: int) -> np.ndarray:
    canvas = Image.new("L", (8 * h * len(text) + 8, 4 * h + 8), 0)
    d = ImageDraw.Draw(canvas)
    d.fontmode = "1"  # no anti-aliasing: exact mask
    d.text((4, 4), text, fill=1, font=font)
    return _crop(np.asarray(canvas))


def _segment_text(text: str, h: int) -> np.ndarray:
    """Seven-segment digits ``h`` px tall (dates and times only need digits, ``-``, ``:``, ``.``)."""
    t, cw = max(1, h // 7), max(3, int(round(h * 0.55)))
    mid = (h - t) // 2
    cells = []
    for ch in text:
        if ch in _SEGMENTS:
            c = np.zeros((h, cw), np.uint8)
            boxes = {
                "a": (0, t, 0, cw), "b": (0, mid + t, cw - t, cw), "c": (mid, h, cw - t, cw),
                "d": (h - t, h, 0, cw), "e": (mid, h, 0, t), "f": (0, mid + t, 0, t),
                "g": (mid, mid + t, 0, cw),
            }  # fmt: skip
            for s in _SEGMENTS[ch]:
                y0, y1, x0, x1 = boxes[s]
                c[y0:y1, x0:x1] = 1
        elif ch in ":.":
            c = np.zeros((h, t), np.uint8)
            for y in (h // 3, 2 * h // 3) if ch == ":" else (h - t,):
                c[y : y + t] = 1
        elif ch == "/":
            c = np.zeros((h, cw), np.uint8)
            for y in range(h):
                x = int((h - 1 - y) * (cw - 1) / max(1, h - 1))
                c[y, x : x + t] = 1
        else:
            c = np.zeros((h, max(1, cw // 2)), np.uint8)
        cells += [c, np.zeros((h, t), np.uint8)]
    return np.concatenate(cells, axis=1)


def _dot_text(text: str, h: int) -> np.ndarray:
    """A 5×7 dot-matrix font, each dot a ``p``² square on a ``p``-pixel pitch (a gap between dots
    once they are 3 px or more)."""
    p = max(1, h // 7)
    dot = p if p < 3 else p - 1
    cells = []
    for ch in text:
        rows = _DOTS.get(ch, _DOTS[" "]).split()
        c = np.zeros((7 * p, 6 * p), np.uint8)
        for j, row in enumerate(rows):
            for i, bit in enumerate(row):
                if bit == "1":
                    c[j * p : j * p + dot, i * p : i * p + dot] = 1
        cells.append(c)
    return np.concatenate(cells, axis=1)


def text_layer(text: str, font: str, h: int) -> np.ndarray:
    """``text`` in ``font`` (one of :data:`TS_FONTS`) about ``h`` px tall, as a cropped 0/1 layer."""
    if font == "sans":
        return _pil_text(text, _house._font(h), h)
    if font == "bitmap":  # Pillow's fixed-size bitmap font, scaled (nearest) to the height asked
        g = _pil_text(text, ImageFont.load_default_imagefont(), 11)
        w = max(1, int(round(g.shape[1] * h / g.shape[0])))
        return np.asarray(Image.fromarray(g).resize((w, h), Image.Resampling.NEAREST))
    if font == "segment":
        return _segment_text(text, h)
    return _dot_text(text, h)


def timestamp(
    img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, font: str, colour: str
) -> np.ndarray:
    """A date and time in ``font`` and ``colour``, in a corner or at the top or bottom centre."""
    S = img.shape[0]
    t0 = _dt.datetime(2015, 1, 1)
    when = t0 + _dt.timedelta(seconds=int(rng.uniform(0, 10 * 365.25 * 86400)))
    text = when.strftime(_TS_FORMATS[int(rng.integers(len(_TS_FORMATS)))])
    h = max(5, int(round(S * rng.uniform(0.055, 0.085))))
    margin = max(2, int(S * rng.uniform(0.02, 0.05)))
    rgb = jitter(rng, TS_COLOURS[colour], 5)
    glyphs = text_layer(text, font, h)
    while glyphs.shape[1] > S - 2 * margin and h > 5:
        h -= 1
        glyphs = text_layer(text, font, h)
    for short in ("%Y-%m-%d", "%d.%m.%y"):  # still too wide: the date alone
        if glyphs.shape[1] <= S - 2 * margin:
            break
        glyphs = text_layer(when.strftime(short), font, h)
    glyphs = glyphs[:, : S - 2 * margin]
    gh, gw = glyphs.shape
    spots = [
        (margin, margin),
        (margin, S - gw - margin),
        (S - gh - margin, margin),
        (S - gh - margin, S - gw - margin),
        (margin, (S - gw) // 2),
        (S - gh - margin, (S - gw) // 2),
    ]
    for k in rng.permutation(len(spots)):
        y, x = spots[int(k)]
        layer = paste(glyphs, y, x, occupied.shape)
        if not (occupied & (layer > 0)).any():
            return apply_labels(img, layer, {1: (rgb, 1.0)}, occupied)
    return np.zeros(occupied.shape, dtype=bool)


# ------------------------------------------------------------------------------------ microscope


def microscope(
    img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, radius: str, edge: str, tone: str
) -> np.ndarray:
    """A vignette outside a circle: ``tight`` (0.40-0.47·S) or ``wide`` (0.52-0.62·S, the corners),
    a ``hard`` or ``soft`` edge (opacity rising from 15 % over 4-10 % of S), ``dark`` or ``light``."""
    S = img.shape[0]
    r = S * (rng.uniform(0.40, 0.47) if radius == "tight" else rng.uniform(0.52, 0.62))
    cy, cx = (S - 1) / 2 + rng.uniform(-0.03, 0.03, 2) * S
    yy, xx = np.mgrid[0:S, 0:S]
    rho = np.hypot(yy - cy, xx - cx)
    if edge == "hard":
        alpha = (rho > r).astype(np.float64)
    else:
        ramp = S * rng.uniform(0.04, 0.10)
        alpha = np.where(rho > r, np.clip(0.15 + 0.85 * (rho - r) / ramp, 0.0, 1.0), 0.0)
    rgb = jitter(rng, (8, 8, 8), 3) if tone == "dark" else jitter(rng, (238, 238, 234), 4)
    return apply_labels(img, (alpha > 0).astype(np.uint8), {1: (rgb, alpha)}, occupied)
