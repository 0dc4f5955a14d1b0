"""Artifact style families: each artifact drawn in many named looks, each with its exact mask.

Synthderm's house renderers (:mod:`~medaudit.models.data.artifacts`) draw every artifact in one
look. Here each artifact has a *family* of styles, each a fixed choice of the family's categorical
parameters, named ``artifact/style`` (``band_aid/round-white``, ``ruler/light-on-dark-diagonal``);
size, rotation, position and the optional parts are drawn per image from the artifact's generator,
so a style is a deterministic function of ``(seed, image index)`` as the house look is. The house
look is one style of every family, ``artifact/house``, rendered by the house renderer itself:
the same bytes as without styles.

* ``band_aid/{strip,round,square}-{beige,tan,white,brown,clear}``: any rotation, a pad on 65 %,
  perforations on half, a third partly cut by the image border; ``clear`` is transparent plastic
  (blended over the skin, with a darker rim).
* ``ruler/{dark-on-light,light-on-dark,coloured}-{horizontal,vertical,diagonal,curved}``: mm ticks
  (long every fifth), cm numbers on 60 % of straight rulers, a partial ruler on a third.
* ``skin_marker/{purple,blue,black,green}-{dots,circles,lines,arrows,script}``: around the lesion;
  ``script`` is a looping handwriting-like stroke.
* ``timestamp/{sans,bitmap,segment,dotmatrix}-{white,black,yellow,orange}``: four date formats,
  sizes 5.5-8.5 % of the image, in a corner or at the top or bottom centre.
* ``microscope/{tight,wide}-{hard,soft}-{dark,light}``: vignette radius, edge sharpness and tone.

Every style renderer has the house signature ``render(img, occupied, rng) -> mask`` and contract:
it never touches ``occupied`` pixels and writes exactly the pixels of ``mask``. Blended pixels
(plastic, soft vignettes) whose rounded value would equal the original are nudged by one level
(:func:`_apply`), so ``mask`` equals the set of changed pixels exactly.

The style split (:func:`style_pools`): with ``styles="split"`` every artifact's styles are
``shared`` (every split) or train-only, val-only or test-only (:data:`DEFAULT_STYLE_SPLIT`, or a
config's own), so held-out metrics can be read on styles neither the model nor the CAV saw.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import product
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from medaudit.models.data import artifact_marks as _marks
from medaudit.models.data import artifacts as _house
from medaudit.models.data.artifact_marks import apply_labels, place
from medaudit.models.errors import ConfigError

HOUSE = "house"
STYLE_MODES = ("house", "split", "all")
#: Keys of a style split: styles in every split, and the styles of one split only.
SPLIT_KEYS = ("shared", "train", "val", "test")
Renderer = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


@dataclass(frozen=True)
class Style:
    """One named look of one artifact: ``render(img, occupied, rng) -> mask`` with fixed ``params``."""

    artifact: str
    name: str
    params: Mapping[str, str]
    fn: Callable[..., np.ndarray]

    @property
    def full(self) -> str:
        return f"{self.artifact}/{self.name}"

    def render(self, img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.fn(img, occupied, rng, **self.params)


# ------------------------------------------------------------------------------------ band-aids

#: Fabric colour and opacity per band-aid colour; ``clear`` is a transparent plastic film.
_BAND_AID_COLOURS: dict[str, tuple[tuple[int, int, int], float]] = {
    "beige": ((226, 201, 166), 1.0),
    "tan": ((192, 146, 102), 1.0),
    "white": ((242, 240, 234), 1.0),
    "brown": ((146, 98, 62), 1.0),
    "clear": ((236, 228, 214), 0.4),
}


def band_aid(
    img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, shape: str, colour: str
) -> np.ndarray:
    """A plaster of ``shape`` (strip, round, square) in ``colour``; labels 1 fabric, 2 pad,
    3 perforation, 4 rim of the plastic film."""
    S = img.shape[0]
    if shape == "strip":
        length, width = int(S * rng.uniform(0.34, 0.48)), max(6, int(S * rng.uniform(0.11, 0.16)))
    else:
        side = (0.15, 0.24) if shape == "round" else (0.17, 0.25)
        length = width = max(7, int(S * rng.uniform(*side)))
    canvas = Image.new("L", (length, width), 0)
    d = ImageDraw.Draw(canvas)
    if shape == "round":
        d.ellipse((0, 0, length - 1, width - 1), fill=1)
    else:
        radius = int(width * rng.uniform(0.25, 0.5)) if shape == "strip" else max(1, width // 6)
        d.rounded_rectangle((0, 0, length - 1, width - 1), radius=radius, fill=1)
    has_pad = rng.random() < 0.65
    perforated = rng.random() < 0.5
    if has_pad:
        if shape == "strip":
            x0 = (length - length // 3) // 2
            d.rectangle((x0, width // 5, x0 + length // 3, width - 1 - width // 5), fill=2)
        else:
            q = length // 4
            box = (q, q, length - 1 - q, width - 1 - q)
            (d.ellipse if shape == "round" else d.rectangle)(box, fill=2)
    if perforated:
        step = max(3, min(length, width) // 4)
        for hx in range(step // 2 + 1, length - 1, step):
            for hy in range(step // 2 + 1, width - 1, step):
                if canvas.getpixel((hx, hy)) == 1:
                    d.point([(hx, hy)], fill=3)
    labels = np.asarray(canvas).copy()
    if colour == "clear":  # the film's edge catches the light: a darker rim
        fabric = labels > 0
        inner = fabric.copy()
        inner[1:] &= fabric[:-1]
        inner[:-1] &= fabric[1:]
        inner[:, 1:] &= fabric[:, :-1]
        inner[:, :-1] &= fabric[:, 1:]
        labels[fabric & ~inner & (labels == 1)] = 4
    angle = float(rng.uniform(0, 360))
    layer = np.asarray(Image.fromarray(labels).rotate(angle, resample=Image.Resampling.NEAREST, expand=True))
    cut = rng.random() < 0.35
    placed = place(layer, occupied, rng, cut=cut)
    if placed is None and cut:
        placed = place(layer, occupied, rng)
    if placed is None:  # very crowded image: shrink once
        small = np.asarray(
            Image.fromarray(layer).resize(
                (layer.shape[1] // 2, layer.shape[0] // 2), Image.Resampling.NEAREST
            )
        )
        placed = place(small, occupied, rng)
        if placed is None:
            return np.zeros(occupied.shape, dtype=bool)
    base, alpha = _BAND_AID_COLOURS[colour]
    fabric_rgb = _marks.jitter(rng, base, 6)
    pad_rgb = _marks.jitter(rng, (214, 211, 204) if colour == "white" else (248, 244, 238), 4)
    return apply_labels(
        img,
        placed,
        {
            1: (fabric_rgb, alpha),
            2: (pad_rgb, 0.9 if colour == "clear" else 1.0),
            3: (fabric_rgb * 0.6, max(alpha, 0.6)),
            4: (fabric_rgb * 0.72, 0.75),
        },
        occupied,
    )


# ------------------------------------------------------------------------------------ rulers

_RULER_SCHEMES: dict[str, tuple[tuple[int, int, int], tuple[int, int, int]]] = {
    "dark-on-light": ((240, 238, 230), (28, 28, 30)),
    "light-on-dark": ((38, 38, 44), (236, 236, 230)),
}
#: Body colours of a coloured ruler; the ink is black or white, whichever reads.
_RULER_BODIES = ((62, 112, 200), (70, 160, 92), (200, 62, 52), (245, 210, 60))


def _ruler_strip(length: int, width: int, step: int, numbers: bool, rng: np.random.Generator) -> np.ndarray:
    """An axis-aligned ruler, labels 1 body and 2 ink: ticks from the top edge, long every fifth."""
    canvas = Image.new("L", (length, width), 1)
    d = ImageDraw.Draw(canvas)
    d.fontmode = "1"  # no anti-aliasing: exact mask
    font = _house._font(max(5, width // 2))
    for i, x in enumerate(range(int(rng.integers(0, step)), length, step)):
        long = i % 5 == 0
        d.line([(x, 0), (x, int(width * (0.55 if long else 0.3)))], fill=2, width=1)
        if numbers and long and x + 10 < length:
            d.text((x + 1, int(width * 0.5)), str(i // 5), fill=2, font=font)
    return np.asarray(canvas)


def _curved_ruler(S: int, width: int, step: int, partial: bool, rng: np.random.Generator) -> np.ndarray:
    """A tape bent around a centre outside the image: a band of radii [r0, r0 + width) whose
    nearest point lies 0.34-0.46·S from the image centre, ticks along its arc from the inner edge."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float64)
    theta_c = rng.uniform(0, 2 * np.pi)
    dist = S * rng.uniform(1.0, 1.6)
    c = (S - 1) / 2
    cy, cx = c + dist * np.sin(theta_c), c + dist * np.cos(theta_c)
    r0 = dist - S * rng.uniform(0.34, 0.46) - width
    rho = np.hypot(yy - cy, xx - cx)
    v = rho - r0
    dtheta = np.angle(np.exp(1j * (np.arctan2(yy - cy, xx - cx) - (theta_c + np.pi))))
    u = dtheta * (r0 + width / 2)  # arc length from the point nearest the image centre
    body = (v >= 0) & (v < width)
    if partial:
        span = S * rng.uniform(0.45, 0.8)
        a = rng.uniform(-0.6 * S, 0.6 * S - span)
        body &= (u >= a) & (u < a + span)
    off = rng.uniform(0, step)
    k = np.floor((u - off) / step)
    tick = (u - off - k * step) < 1.0
    tick_len = np.where(np.mod(k, 5) == 0, 0.55 * width, 0.3 * width)
    labels = body.astype(np.uint8)
    labels[body & tick & (v < tick_len)] = 2
    return labels


def ruler(
    img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator, scheme: str, geometry: str
) -> np.ndarray:
    """A ruler of colour ``scheme`` laid ``geometry`` (horizontal, vertical, diagonal, curved)."""
    S = img.shape[0]
    width = max(7, int(S * rng.uniform(0.08, 0.12)))
    step = max(2, int(S * rng.uniform(0.025, 0.045)))
    numbers = rng.random() < 0.6
    partial = rng.random() < 0.35
    if scheme == "coloured":
        body = _RULER_BODIES[int(rng.integers(len(_RULER_BODIES)))]
        ink: tuple[int, int, int] = (20, 20, 20) if sum(body) > 420 else (240, 240, 240)
    else:
        body, ink = _RULER_SCHEMES[scheme]
    body_rgb, ink_rgb = _marks.jitter(rng, body, 6), _marks.jitter(rng, ink, 5)
    placed: np.ndarray | None = None
    for _ in range(4):
        if geometry == "curved":
            layer = _curved_ruler(S, width, step, partial, rng)
            placed = layer if not (occupied & (layer > 0)).any() else None
        else:
            length = S if geometry != "diagonal" else int(S * 1.45)
            if partial:
                length = int(length * rng.uniform(0.45, 0.75))
            strip = _ruler_strip(length, width, step, numbers, rng)
            if geometry == "diagonal":
                angle = float(rng.uniform(25, 65) + 90 * int(rng.integers(4)))
            else:
                angle = float((0 if geometry == "horizontal" else 90) + 180 * int(rng.integers(2)))
            layer = np.asarray(
                Image.fromarray(strip).rotate(angle, resample=Image.Resampling.NEAREST, expand=True)
            )
            placed = place(layer, occupied, rng, overhang=0.5 if geometry == "diagonal" else 0.0)
        if placed is not None:
            break
    if placed is None:
        return np.zeros(occupied.shape, dtype=bool)
    return apply_labels(img, placed, {1: (body_rgb, 1.0), 2: (ink_rgb, 1.0)}, occupied)


# ------------------------------------------------------------------------------------ registry


def _family(artifact: str, fn: Callable[..., np.ndarray], **axes: tuple[str, ...]) -> dict[str, Style]:
    keys = list(axes)
    out = {}
    for combo in product(*axes.values()):
        params = dict(zip(keys, combo, strict=True))
        out["-".join(combo)] = Style(artifact, "-".join(combo), params, fn)
    return out


def _house_style(artifact: str) -> Style:
    def fn(img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _house.ARTIFACTS[artifact](img, occupied, rng)

    return Style(artifact, HOUSE, {}, fn)


#: ``{artifact: {style name: Style}}``; the house look first.
STYLES: dict[str, dict[str, Style]] = {
    a: {HOUSE: _house_style(a), **fam}
    for a, fam in (
        (
            "band_aid",
            _family(
                "band_aid", band_aid, shape=("strip", "round", "square"), colour=tuple(_BAND_AID_COLOURS)
            ),
        ),
        (
            "ruler",
            _family(
                "ruler",
                ruler,
                scheme=("dark-on-light", "light-on-dark", "coloured"),
                geometry=("horizontal", "vertical", "diagonal", "curved"),
            ),
        ),
        (
            "skin_marker",
            _family(
                "skin_marker",
                _marks.skin_marker,
                colour=tuple(_marks.INKS),
                mark=("dots", "circles", "lines", "arrows", "script"),
            ),
        ),
        (
            "timestamp",
            _family("timestamp", _marks.timestamp, font=_marks.TS_FONTS, colour=tuple(_marks.TS_COLOURS)),
        ),
        (
            "microscope",
            _family(
                "microscope",
                _marks.microscope,
                radius=("tight", "wide"),
                edge=("hard", "soft"),
                tone=("dark", "light"),
            ),
        ),
    )
}

#: The declared split: per artifact, styles in every split (``shared``: the house look and one
#: more, the "seen" styles of the held-out metrics) and styles of one split only. Each held-out
#: style recombines looks the training styles show apart (a round plaster, a white plaster; never a
#: round white one) or is new outright (the transparent plaster; a coloured curved tape).
DEFAULT_STYLE_SPLIT: dict[str, dict[str, tuple[str, ...]]] = {
    "band_aid": {
        "shared": ("house", "strip-beige"),
        "train": (
            "strip-tan",
            "strip-white",
            "strip-brown",
            "round-beige",
            "round-tan",
            "round-brown",
            "square-beige",
            "square-white",
        ),
        "val": ("square-tan", "strip-clear"),
        "test": ("round-white", "square-brown", "round-clear", "square-clear"),
    },
    "ruler": {
        "shared": ("house", "dark-on-light-horizontal"),
        "train": (
            "dark-on-light-vertical",
            "light-on-dark-horizontal",
            "light-on-dark-vertical",
            "coloured-horizontal",
            "coloured-diagonal",
            "dark-on-light-curved",
        ),
        "val": ("light-on-dark-curved", "dark-on-light-diagonal"),
        "test": ("light-on-dark-diagonal", "coloured-vertical", "coloured-curved"),
    },
    "skin_marker": {
        "shared": ("house", "purple-dots"),
        "train": (
            "purple-lines",
            "purple-script",
            "blue-dots",
            "blue-circles",
            "blue-arrows",
            "black-lines",
            "black-arrows",
            "black-script",
            "green-dots",
            "green-circles",
        ),
        "val": ("purple-arrows", "green-lines", "blue-script"),
        "test": (
            "purple-circles",
            "blue-lines",
            "black-dots",
            "black-circles",
            "green-arrows",
            "green-script",
        ),
    },
    "timestamp": {
        "shared": ("house", "sans-white"),
        "train": (
            "sans-black",
            "sans-yellow",
            "bitmap-white",
            "bitmap-orange",
            "segment-yellow",
            "segment-black",
            "dotmatrix-white",
            "dotmatrix-orange",
        ),
        "val": ("bitmap-black", "segment-white"),
        "test": ("sans-orange", "bitmap-yellow", "segment-orange", "dotmatrix-black", "dotmatrix-yellow"),
    },
    "microscope": {
        "shared": ("house",),
        "train": ("tight-hard-dark", "wide-soft-dark", "tight-soft-light", "wide-hard-light"),
        "val": ("wide-hard-dark",),
        "test": ("tight-soft-dark", "wide-soft-light", "tight-hard-light"),
    },
}


def style_names(artifact: str) -> tuple[str, ...]:
    """Every style of ``artifact`` by full name (``band_aid/house`` first)."""
    return tuple(s.full for s in STYLES[artifact].values())


def get_style(full: str) -> Style:
    """The style named ``artifact/style``.

    Raises:
        ConfigError: An unknown artifact or style, naming the valid ones.
    """
    artifact, _, name = full.partition("/")
    family = STYLES.get(artifact)
    if family is None:
        raise ConfigError(f"unknown artifact {artifact!r} in style {full!r}; valid: {', '.join(STYLES)}")
    if name not in family:
        raise ConfigError(f"unknown style {full!r}; valid: {', '.join(style_names(artifact))}")
    return family[name]


def render(full: str, img: np.ndarray, occupied: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw style ``full`` (``artifact/style``) into ``img``; returns its exact mask."""
    return get_style(full).render(img, occupied, rng)


def style_pools(
    mode: str, split: Mapping[str, Mapping[str, Any]] | None = None
) -> dict[str, dict[str, tuple[str, ...]]]:
    """Per artifact and split (train, val, test), the full style names its images draw from.

    Args:
        mode: ``"house"`` (the house look everywhere: synthderm without styles), ``"split"``
            (``split``'s shared styles plus the split's own) or ``"all"`` (every style everywhere).
        split: ``{artifact: {"shared"|"train"|"val"|"test": [style names]}}``; None or empty for
            :data:`DEFAULT_STYLE_SPLIT`. An artifact it leaves out keeps the house look.

    Raises:
        ConfigError: An unknown mode, artifact, key or style; a style in two keys; a split with
            no style to draw.
    """
    if mode not in STYLE_MODES:
        raise ConfigError(f"styles={mode!r}; valid: {', '.join(STYLE_MODES)}")
    splits = ("train", "val", "test")
    if mode == "house":
        return {a: dict.fromkeys(splits, (f"{a}/{HOUSE}",)) for a in STYLES}
    if mode == "all":
        return {a: dict.fromkeys(splits, style_names(a)) for a in STYLES}
    decl = split or DEFAULT_STYLE_SPLIT
    out: dict[str, dict[str, tuple[str, ...]]] = {a: dict.fromkeys(splits, (f"{a}/{HOUSE}",)) for a in STYLES}
    for art, parts in decl.items():
        if art not in STYLES:
            raise ConfigError(f"style split names artifact {art!r}; valid: {', '.join(STYLES)}")
        bad = [k for k in parts if k not in SPLIT_KEYS]
        if bad:
            raise ConfigError(f"style split of {art!r} has keys {bad}; valid: {', '.join(SPLIT_KEYS)}")
        owner: dict[str, str] = {}
        for key in SPLIT_KEYS:
            for name in parts.get(key, ()):
                full = get_style(f"{art}/{name}").full
                if full in owner:
                    raise ConfigError(
                        f"style {full!r} is in both {owner[full]!r} and {key!r} of the style split"
                    )
                owner[full] = key
        shared = tuple(f"{art}/{n}" for n in parts.get("shared", ()))
        for s in splits:
            pool = shared + tuple(f"{art}/{n}" for n in parts.get(s, ()))
            if not pool:
                raise ConfigError(f"style split of {art!r}: the {s} split has no style to draw")
            out[art][s] = pool
    return out
