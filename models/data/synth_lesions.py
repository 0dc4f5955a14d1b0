"""The basal-cell-like cue of synthderm's multi-class form: pink tint, pearly rim, branching vessels.

Every lesion of a multi-class synthderm with a ``bcc`` class draws a *vascularity* v ∈ [0, 1]
from its kind's Beta distribution and gets the cue at that strength: BCC-like lesions mostly
strong, nevi and melanomas mostly faint, with overlapping tails, so that no single cue separates
the classes (the dermoscopic BCC signs: arborising vessels, a pink, shiny, pearly lesion).
Drawing stays inside the lesion mask, so artifact masks remain exact.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

#: Severity (shape irregularity, dark and blue-grey regions) of a BCC-like lesion: moderate,
#: between the benign Beta(2, 10) and the malignant Beta(10, 2).
BCC_SEVERITY_AB = (4.0, 6.0)
#: Vascularity v ~ Beta(a, b) per lesion kind.
VASCULARITY_AB = {"bcc": (5.0, 2.0), "benign": (1.0, 8.0), "malignant": (1.5, 6.0)}


def draw_vascular(
    img: np.ndarray, lesion: np.ndarray, rng: np.random.Generator, kind: str, contrast: float
) -> float:
    """Tint, rim and vessels at a vascularity drawn for ``kind``, in place; returns v.

    Args:
        img: H×W×3 uint8, drawn into inside ``lesion`` only.
        lesion: H×W bool lesion mask.
        rng: The lesion's generator (its draws continue the lesion's).
        kind: ``"bcc"``, ``"benign"`` or ``"malignant"``.
        contrast: Opacity of the cue, as ``cue_contrast`` is for the malignant cues.
    """
    v = float(rng.beta(*VASCULARITY_AB[kind]))
    pink = np.array([rng.uniform(200, 225), rng.uniform(115, 140), rng.uniform(120, 145)], np.float32)
    pearl = np.array([242, 228, 226], np.float32)
    vessel = (int(rng.uniform(150, 185)), int(rng.uniform(20, 45)), int(rng.uniform(35, 60)))
    n_vessels = int(round(1 + 7 * v))
    ys, xs = np.nonzero(lesion)
    if len(ys) == 0:
        return v
    out = img.astype(np.float32)
    w = 0.65 * v * contrast
    out[lesion] = out[lesion] * (1 - w) + pink * w
    size = img.shape[0]
    rim = lesion & ~_erode(lesion, max(1, size // 48))
    w_rim = 0.55 * v * contrast
    out[rim] = out[rim] * (1 - w_rim) + pearl * w_rim
    # Branching vessels: a trunk across the lesion with side branches, drawn on a label canvas and
    # kept inside the lesion (and off the rim).
    canvas = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(canvas)
    cy, cx = float(ys.mean()), float(xs.mean())
    reach = float(np.sqrt(lesion.sum() / np.pi))
    for _ in range(n_vessels):
        ang = rng.uniform(0, 2 * np.pi)
        pts = [(cx + rng.uniform(-0.3, 0.3) * reach, cy + rng.uniform(-0.3, 0.3) * reach)]
        for _step in range(4):
            ang += rng.uniform(-0.7, 0.7)
            step = reach * rng.uniform(0.2, 0.35)
            pts.append((pts[-1][0] + step * np.cos(ang), pts[-1][1] + step * np.sin(ang)))
        d.line(pts, fill=1, width=1)
        x0, y0 = pts[len(pts) // 2]
        b = ang + rng.choice([-1.0, 1.0]) * rng.uniform(0.6, 1.2)
        d.line([(x0, y0), (x0 + 0.3 * reach * np.cos(b), y0 + 0.3 * reach * np.sin(b))], fill=1, width=1)
    lines = (np.asarray(canvas) > 0) & lesion & ~rim
    w_v = min(1.0, 0.35 + 0.65 * v) * contrast
    out[lines] = out[lines] * (1 - w_v) + np.asarray(vessel, np.float32) * w_v
    img[...] = np.clip(out, 0, 255).astype(np.uint8)
    return v


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary erosion by a (2r+1)² square: what stays True when every neighbour is True."""
    out = mask.copy()
    for s in range(1, r + 1):
        out[s:] &= mask[:-s]
        out[:-s] &= mask[s:]
        out[:s] = False
        out[-s:] = False
    rows = out.copy()
    for s in range(1, r + 1):
        out[:, s:] &= rows[:, :-s]
        out[:, :-s] &= rows[:, s:]
        out[:, :s] = False
        out[:, -s:] = False
    return out
