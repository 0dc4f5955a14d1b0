"""Model cards: one JSON + Markdown file per model version, and a comparison table across versions.

A card records what a version *is* (architecture, data config, correction and its parameters,
CAV layer and type), how it scores (every metric of :mod:`medaudit.models.evaluate`) and which bytes it
is (sha256 of the weights file and of the ONNX file, plus the ONNX parity result).

The comparison table follows the paper's layout: one row per version; columns clean accuracy,
attacked accuracy, attacked accuracy of the focus class, gap recovered, artifact relevance, TCAV
quotient and retrieval AUROC of the original CAV. **Gap recovered** is the share of the
attack-induced accuracy drop of the baseline (the original model) that a version wins back:
100 · (acc_att(version) − acc_att(base)) / (acc_clean(base) − acc_att(base)); undefined (null)
when the baseline loses nothing on the attacked set. Over all classes here (the column says so);
the build's acceptance table (:func:`medaudit.models.pipeline.acceptance`) reports it on the
attacked class's images alone, which is a different number (P-ClArC on the demo: 90.9 % here,
98.6 % there).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medaudit.models.errors import ConfigError
from medaudit.models.train import sha256_file
from medaudit.models.xai.concepts import library_versions

CARD_FORMAT = "medaudit.model_card"
CARD_FORMAT_VERSION = 1
CARD_JSON, CARD_MD = "card.json", "card.md"
#: Per-class metrics of :func:`medaudit.models.evaluate.classification_metrics`: key prefix -> name.
PER_CLASS = {"accuracy_": "accuracy", "acc_ovr_": "one-vs-rest accuracy", "auc_": "AUC", "fpr_": "FPR"}
#: How a card names where its artifact masks (RRR, artifact relevance, the attacked set) came from.
MASK_SOURCE_TEXT = {
    "ground_truth": "ground truth (drawn or annotated pixel masks)",
    "derived": "derived from the concept (binarised CAV heatmaps, `medaudit localize --export-masks`)",
    "none": "none (no RRR, no attacked set, no artifact relevance)",
}


@dataclass(frozen=True)
class ModelCard:
    """One version's card. ``to_dict`` is the JSON; ``to_markdown`` the human-readable form."""

    name: str  # "<model name>:<version>"
    version: str
    architecture: Mapping[str, Any]
    data: Mapping[str, Any]
    correction: Mapping[str, Any]
    metrics: Mapping[str, Any]
    files: Mapping[str, Any]
    created_at: str = ""
    library_versions: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": CARD_FORMAT,
            "format_version": CARD_FORMAT_VERSION,
            "name": self.name,
            "version": self.version,
            "architecture": dict(self.architecture),
            "data": dict(self.data),
            "correction": dict(self.correction),
            "metrics": dict(self.metrics),
            "files": dict(self.files),
            "created_at": self.created_at,
            "library_versions": dict(self.library_versions),
            "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        if d.get("format") != CARD_FORMAT:
            raise ConfigError(f"not a {CARD_FORMAT} document (format {d.get('format')!r})")
        return cls(
            name=d["name"],
            version=d["version"],
            architecture=d["architecture"],
            data=d["data"],
            correction=d["correction"],
            metrics=d["metrics"],
            files=d["files"],
            created_at=d.get("created_at", ""),
            library_versions=d.get("library_versions", {}),
            notes=tuple(d.get("notes", ())),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Writes ``card.json`` and ``card.md`` into ``directory``."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        (out / CARD_JSON).write_text(self.to_json())
        (out / CARD_MD).write_text(self.to_markdown())
        return out / CARD_JSON, out / CARD_MD

    @classmethod
    def load(cls, directory: str | Path) -> ModelCard:
        return cls.from_dict(json.loads((Path(directory) / CARD_JSON).read_text()))

    def to_markdown(self) -> str:
        a, c, m, d = self.architecture, self.correction, self.metrics, self.data
        scope = d.get("cav_scope")
        lines = [
            f"# Model card: `{self.name}`",
            "",
            f"* **Version:** `{self.version}`",
            f"* **Architecture:** {a.get('arch')} ({a.get('source')}), input {a.get('input_size')}, "
            f"labels {', '.join(a.get('labels', []))}",
            f"* **Correction:** {c.get('name')} at layer `{c.get('layer') or '-'}`",
            f"* **Correction parameters:** `{json.dumps(c.get('params', {}), sort_keys=True)}`",
            f"* **CAV (evaluation):** layer `{m.get('cav_layer')}`, type `{m.get('cav_kind')}`, "
            f"artifact `{m.get('artifact')}`",
            f"* **Data:** {d.get('dataset', '–')}, {d.get('split', 'test')} split; correction CAV from "
            f"{d.get('cav_data', '–')} samples of {', '.join(scope) if scope else 'every class'}",
            f"* **Artifact masks:** {MASK_SOURCE_TEXT.get(d.get('mask_source', ''), '–')}",
            f"* **Created:** {self.created_at}",
            "",
            "## Files",
            "",
            "| file | path | sha256 |",
            "|---|---|---|",
        ]
        for kind in ("weights", "onnx"):
            f = self.files.get(kind, {})
            lines.append(f"| {kind} | `{f.get('path', '')}` | `{f.get('sha256', '')}` |")
        parity = self.files.get("onnx", {}).get("parity")
        if parity:
            lines += [
                "",
                f"ONNX parity: max |torch − ORT| = {parity['max_abs_diff']:.3g} on {parity['n_images']} "
                f"images (tolerance {parity['atol']:g}; providers {', '.join(parity['providers'])}).",
            ]
        lines += ["", "## Classification (test split)", ""]
        cls = m.get("classification", {})
        if d.get("subsets"):
            lines += [f"Test sets (images): {', '.join(f'{k} {n}' for k, n in d['subsets'].items())}.", ""]
        labels = list(a.get("labels", []))
        per_class = {f"{p}{lab}" for lab in labels for p in PER_CLASS}
        keys = sorted(
            {k for v in cls.values() for k in v if k != "n" and k not in per_class}, key=_metric_order
        )
        lines.append("| metric | " + " | ".join(cls) + " |")
        lines.append("|---|" + "---|" * len(cls))
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_fmt(cls[v].get(k)) for v in cls) + " |")
        if labels:
            lines += ["", "Per class (accuracy: on the class's images; one-vs-rest accuracy, AUC, FPR as in "
                      "method.md §7):", "", "| class | metric | " + " | ".join(cls) + " |",
                      "|---|---|" + "---|" * len(cls)]  # fmt: skip
            for lab in labels:
                for prefix, what in PER_CLASS.items():
                    k = f"{prefix}{lab}"
                    lines.append(f"| {lab} | {what} | " + " | ".join(_fmt(cls[v].get(k)) for v in cls) + " |")
        rel, tc, ret = m.get("artifact_relevance", {}), m.get("tcav", {}), m.get("retrieval", {})
        lines += [
            "",
            "## Artifact use",
            "",
            "| metric | value |",
            "|---|---|",
            f"| artifact relevance (mean ± SEM, n={rel.get('n')}) | {_pm(rel, 'mean', 'sem')} |",
            f"| TCAV quotient (class {tc.get('target_class')}) | {_pm(tc, 'quotient', 'quotient_se')} |",
            f"| TCAV mean quotient | {_fmt(tc.get('mean_quotient'))} ± {_fmt(tc.get('mean_quotient_se'))} |",
            f"| TCAV sensitivity | {_fmt(tc.get('sensitivity'))} ± {_fmt(tc.get('sensitivity_se'))} |",
            f"| retrieval AUROC (original CAV) | {_fmt(ret.get('auroc'))} |",
            f"| retrieval AP | {_fmt(ret.get('ap'))} |",
            f"| retrieval Kendall τ | {_fmt(ret.get('kendall_tau'))} |",
        ]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"* {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _pm(d: Mapping[str, Any], value: str, err: str) -> str:
    return f"{_fmt(d.get(value))} ± {_fmt(d.get(err))}"


def _metric_order(k: str) -> tuple[int, str]:
    order = ("accuracy", "accuracy_se", "f1_macro")
    return (order.index(k), k) if k in order else (len(order), k)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def build_card(
    *,
    name: str,
    version: str,
    architecture: Mapping[str, Any],
    data: Mapping[str, Any],
    correction: Mapping[str, Any],
    metrics: Mapping[str, Any],
    weights_path: str | Path,
    onnx_path: str | Path | None = None,
    parity: Mapping[str, Any] | None = None,
    opset: int | None = None,
    notes: Sequence[str] = (),
) -> ModelCard:
    """A card with the sha256 of the weights (and ONNX) file computed from disk."""
    files: dict[str, Any] = {"weights": {"path": str(weights_path), "sha256": sha256_file(weights_path)}}
    if onnx_path is not None:
        files["onnx"] = {"path": str(onnx_path), "sha256": sha256_file(onnx_path), "opset": opset}
        if parity is not None:
            files["onnx"]["parity"] = dict(parity)
    return ModelCard(
        name=name,
        version=version,
        architecture=architecture,
        data=data,
        correction=correction,
        metrics=json.loads(json.dumps(metrics)),
        files=files,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        library_versions=library_versions(),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------------- comparison


def comparison_rows(
    cards: Sequence[ModelCard], *, baseline: str | None = None, focus_class: str | None = None
) -> list[dict[str, Any]]:
    """One dict per card with the table's columns (None where undefined).

    Args:
        cards: Versions to compare.
        baseline: Version the gap is measured against; default the card whose correction is
            ``vanilla`` (the original model), else the first card.
        focus_class: Label whose attacked accuracy gets its own column; default the last label.
    """
    if not cards:
        raise ConfigError("comparison needs at least one model card")
    base = _baseline(cards, baseline)
    labels = list(cards[0].architecture.get("labels", []))
    focus = focus_class or (labels[-1] if labels else "")
    b_cls = base.metrics["classification"]
    b_clean, b_att = b_cls.get("clean", {}).get("accuracy"), b_cls.get("attacked", {}).get("accuracy")
    gap = None if b_clean is None or b_att is None else b_clean - b_att
    rows = []
    for card in cards:
        m = card.metrics
        cls = m["classification"]
        att = cls.get("attacked", {}).get("accuracy")
        rows.append(
            {
                "version": card.version,
                "clean acc": cls.get("clean", {}).get("accuracy"),
                "attacked acc": att,
                f"attacked {focus} acc": cls.get("attacked", {}).get(f"accuracy_{focus}"),
                "gap recovered % (all classes)": (
                    100.0 * (att - b_att) / gap
                    if gap and gap > 0 and att is not None and b_att is not None
                    else None
                ),
                "artifact relevance": m["artifact_relevance"]["mean"],
                "TCAV": m["tcav"]["quotient"],
                "AUROC": m["retrieval"]["auroc"],
            }
        )
    return rows


def _baseline(cards: Sequence[ModelCard], baseline: str | None) -> ModelCard:
    if baseline is not None:
        for c in cards:
            if c.version == baseline:
                return c
        raise ConfigError(f"baseline version {baseline!r} is not among {[c.version for c in cards]}")
    return next((c for c in cards if c.correction.get("name") == "vanilla"), cards[0])


def comparison_markdown(cards: Sequence[ModelCard], **kw: Any) -> str:
    """The comparison table as GitHub Markdown."""
    rows = comparison_rows(cards, **kw)
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(_cell_for(c, r[c]) for c in cols) + " |")
    return "\n".join(out) + "\n"


def _cell_for(col: str, v: Any) -> str:
    if v is None or isinstance(v, float) and not math.isfinite(v):
        return "–"
    if col.startswith("gap recovered %"):
        return f"{v:.1f}"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def comparison_table(cards: Sequence[ModelCard], **kw: Any) -> Any:
    """The comparison table as a ``rich.table.Table`` (for the CLI)."""
    from rich.table import Table

    rows = comparison_rows(cards, **kw)
    table = Table(title="Model versions")
    for i, col in enumerate(rows[0]):
        table.add_column(col, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*(_cell_for(c, v) for c, v in r.items()))
    return table
