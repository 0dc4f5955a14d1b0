"""The review loop of method.md §1 and §6: rank by CAV score, a person looks, verdicts become labels.

:func:`rank` scores every image of a split by s(x) = ⟨φ(x), v⟩ (§1.4) with a CAV fitted on the
current annotations (:mod:`~medaudit.models.audit.annotated`); :func:`write_sheet` writes the
ranking as a review sheet, a CSV with an empty ``verdict`` column and an HTML contact sheet of
thumbnails in rank order where a reviewer clicks yes/no and downloads the filled CSV;
:func:`apply_sheet` turns the verdicts into annotations (yes adds the artifact to the image,
no removes it, blank leaves it), ready for the next fit.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import nn

from medaudit.models.audit.annotated import AnnotationCav, pooled
from medaudit.models.audit.options import Progress
from medaudit.models.data.files import column, line, read_csv
from medaudit.models.data.protocol import AnnotatedDataset
from medaudit.models.errors import DatasetError
from medaudit.models.registry import ModelCfg

SHEET_COLUMNS = ("concept", "rank", "image", "score", "label", "split", "annotated", "verdict")
#: Verdict spellings a reviewer may type; blank leaves the image as it is.
VERDICTS: dict[str, bool | None] = {
    "yes": True, "y": True, "1": True, "true": True, "artifact": True,
    "no": False, "n": False, "0": False, "false": False, "clean": False,
    "": None,
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class Ranking:
    """A split ranked by one concept's CAV score, highest first.

    Attributes:
        fitted: The CAV and what it was fitted on.
        split: The ranked split.
        index: Sample indices in rank order.
        score: s(x) per ranked sample, same order.
        annotated: Whether each ranked sample is annotated with the concept already.
    """

    fitted: AnnotationCav
    split: str
    index: np.ndarray
    score: np.ndarray
    annotated: np.ndarray


def rank(
    model: nn.Module,
    cfg: ModelCfg,
    ds: AnnotatedDataset,
    fitted: AnnotationCav,
    split: str = "all",
    progress: Progress | None = None,
) -> Ranking:
    """Every image of ``split`` ranked by s(x) = ⟨φ(x), v⟩ (method.md §1.4), highest first."""
    idx = np.asarray(ds.indices(split))
    s = pooled(model, cfg, ds, idx, fitted.layer, progress, f"score {split}") @ fitted.v
    order = np.argsort(-s, kind="stable")
    carriers = set(ds.artifact_ids("all").get(fitted.artifact, []))
    ranked = idx[order]
    return Ranking(
        fitted, split, ranked, s[order], np.array([int(i) in carriers for i in ranked], dtype=bool)
    )


def write_sheet(
    ranking: Ranking,
    ds: AnnotatedDataset,
    out: str | Path,
    *,
    thumbs: int = 200,
    thumb_px: int = 96,
    meta: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> tuple[Path, Path]:
    """The review sheet: ``<concept>_review.csv`` (every ranked image) and ``<concept>_review.html``
    (the top ``thumbs`` as thumbnails, each with yes/no buttons and a download of the filled CSV).

    Returns:
        (csv path, html path).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    concept = ranking.fitted.artifact
    split_of = {int(i): name for name in ("train", "val", "test") for i in ds.indices(name)}
    rows = [
        {
            "concept": concept,
            "rank": r + 1,
            "image": ds.ids[int(i)],
            "score": f"{ranking.score[r]:.6g}",
            "label": ds.label_names[int(ds.labels[int(i)])],
            "split": split_of.get(int(i), ""),
            "annotated": "yes" if ranking.annotated[r] else "no",
            "verdict": "",
        }
        for r, i in enumerate(ranking.index)
    ]
    csv_path = out / f"{concept}_review.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    n = min(thumbs, len(rows))
    adv = progress("thumbnails", n) if progress and n else None
    cards = []
    for r in range(n):
        cards.append(_card(rows[r], _thumb(ds.load_image(int(ranking.index[r]), thumb_px))))
        if adv:
            adv(1)
    info = {
        "concept": concept,
        "layer": ranking.fitted.layer,
        "split": ranking.split,
        "cav": ranking.fitted.cav.meta(),
        "scope": [ds.label_names[k] for k in ranking.fitted.scope],
        **(meta or {}),
    }
    html_path = out / f"{concept}_review.html"
    html_path.write_text(_page(info, rows, cards, csv_path.name), encoding="utf-8")
    return csv_path, html_path


def _thumb(img: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=85)  # a quarter of a PNG's size
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _card(row: Mapping[str, Any], jpeg: str) -> str:
    e = html.escape
    badge = '<span class="badge">annotated</span>' if row["annotated"] == "yes" else ""
    return (
        f'<div class="card" data-image="{e(str(row["image"]))}"><img src="data:image/jpeg;base64,{jpeg}" '
        f'alt="{e(str(row["image"]))}"><div class="meta">#{row["rank"]} · s = {e(str(row["score"]))}'
        f"<br>{e(str(row['image']))}<br>{e(str(row['label']))} · {row['split']} {badge}</div>"
        '<div class="vote"><button class="yes">yes</button><button class="no">no</button></div></div>'
    )


_STYLE = (
    "body{font-family:sans-serif;margin:1em}.grid{display:flex;flex-wrap:wrap;gap:8px}"
    ".card{border:3px solid #ddd;padding:4px;width:140px;font-size:11px}.card img{width:100%;"
    "image-rendering:pixelated}.card.yes{border-color:#2a2}.card.no{border-color:#c33}"
    ".badge{background:#fd3;padding:0 3px}.vote button{width:48%}"
)
_SCRIPT = """
const rows = JSON.parse(document.getElementById('rows').textContent);
const verdict = {};
document.querySelectorAll('.card').forEach(card => {
  for (const v of ['yes', 'no']) card.querySelector('.' + v).onclick = () => {
    const img = card.dataset.image;
    verdict[img] = verdict[img] === v ? '' : v;
    card.classList.remove('yes', 'no');
    if (verdict[img]) card.classList.add(verdict[img]);
  };
});
document.getElementById('download').onclick = () => {
  const cols = %s;
  const q = s => /[",\\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  const lines = [cols.join(',')].concat(rows.map(r =>
    cols.map(c => q(String(c === 'verdict' ? (verdict[r.image] || r.verdict) : r[c]))).join(',')));
  const a = document.createElement('a');
  a.href = URL.createObjectURL(new Blob([lines.join('\\n') + '\\n'], {type: 'text/csv'}));
  a.download = %s;
  a.click();
};
"""


def _page(
    info: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], cards: Sequence[str], csv_name: str
) -> str:
    e = html.escape
    head = ", ".join(
        f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in info.items() if k != "cav"
    )
    script = _SCRIPT % (json.dumps(list(SHEET_COLUMNS)), json.dumps(csv_name))
    data = json.dumps(list(rows)).replace("</", "<\\/")
    return (
        f"<!doctype html><meta charset='utf-8'><title>review {e(str(info['concept']))}</title>"
        f"<style>{_STYLE}</style><h1>Does the image show {e(str(info['concept']))}?</h1>"
        f"<p>{e(head)}. Highest CAV score first; {len(cards)} of {len(rows)} images shown. Click yes or no "
        "(again to clear), then <button id='download'>download the filled sheet</button> and run "
        f"<code>medaudit annotate --apply {e(csv_name)} --data ...</code>.</p>"
        f"<div class='grid'>{''.join(cards)}</div>"
        f"<script type='application/json' id='rows'>{data}</script><script>{script}</script>"
    )


@dataclass(frozen=True)
class Applied:
    """What :func:`apply_sheet` changed, per concept: images added, removed, confirmed."""

    by_artifact: dict[str, list[int]]
    added: dict[str, int]
    removed: dict[str, int]
    confirmed: dict[str, int]


def apply_sheet(sheet: str | Path, ds: AnnotatedDataset) -> Applied:
    """The dataset's annotations with a filled review sheet's verdicts applied.

    Raises:
        DatasetError: A sheet without ``concept``, ``image`` or ``verdict`` columns, an image
            that is not in the dataset, a verdict outside :data:`VERDICTS`, or two rows giving one
            image different verdicts; each naming the sheet's line.
    """
    path = Path(sheet)
    header, rows = read_csv(path, "review sheet")
    cc, ci, cv = (column(path, header, c) for c in ("concept", "image", "verdict"))
    lookup = {sid: i for i, sid in enumerate(ds.ids)}
    current = {a: set(v) for a, v in ds.artifact_ids("all").items()}
    decided: dict[tuple[str, int], tuple[bool, int]] = {}
    for r, row in enumerate(rows):
        cell = (row[cv] if cv < len(row) else "").strip().lower()
        if cell not in VERDICTS:
            valid = ", ".join(k for k in VERDICTS if k)
            raise DatasetError(f"{line(path, r)}: verdict {cell!r}; write one of {valid}, or leave it blank")
        v = VERDICTS[cell]
        if v is None:
            continue
        concept, image = row[cc].strip(), row[ci].strip()
        i = lookup.get(image)
        if i is None:
            raise DatasetError(f"{line(path, r)}: image {image!r} is not in the dataset")
        prev = decided.get((concept, i))
        if prev is not None and prev[0] != v:
            raise DatasetError(
                f"{line(path, r)}: {image!r} has another verdict for {concept!r} at line {prev[1] + 2}"
            )
        decided[(concept, i)] = (v, r)
    added: dict[str, int] = {}
    removed: dict[str, int] = {}
    confirmed: dict[str, int] = {}
    for (concept, i), (v, _) in decided.items():
        have = current.setdefault(concept, set())
        if v and i in have:
            confirmed[concept] = confirmed.get(concept, 0) + 1
        elif v:
            have.add(i)
            added[concept] = added.get(concept, 0) + 1
        elif i in have:
            have.discard(i)
            removed[concept] = removed.get(concept, 0) + 1
    return Applied({a: sorted(v) for a, v in current.items()}, added, removed, confirmed)
