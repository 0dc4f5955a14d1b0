"""The audit report: one self-contained HTML file plus ``metrics.json``.

Everything the page shows is inside it: images are base64 PNG ``data:`` URIs, the CSS is inline,
and the only script is a few inline lines that count the images that decoded (a check for tests
and for whoever opens the file). Nothing is fetched from the network.

Per declared concept the page shows the retrieval ROC curve (held-out test split and "all"), the
metrics, the IoU histogram and the top-ranked test samples with their CAV-conditioned heatmap
(red = positive relevance, blue = negative) and the predicted mask's contour (yellow) against the
ground-truth contour (green). The discovery gallery shows the top outliers of both Reveal
perspectives with their predicted-class heatmaps; outliers that carry an artifact the audit did
not declare are flagged.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from medaudit.models.audit.results import (
    AuditReport,
    ConceptAudit,
    LocalizedSample,
    Outlier,
    StyleExample,
    StyleRow,
    write_metrics,
)

#: Quality targets of an audit (retrieval AUROC, localization IoU, discovery hit rate); shown next
#: to the measured values, never used to alter anything.
TARGET_AUROC, TARGET_IOU, TARGET_DISCOVERY = 0.95, 0.5, 0.5
#: Per-style targets (issue 23): detection at the bank's FPR on unseen styles, and the most
#: another concept may fire on them.
TARGET_DETECTION, MAX_CONFUSION = 0.9, 0.10
PRED_COLOUR = (255, 215, 0)  # predicted mask contour
GT_COLOUR = (0, 230, 64)  # ground-truth contour
_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccd}
h3{font-size:15px;margin:18px 0 6px} .muted{color:#667} table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ccd;padding:3px 8px;text-align:right} th{background:#f1f3f7}
td:first-child,th:first-child{text-align:left} .ok{color:#0a7a2a;font-weight:600}
.miss{color:#b3261e;font-weight:600} .row{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start}
.card{border:1px solid #ccd;border-radius:4px;padding:4px;width:max-content;font-size:12px}
.card img{display:block;image-rendering:pixelated} .flag{border:3px solid #d0021b;background:#fff3f3}
.badge{display:inline-block;background:#d0021b;color:#fff;border-radius:3px;padding:0 4px;margin:2px 0}
.notes li{color:#6b4e00} .legend span{display:inline-block;width:12px;height:12px;margin:0 4px -2px 10px}
"""
# Counts decoded images after load and writes the result into the page; no external code.
_CHECK_SCRIPT = """
window.addEventListener('load',function(){var im=document.images,ok=0;
for(var i=0;i<im.length;i++){if(im[i].complete&&im[i].naturalWidth>0)ok++;}
var d=document.getElementById('img-check');d.setAttribute('data-loaded',ok);
d.setAttribute('data-total',im.length);d.textContent=ok+' of '+im.length+' images rendered';});
"""


# ------------------------------------------------------------------------------------------ images


def png_data_uri(rgb: np.ndarray) -> str:
    """H×W×3 (or H×W×4) uint8 -> ``data:image/png;base64,...``."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _upscale(a: np.ndarray, factor: int) -> np.ndarray:
    return a if factor == 1 else np.repeat(np.repeat(a, factor, axis=0), factor, axis=1)


def _scale_for(size: int) -> int:
    return max(1, 160 // max(size, 1))


def heat_overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heatmap in a red (positive) / blue (negative) colormap over a faded copy of the image.

    The colour scale is symmetric, ±max|H|, so red and blue are comparable; opacity grows with |H|.
    """
    h = np.asarray(heatmap, dtype=np.float64)
    peak = float(np.abs(h).max())
    u = h / peak if peak > 0 else np.zeros_like(h)
    red = np.array([214.0, 39.0, 40.0])
    blue = np.array([31.0, 90.0, 200.0])
    colour = np.where(u[..., None] >= 0, red, blue)
    alpha = (np.abs(u) ** 0.6 * 0.85)[..., None]
    base = image.astype(np.float64)
    grey = base.mean(axis=2, keepdims=True)
    faded = 0.45 * base + 0.35 * grey + 0.2 * 255
    return np.clip(faded * (1 - alpha) + colour * alpha, 0, 255).astype(np.uint8)


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it (a one-pixel contour)."""
    m = np.asarray(mask, dtype=bool)
    p = np.pad(m, 1, constant_values=False)
    inner = p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return m & ~inner


def draw_contours(rgb: np.ndarray, pred: np.ndarray | None, gt: np.ndarray | None, factor: int) -> np.ndarray:
    """Upscale ``rgb`` by ``factor`` and draw the predicted (yellow) and GT (green) contours on it."""
    out = _upscale(rgb, factor).copy()
    for mask, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
        if mask is not None and np.any(mask):
            out[_boundary(_upscale(np.asarray(mask, dtype=bool), factor))] = colour
    return out


# ------------------------------------------------------------------------------------------ plots


def _figure_uri(fig: object) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)  # type: ignore[arg-type]
    buf = io.BytesIO()
    canvas.print_png(buf)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def roc_plot(c: ConceptAudit) -> str:
    """ROC curve of the held-out scores (and the AUROC of "all" in the legend), as a data URI."""
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_curve

    fig = Figure(figsize=(3.4, 3.1), dpi=100)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], ls=":", c="#999", lw=1)
    held = c.retrieval.get("held_out")
    if held is not None:
        fpr, tpr, _ = roc_curve(c.test_labels, c.test_scores)
        ax.plot(fpr, tpr, c="#c62828", lw=2, label=f"held-out test  AUROC {held.auroc:.3f}")
    if "all" in c.retrieval:
        ax.plot([], [], c="none", label=f'"all" (incl. CAV fit)  AUROC {c.retrieval["all"].auroc:.3f}')
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_title(f"{c.name} @ {c.layer}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    fig.tight_layout()
    return _figure_uri(fig)


def iou_histogram(c: ConceptAudit) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.4, 3.1), dpi=100)
    ax = fig.add_subplot()
    ax.hist(c.iou, bins=[k / 20 for k in range(21)], color="#2e6fba", edgecolor="white")
    ax.axvline(float(c.iou.mean()), c="#c62828", lw=1.5, label=f"mean {c.iou.mean():.3f}")
    ax.axvline(TARGET_IOU, c="#555", ls=":", lw=1, label=f"target {TARGET_IOU}")
    ax.set_xlabel("IoU (binarised CAV heatmap vs GT mask)")
    ax.set_ylabel("test images")
    ax.set_title(f"{c.name}: n = {len(c.iou)}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _figure_uri(fig)


# ------------------------------------------------------------------------------------------ html


def _e(x: object) -> str:
    return html.escape(str(x))


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None or x != x else f"{x:.{digits}f}"


def _mark(value: float | None, target: float) -> str:
    if value is None or value != value:
        return "–"
    cls = "ok" if value >= target else "miss"
    return f'<span class="{cls}">{value:.3f}</span>'


def _img(uri: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{uri}" alt="{_e(alt)}"{w}>'


def _summary_table(report: AuditReport) -> str:
    rows = []
    for name, c in report.concepts.items():
        held, allm = c.retrieval.get("held_out"), c.retrieval.get("all")
        iou_mean = float(c.iou.mean()) if len(c.iou) else None
        rho_mean = float(c.rho.mean()) if len(c.rho) else None
        rows.append(
            f"<tr><td>{_e(name)}</td><td>{_e(c.layer)}</td>"
            f"<td>{_mark(held.auroc if held else None, TARGET_AUROC)}</td>"
            f"<td>{_fmt(held.ap if held else None)}</td><td>{_fmt(held.kendall_tau if held else None)}</td>"
            f"<td>{held.n_pos if held else 0}/{held.n if held else 0}</td>"
            f"<td>{_fmt(allm.auroc if allm else None)}</td><td>{_fmt(allm.ap if allm else None)}</td>"
            f"<td>{_mark(iou_mean, TARGET_IOU)}</td><td>{_fmt(rho_mean)}</td><td>{len(c.iou)}</td></tr>"
        )
    head = (
        "<tr><th>concept</th><th>layer</th><th>AUROC (test)</th><th>AP (test)</th><th>τ (test)</th>"
        '<th>pos/n (test)</th><th>AUROC ("all")</th><th>AP ("all")</th><th>mean IoU</th><th>mean ρ</th>'
        "<th>n localized</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _localized_card(s: LocalizedSample, concept: str) -> str:
    f = _scale_for(s.image.shape[0])
    overlay = draw_contours(heat_overlay(s.image, s.heatmap), s.mask, s.gt_mask, f)
    label = "carries" if s.carries else "does not carry"
    cls = "card" if s.carries else "card flag"
    return (
        f'<div class="{cls}">'
        f'<div class="row">{_img(png_data_uri(_upscale(s.image, f)), f"image {s.index}")}'
        f"{_img(png_data_uri(overlay), f'{concept} heatmap {s.index}')}</div>"
        f"#{s.rank} · id {s.index} · score {s.score:.3f}<br>{label} {_e(concept)}"
        f" · IoU {_fmt(s.iou)}</div>"
    )


def _concept_section(c: ConceptAudit) -> str:
    parts = [f'<h3 id="concept-{_e(c.name)}">{_e(c.name)}</h3>']
    cav = c.cav
    parts.append(
        f'<p class="muted">CAV {_e(cav.get("kind"))} at {_e(c.layer)}, scope classes {list(c.scope)}, '
        f"fitted on {cav.get('n_pos')} with / {cav.get('n_neg')} without, C = {_e(cav.get('reg'))}, "
        f"CV accuracy {_fmt(cav.get('cv_score'))}; presence threshold {c.threshold:.4g}.</p>"
    )
    plots = [_img(roc_plot(c), f"ROC {c.name}")] if "held_out" in c.retrieval else []
    if len(c.iou):
        plots.append(_img(iou_histogram(c), f"IoU histogram {c.name}"))
    parts.append(f'<div class="row">{"".join(plots)}</div>')
    if c.note:
        parts.append(f'<p class="muted">{_e(c.note)}</p>')
    if c.gallery:
        parts.append(
            f"<p>Top {len(c.gallery)} test samples by CAV score: image, and CAV-conditioned heatmap with "
            'the predicted mask <span style="color:#b89b00">(yellow)</span> and the ground truth '
            '<span style="color:#00a030">(green)</span>. Red frame: the sample does not carry the '
            "artifact.</p>"
        )
        parts.append(f'<div class="row">{"".join(_localized_card(s, c.name) for s in c.gallery)}</div>')
    return "".join(parts)


def _style_card(e: StyleExample, concept: str) -> str:
    f = _scale_for(e.image.shape[0])
    img = draw_contours(e.image, e.pred_mask, e.gt_mask, f)
    state = "present" if e.present else "not present"
    return (
        f'<div class="card">{_img(png_data_uri(img), f"{concept} style image {e.index}")}'
        f"id {e.index} · {state} · IoU {_fmt(e.iou)}</div>"
    )


def _style_row(r: StyleRow) -> str:
    conf = (
        "–"
        if r.confusion is None
        else f'<span class="{"ok" if r.confusion <= MAX_CONFUSION else "miss"}">{r.confusion:.3f}</span>'
    )
    others = ", ".join(f"{_e(b)} {v:.2f}" for b, v in r.other_present.items() if v > 0) or "–"
    return (
        f"<tr><td>{_e(r.style)}</td><td>{'seen' if r.seen else 'unseen'}</td>"
        f"<td>{_e(', '.join(r.splits))}</td><td>{r.n}</td><td>{_mark(r.detection, TARGET_DETECTION)}</td>"
        f"<td>{_mark(r.auroc, TARGET_AUROC)}</td>"
        f"<td>{_mark(r.iou_mean, TARGET_IOU)} ({r.n_localized})</td><td>{conf}</td><td>{others}</td>"
        f"<td>{_fmt(r.effect)}</td><td>{_mark(r.detection_weighted, TARGET_DETECTION)}</td></tr>"
    )


def _styles_section(report: AuditReport) -> str:
    st = report.styles
    if st is None:
        return ""
    parts = [
        "<h2>Concepts per artifact style: seen and unseen</h2>",
        "<p>Held-out test images carrying each concept's artifact, per style. <i>Seen</i>: the "
        "training split has the style (the model and the CAV saw it); <i>unseen</i>: it does not. "
        f"Detection: concept present at the bank's FPR (target ≥ {TARGET_DETECTION}); AUROC against "
        f"every held-out image without the artifact; IoU over the localized ones (count in brackets); "
        f"confusion: another concept present whose artifact the image lacks (≤ {MAX_CONFUSION}). "
        "Effect: how far the artifact moves the model's class probabilities (total variation "
        "against the same image rendered without it; – where the dataset cannot render that); "
        "weighted detection: detection weighted by each image's effect, the share of the "
        "artifact's pull on the model that the concept catches. The concepts read the model's own "
        "features, so a style the model hardly reacts to can go undetected without hiding a "
        "shortcut. Contours: ground truth green, predicted mask yellow.</p>",
        f"<p>Clean held-out images (no annotated artifact, n = {st.n_clean}): any concept present on "
        f"{_fmt(st.clean_any_present)}.</p>",
    ]
    if st.note:
        parts.append(f'<p class="muted">{_e(st.note)}</p>')
    head = (
        "<tr><th>style</th><th>seen</th><th>splits</th><th>n</th><th>detection</th><th>AUROC</th>"
        "<th>mean IoU (n)</th><th>confusion</th><th>other concepts present</th><th>effect</th>"
        "<th>weighted detection</th></tr>"
    )
    for concept, rows in st.rows.items():
        groups = "".join(_style_row(r) for r in st.groups[concept].values())
        parts.append(
            f'<h3 id="styles-{_e(concept)}">{_e(concept)} by style</h3>'
            f"<table>{head}{groups}{''.join(_style_row(r) for r in rows)}</table>"
        )
        for r in rows:
            if r.gallery:
                cards = "".join(_style_card(e, concept) for e in r.gallery)
                parts.append(f'<p class="muted">{_e(r.style)}</p><div class="row">{cards}</div>')
    return "".join(parts)


def _outlier_card(o: Outlier, labels: Sequence[str], undeclared: set[str]) -> str:
    f = _scale_for(o.image.shape[0])
    hidden = [a for a in o.artifacts if a in undeclared]
    cls = "card flag" if hidden else "card"
    badge = "".join(f'<span class="badge">carries {_e(a)}</span> ' for a in hidden)
    known = ", ".join(a for a in o.artifacts if a not in undeclared) or "no declared artifact"
    label = labels[o.label] if 0 <= o.label < len(labels) else str(o.label)
    return (
        f'<div class="{cls}">'
        f'<div class="row">{_img(png_data_uri(_upscale(o.image, f)), f"outlier {o.index}")}'
        f"{_img(png_data_uri(_upscale(heat_overlay(o.image, o.heatmap), f)), f'heatmap {o.index}')}</div>"
        f"#{o.rank} · id {o.index} · {_e(label)}<br>{_e(o.evidence)}<br>{badge}{_e(known)}</div>"
    )


def _discovery_section(report: AuditReport) -> str:
    d = report.discovery
    labels = report.cfg.labels
    undeclared = set(d.hits)
    parts = ["<h2>Discovery (Reveal, method.md §6)</h2>"]
    if d.hits:
        rows = "".join(
            f"<tr><td>{_e(a)}</td><td>{_mark(h['spray'] / d.top_k, TARGET_DISCOVERY)} ({h['spray']})</td>"
            f"<td>{_mark(h['channels'] / d.top_k, TARGET_DISCOVERY)} ({h['channels']})</td>"
            f"<td>{_fmt(d.base_rate.get(a))}</td></tr>"
            for a, h in d.hits.items()
        )
        parts.append(
            f"<p>Artifacts annotated in the dataset but <b>not declared</b> to the audit, and the share "
            f"of the top {d.top_k} outliers of each method that carry them (ground truth from the "
            f"dataset's annotations; the base rate is what a random pick would give):</p>"
            f"<table><tr><th>artifact</th><th>SpRAy top-{d.top_k}</th><th>channels top-{d.top_k}</th>"
            f"<th>base rate</th></tr>{rows}</table>"
        )
    if d.note:
        parts.append(f'<p class="muted">{_e(d.note)}</p>')
    parts.append(
        "<h3>Data perspective: SpRAy</h3><p>Input heatmaps of the predicted class, per true class: "
        "spectral embedding of the kNN graph, then local outlier factor; the outliers of all classes "
        "in one list by LOF. Red frame: carries an undeclared artifact.</p>"
    )
    parts.append(
        f'<div class="row">{"".join(_outlier_card(o, labels, undeclared) for o in d.spray_top)}</div>'
    )
    parts.append(
        f"<h3>Model perspective: channel {_e(d.features)} at {_e(d.layer)}</h3><p>Channels ranked by "
        f"tail concentration: how far above its median (robust z) the channel's max-pooled "
        f"{_e(d.features)} is on its top 1% of samples; a channel an artifact drives is quiet "
        "elsewhere. Shown are the samples that make the top channels outliers (z &gt; 3.5). LOF and "
        "cluster size (cosine distances of the channels' patterns) are further evidence.</p>"
    )
    if d.channels is not None:
        r = d.channels
        n = min(d.top_k // 2, len(r.channels))
        rows = "".join(
            f"<tr><td>{int(r.channels[i])}</td><td>{r.tail[i]:.1f}</td><td>{r.lof[i]:.3f}</td>"
            f"<td>{int(r.cluster[i])}</td>"
            f"<td>{int(r.cluster_size[i])}</td><td>{r.relevance[i]:.3g}</td></tr>"
            for i in range(n)
        )
        parts.append(
            "<table><tr><th>channel</th><th>tail z</th><th>LOF</th><th>cluster</th><th>cluster size</th>"
            f"<th>mean relevance</th></tr>{rows}</table>"
        )
    parts.append(
        f'<div class="row">{"".join(_outlier_card(o, labels, undeclared) for o in d.channel_top)}</div>'
    )
    return "".join(parts)


def render_html(report: AuditReport, title: str | None = None) -> str:
    """The whole report as one HTML string (no external resource)."""
    title = title or f"medaudit audit: {report.model_version} on {report.dataset}"
    splits = ", ".join(f"{s} {c['audited']}/{c['available']}" for s, c in report.splits.items())
    acc = ", ".join(f"{s} {100 * a:.1f}%" for s, a in report.accuracy.items())
    notes = "".join(f"<li>{_e(n)}</li>" for n in report.notes)
    body = [
        f"<h1>{_e(title)}</h1>",
        f'<p class="muted">generated {datetime.now(UTC).isoformat(timespec="seconds")} · '
        f"architecture {_e(report.cfg.arch)} · input {report.cfg.input_size[-1]} px · CAV "
        f"{_e(report.cav_kind)} · default layer {_e(report.layer)} · samples audited: {_e(splits)} · "
        f"accuracy: {_e(acc)} · "
        f'<a href="metrics.json">metrics.json</a> · <span id="img-check">images not checked</span></p>',
        f'<ul class="notes">{notes}</ul>' if notes else "",
        "<h2>Concepts: retrieval and localization (method.md §1.5, §2)</h2>",
        f"<p>Targets: held-out AUROC ≥ {TARGET_AUROC}, mean IoU ≥ {TARGET_IOU} "
        '(<span class="ok">met</span> / <span class="miss">missed</span>). "all" includes the '
        "training samples the CAV was fitted on and is optimistic (method.md §1.5).</p>",
        _summary_table(report),
        *(_concept_section(c) for c in report.concepts.values()),
        _styles_section(report),
        _discovery_section(report),
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body>{''.join(body)}<script>{_CHECK_SCRIPT}</script></body></html>\n"
    )


def write_report(report: AuditReport, out_dir: str | Path, title: str | None = None) -> Path:
    """Writes ``report.html`` and ``metrics.json`` into ``out_dir``; returns the HTML path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(report, out)
    path = out / "report.html"
    path.write_text(render_html(report, title), encoding="utf-8")
    return path
