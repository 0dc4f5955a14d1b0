"""Whether a correction did its job: the acceptance columns of the build's comparison table.

A correction must win back ≥ 50 % of the original's clean→attacked accuracy gap on the images of
the class the artifact pushes away from, lose ≤ 3 points of clean accuracy and cut artifact
relevance (method.md §7) by ≥ 50 %, all against ``vanilla``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from medaudit.models.cards import ModelCard, comparison_markdown, comparison_rows

#: Acceptance of a correction: it must win back ≥ 50 % of the original's clean→attacked accuracy gap on the
#: images of the class the artifact pushes away from, lose ≤ 3 points of clean accuracy and cut
#: artifact relevance by ≥ 50 %.
MIN_GAP_RECOVERED, MAX_CLEAN_LOSS_PTS, MIN_RELEVANCE_CUT = 50.0, 3.0, 50.0


def victim_class(cards: Sequence[ModelCard], rates: Mapping[str, Sequence[float]], artifact: str) -> str:
    """The class the artifact pushes images away from: of the classes other than the one the
    artifact is most frequent in, the one whose accuracy the attack costs ``vanilla`` most
    (malignant for band-aids on the binary data; with more classes the realised rates of the
    others differ by chance, so the rate alone does not pick it); the rarest class where there is
    no attacked set to tell."""
    labels = list(cards[0].architecture.get("labels", [])) if cards else []
    if not labels:
        return ""
    r = list(rates.get(artifact, ()))[: len(labels)] or [0.0] * len(labels)
    others = [k for k in range(len(labels)) if r[k] < max(r)] or list(range(len(labels)))
    base = next((c for c in cards if c.correction.get("name") == "vanilla"), None)
    cls = base.metrics.get("classification", {}) if base is not None else {}

    def drop(k: int) -> float:
        key = f"accuracy_{labels[k]}"
        clean, att = cls.get("clean", {}).get(key), cls.get("attacked", {}).get(key)
        return -math.inf if clean is None or att is None else clean - att

    if all(drop(k) == -math.inf for k in others):
        return labels[min(others, key=lambda k: r[k])]
    return labels[max(others, key=drop)]


def acceptance(
    cards: Sequence[ModelCard], rates: Mapping[str, Sequence[float]], artifact: str
) -> list[dict[str, Any]]:
    """:func:`medaudit.models.cards.comparison_rows` plus the acceptance columns, against ``vanilla``.

    ``rates`` gives, per artifact, its rate in each class (synthderm's spec, or the rates a
    dataset's annotations realise). The "victim" class (:func:`victim_class`) is the one the
    artifact is *not* correlated with (malignant for band-aids): adding the artifact pushes its
    images to another class. Columns: its gap recovered 100·(att_v − att_0)/(clean_0 − att_0), the
    clean-accuracy change in points, the artifact relevance cut 100·(1 − rel_v/rel_0), and whether
    all three thresholds hold. A build without an attacked set (data without masks) has no gap.
    """
    victim = victim_class(cards, rates, artifact)
    rows = comparison_rows(cards, focus_class=victim or None) if cards else []
    base = next((c for c in cards if c.correction.get("name") == "vanilla"), None)
    for row, card in zip(rows, cards, strict=True):
        row.update({f"{victim} gap recovered %": None, "clean Δ pts": None, "relevance cut %": None})
        row["meets criteria"] = False
        if base is None:
            continue
        b, m = base.metrics["classification"], card.metrics["classification"]
        key = f"accuracy_{victim}"
        b_clean, b_att = b.get("clean", {}).get(key), b.get("attacked", {}).get(key)
        att = m.get("attacked", {}).get(key)
        gap = None if b_clean is None or b_att is None else b_clean - b_att
        rec = 100.0 * (att - b_att) / gap if gap and gap > 0 and att is not None else None
        d_clean = None
        if "clean" in m and "clean" in b:
            d_clean = 100.0 * (m["clean"]["accuracy"] - b["clean"]["accuracy"])
        r0, r = base.metrics["artifact_relevance"]["mean"], card.metrics["artifact_relevance"]["mean"]
        cut = 100.0 * (1 - r / r0) if r0 and r is not None else None
        row[f"{victim} gap recovered %"] = rec
        row["clean Δ pts"] = d_clean
        row["relevance cut %"] = cut
        tol = 1e-9  # a value on a threshold passes despite float round-off
        row["meets criteria"] = bool(
            card is not base
            and rec is not None
            and rec >= MIN_GAP_RECOVERED - tol
            and d_clean is not None
            and d_clean >= -MAX_CLEAN_LOSS_PTS - tol
            and cut is not None
            and cut >= MIN_RELEVANCE_CUT - tol
        )
    return rows


def criteria_score(row: Mapping[str, Any]) -> float:
    """How well a comparison row meets the correction criteria, as one number: the worst of its
    three criteria in units of its threshold, min(gap recovered / 50 %, relevance cut / 50 %,
    1 + (3 + clean Δ pts) / 3). Each term is 1 on its threshold and 2 for a perfect result (all
    of the gap, all of the relevance, no clean loss), so the score is ≥ 1 exactly when all three
    hold; it is −inf without a gap, a clean change or a relevance cut."""
    gap = next((v for k, v in row.items() if k.endswith(" gap recovered %")), None)
    d_clean, cut = row.get("clean Δ pts"), row.get("relevance cut %")
    if gap is None or d_clean is None or cut is None:
        return -math.inf
    clean = 1 + (MAX_CLEAN_LOSS_PTS + d_clean) / MAX_CLEAN_LOSS_PTS
    return min(gap / MIN_GAP_RECOVERED, cut / MIN_RELEVANCE_CUT, clean)


def rank_versions(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The corrected versions (every row but ``vanilla``), best first by :func:`criteria_score`;
    ties keep the build's order."""
    cands = [r for r in rows if r.get("version") != "vanilla"]
    return [str(r["version"]) for r in sorted(cands, key=lambda r: -criteria_score(r))]


def best_version(rows: Sequence[Mapping[str, Any]]) -> str | None:
    """The version to serve beside ``vanilla`` (A/B partner, shadow, the ``/compare`` example): the
    first of :func:`rank_versions` whose score is finite, or None (no gap measured: no ranking)."""
    by_version = {str(r.get("version")): r for r in rows}
    return next((v for v in rank_versions(rows) if math.isfinite(criteria_score(by_version[v]))), None)


def baseline_warnings(cards: Sequence[ModelCard], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """What makes the columns against ``vanilla`` misleading, read off ``vanilla-ft`` (the same
    fine-tuning without a correction term, method.md §4.7): a checkpoint whose clean accuracy the
    plain fine-tune moves by more than :data:`MAX_CLEAN_LOSS_PTS` was not converged, and every
    fine-tuning correction's gains are then partly the fine-tune's own. A build with fine-tuned
    versions but no ``vanilla-ft`` says that the check could not run."""
    out = []
    names = [str(card.correction.get("name")) for card in cards]
    tuned = [
        str(row["version"])
        for card, row in zip(cards, rows, strict=True)
        if "finetune" in (card.correction.get("params") or {}) and card.correction.get("name") != "vanilla-ft"
    ]
    if tuned and "vanilla-ft" not in names:
        out.append(
            "no `vanilla-ft` version was built, so whether fine-tuning alone moves this checkpoint "
            f"was not checked: {', '.join(f'`{v}`' for v in tuned)} may owe part of "
            "its figures against `vanilla` to the fine-tune itself; add `vanilla-ft` to the "
            "build's corrections to see."
        )
    for card, row in zip(cards, rows, strict=True):
        d_clean = row.get("clean Δ pts")
        if card.correction.get("name") != "vanilla-ft" or d_clean is None:
            continue
        if abs(d_clean) > MAX_CLEAN_LOSS_PTS:
            rec = next((v for k, v in row.items() if k.endswith("gap recovered %")), None)
            out.append(
                f"`{row['version']}` (fine-tuning alone) changes clean accuracy by {d_clean:+.1f} points"
                + (f" and recovers {rec:.1f} % of the gap" if rec is not None else "")
                + ": the checkpoint looks unconverged, so a fine-tuning correction's figures against "
                "`vanilla` include the fine-tune's own gains; compare them against "
                f"`{row['version']}`, or train the model further before the build."
            )
    return out


def comparison_summary(cards: Sequence[ModelCard], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``comparison.json``'s verdict: the rows, the best version and the ranking by the criteria,
    and the :func:`baseline_warnings`."""
    return {
        "rows": list(rows),
        "best": best_version(rows),
        "ranking": rank_versions(rows),
        "warnings": baseline_warnings(cards, rows),
    }


def comparison_report(
    cards: Sequence[ModelCard], rows: Sequence[Mapping[str, Any]], focus_class: str | None = None
) -> str:
    """The paper-style table (:func:`medaudit.models.cards.comparison_markdown`, attacked accuracy of
    ``focus_class``) plus the acceptance table."""
    extra = (
        [k for k in rows[0] if k not in comparison_rows(cards, focus_class=focus_class)[0]] if rows else []
    )
    out = [
        "# Model versions",
        "",
        comparison_markdown(cards, focus_class=focus_class),
        "## Correction criteria",
        "",
    ]
    out.append(
        f"Thresholds: gap recovered ≥ {MIN_GAP_RECOVERED:g} %, clean accuracy loss ≤ "
        f"{MAX_CLEAN_LOSS_PTS:g} points, artifact relevance cut ≥ {MIN_RELEVANCE_CUT:g} % (vs `vanilla`)."
    )
    out += ["", "| version | " + " | ".join(extra) + " |", "|---|" + "---|" * len(extra)]
    for r in rows:
        cells = [_cell(r[k]) for k in extra]
        out.append(f"| {r['version']} | " + " | ".join(cells) + " |")
    warnings = baseline_warnings(cards, rows)
    if warnings:
        out += ["", "**Warning:** " + "\n\n**Warning:** ".join(warnings)]
    return "\n".join(out) + "\n"


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    return f"{v:.1f}" if isinstance(v, float) else str(v)
