"""``medaudit scan report DIR``: a finished (or partial) scan summarised as one self-contained page.

``DIR/report.html`` shows, in the audit report's style (models/audit/report.py: inline CSS, images
as ``data:`` URIs, the same image-count check for browsers and tests):

* the totals: images, decoded, errors, flagged, per concept present and flagged;
* the prevalence of each concept (share of decoded images where it is present) per predicted
  class, per true class when the source knew it, and per source folder (site), as tables and
  bar charts;
* each concept's score distribution per predicted class, with its presence threshold;
* the top-N images per concept by score (the retrieval view), as thumbnails;
* the files that failed, with their error.

``DIR/review.csv`` feeds the annotation / review loop: per concept its top-ranked present images
in the columns of ``medaudit annotate``'s review sheet (``verdict`` empty, for a reviewer);
``DIR/errors.csv`` lists every file that failed.
"""

from __future__ import annotations

import csv
import html
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medaudit.cli.scan.output import ScanFolder
from medaudit.models.audit.report import _CHECK_SCRIPT, _CSS, _figure_uri, png_data_uri
from medaudit.models.audit.review import SHEET_COLUMNS

#: Thumbnail side in the top-N view (px).
THUMB = 96
#: Folders shown one by one; more are grouped by their first path component (the site).
MAX_FOLDERS = 30


def _e(x: object) -> str:
    return html.escape(str(x))


def _pct(x: float) -> str:
    return "–" if x != x else f"{100 * x:.1f}%"


def _prevalence(
    values: np.ndarray, present: dict[str, np.ndarray], concepts: Sequence[str]
) -> list[list[Any]]:
    """Rows ``[group, n, share present per concept...]`` for each distinct value, largest first."""
    rows = []
    keys, counts = np.unique(values.astype(str), return_counts=True)
    for key, n in sorted(zip(keys, counts, strict=True), key=lambda t: (-t[1], t[0])):
        sel = values.astype(str) == key
        rows.append([key, int(n), *(float(present[c][sel].mean()) for c in concepts)])
    return rows


def _table(head: str, rows: list[list[Any]], concepts: Sequence[str]) -> str:
    cells = "".join(
        f"<tr><td>{_e(r[0])}</td><td>{r[1]}</td>{''.join(f'<td>{_pct(v)}</td>' for v in r[2:])}</tr>"
        for r in rows
    )
    th = "".join(f"<th>{_e(c)}</th>" for c in concepts)
    return f"<table><tr><th>{_e(head)}</th><th>images</th>{th}</tr>{cells}</table>"


def _bars(title: str, rows: list[list[Any]], concepts: Sequence[str]) -> str:
    from matplotlib.figure import Figure

    rows = rows[:MAX_FOLDERS]
    fig = Figure(figsize=(max(3.6, 0.5 * len(rows) * max(1, len(concepts)) + 1.5), 3.0), dpi=100)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    w = 0.8 / max(1, len(concepts))
    for j, c in enumerate(concepts):
        ax.bar(x + j * w, [100 * r[2 + j] for r in rows], width=w, label=c)
    ax.set_xticks(x + 0.4 - w / 2, [str(r[0]) for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("present (% of images)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return f'<img src="{_figure_uri(fig)}" alt="{_e(title)}">'


def _histogram(concept: str, scores: np.ndarray, pred: np.ndarray, threshold: float) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.0), dpi=100)
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(np.append(scores, threshold), bins=30).tolist()
    for label in sorted(set(pred.tolist())):
        ax.hist(scores[pred == label], bins=bins, alpha=0.6, label=f"predicted {label}")
    ax.axvline(threshold, c="#c62828", lw=1.5, ls="--", label=f"threshold {threshold:.3g}")
    ax.set_xlabel("CAV score ⟨φ(x), v⟩")
    ax.set_ylabel("images")
    ax.set_title(f"{concept}: n = {len(scores)}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return f'<img src="{_figure_uri(fig)}" alt="{_e(concept)} score distribution">'


def _by_score(concept: str) -> Callable[[dict[str, Any]], float]:
    """Sort key: highest ``concept`` score first."""
    return lambda r: -float(r[f"{concept}_score"])


def _thumbnail(path: str) -> str | None:
    """A THUMB px PNG data URI of the file, decoded as the scan decoded it; None if it fails now."""
    from medaudit.service.inputs import decode_image

    try:
        with open(path, "rb") as f:
            img = decode_image(f.read())
    except Exception:  # moved or changed since the scan: the card says so instead
        return None
    im = Image.fromarray(np.ascontiguousarray(img.rgb))
    scale = THUMB / max(im.size)  # small images are enlarged too (pixels kept sharp), large ones reduced
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    im = im.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.BICUBIC)
    return png_data_uri(np.asarray(im))


def _top_cards(concept: str, rows: list[dict[str, Any]]) -> str:
    cards = []
    for rank, r in enumerate(rows, 1):
        uri = _thumbnail(r["path"])
        img = (
            f'<img src="{uri}" alt="{_e(r["id"])}">' if uri else '<p class="muted">(file unreadable now)</p>'
        )
        badge = '<span class="badge">flagged</span><br>' if r["flagged"] else ""
        cls = "card flag" if r["flagged"] else "card"
        cards.append(
            f'<div class="{cls}">{img}{badge}#{rank} {_e(r["id"])}<br>score {r[f"{concept}_score"]:.3g} · '
            f"pct {r[f'{concept}_percentile']:.1f}<br>share {r[f'{concept}_share']:.2f} · "
            f"pred {_e(r['pred_label'])}</div>"
        )
    return f'<div class="row">{"".join(cards)}</div>'


def write_scan_report(directory: str | Path, top: int = 12, review: int = 200) -> Path:
    """Writes ``report.html``, ``review.csv`` and ``errors.csv`` into the scan folder ``directory``.

    Args:
        directory: A scan folder (``medaudit scan --out``); unfinished shards are left out and the
            page says how many images it covers.
        top: Thumbnails per concept in the retrieval view.
        review: Images per concept in ``review.csv`` (top-ranked among those it is present in).

    Returns:
        The HTML path.
    """
    folder = ScanFolder(directory)
    manifest = folder.read_manifest()
    concepts: list[str] = list(manifest["concepts"])
    thresholds: dict[str, float] = manifest["thresholds"]
    wanted = ["id", "path", "folder", "label", "ok", "error", "pred_label", "flagged", "flag_concepts"]
    wanted += [f"{c}_{k}" for c in concepts for k in ("score", "percentile", "present", "share")]
    table = folder.read(wanted)
    rows = table.to_pylist()
    good = [r for r in rows if r["ok"]]
    bad = [r for r in rows if not r["ok"]]
    root = folder.root
    with (root / "errors.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["image", "path", "error"])
        w.writerows([r["id"], r["path"], r["error"]] for r in bad)
    present = {c: np.array([bool(r[f"{c}_present"]) for r in good]) for c in concepts}
    pred = np.array([r["pred_label"] for r in good], dtype=object)
    folders = np.array([r["folder"] for r in good], dtype=object)
    sites = np.array([str(r["folder"]).split("/")[0] for r in good], dtype=object)
    ranked = {c: sorted((r for r in good if r[f"{c}_present"]), key=_by_score(c)) for c in concepts}
    with (root / "review.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(SHEET_COLUMNS)
        for c in concepts:
            for rank, r in enumerate(ranked[c][:review], 1):
                w.writerow([c, rank, r["id"], f"{r[f'{c}_score']:.6g}", r["label"] or "", "all", "", ""])

    n_flag = sum(bool(r["flagged"]) for r in good)
    body = [
        f"<h1>medaudit scan: {_e(manifest['version'])} on {_e(manifest['source'])}</h1>",
        f'<p class="muted">generated {datetime.now(UTC).isoformat(timespec="seconds")} · '
        f"{len(rows)} of {manifest['n_items']} images in finished shards · decoded {len(good)} · "
        f"errors {len(bad)} · flagged {n_flag} · concept layer {_e(manifest['layer'])} · presence FPR "
        f"{manifest['presence_fpr']} · "
        '<a href="review.csv">review.csv</a> · <a href="errors.csv">errors.csv</a> · '
        '<span id="img-check">images not checked</span></p>',
        "<h2>Concepts</h2>",
        "<table><tr><th>concept</th><th>threshold</th><th>present</th><th>share of decoded</th>"
        "<th>flagged for it</th></tr>"
        + "".join(
            f"<tr><td>{_e(c)}</td><td>{thresholds[c]:.4g}</td><td>{int(present[c].sum())}</td>"
            f"<td>{_pct(float(present[c].mean()) if len(good) else float('nan'))}</td>"
            f"<td>{sum(c in (r['flag_concepts'] or []) for r in good)}</td></tr>"
            for c in concepts
        )
        + "</table>",
    ]
    if good:
        by_pred = _prevalence(pred, present, concepts)
        body += ["<h2>Prevalence per predicted class</h2>", _table("predicted", by_pred, concepts)]
        body.append(_bars("present per predicted class", by_pred, concepts))
        labels = np.array([r["label"] or "" for r in good], dtype=object)
        if all(labels):
            by_label = _prevalence(labels, present, concepts)
            body += ["<h2>Prevalence per true class</h2>", _table("label", by_label, concepts)]
        by_folder = _prevalence(folders, present, concepts)
        if len(by_folder) > MAX_FOLDERS:
            by_folder = _prevalence(sites, present, concepts)
            body.append("<h2>Prevalence per site (first folder level)</h2>")
        else:
            body.append("<h2>Prevalence per source folder</h2>")
        body += [_table("folder", by_folder, concepts), _bars("present per folder", by_folder, concepts)]
        body.append('<h2>Score distributions</h2><div class="row">')
        for c in concepts:
            scores = np.array([r[f"{c}_score"] for r in good], dtype=np.float64)
            body.append(_histogram(c, scores, pred, float(thresholds[c])))
        body.append("</div>")
        body.append(f"<h2>Top {top} images per concept (the retrieval view)</h2>")
        for c in concepts:
            by_score = sorted(good, key=_by_score(c))[:top]
            body += [f"<h3>{_e(c)}</h3>", _top_cards(c, by_score)]
    if bad:
        shown = "".join(f"<tr><td>{_e(r['id'])}</td><td>{_e(r['error'])}</td></tr>" for r in bad[:100])
        more = f'<p class="muted">{len(bad) - 100} more in errors.csv</p>' if len(bad) > 100 else ""
        body.append(
            f"<h2>Files that failed ({len(bad)})</h2><table><tr><th>image</th><th>error</th></tr>{shown}"
            f"</table>{more}"
        )
    title = f"medaudit scan: {manifest['version']}"
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}<script>{_CHECK_SCRIPT}</script></body></html>\n"
    )
    path = root / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
