"""The flag policy as a table: presence AND reliance (share or a disagreeing corrected version)."""

from __future__ import annotations

import numpy as np
import pytest
from flagtools import result, score

from medaudit.models.errors import ConfigError
from medaudit.service.flags.policy import ConceptPolicy, PolicyConfig, Severity, evaluate

D = PolicyConfig()  # share 0.2, high_share 0.5, high_pct 99
P = PolicyConfig.parse
S, C = ("share",), ("corrected_disagrees",)


@pytest.mark.parametrize(
    ("case", "present", "share", "pct", "corrected", "policy", "expect"),
    [
        # (flagged?, severity, relied_on)
        ("absent, heavy reliance", False, 0.9, 99.9, True, D, None),
        ("present, not relied on", True, 0.1, 97.0, None, D, None),
        ("present, share at threshold does not flag", True, 0.2, 97.0, None, D, None),
        ("present, share just above", True, 0.2001, 97.0, None, D, ("low", S)),
        ("present, high share", True, 0.6, 97.0, None, D, ("medium", S)),
        ("present, high percentile", True, 0.3, 99.5, None, D, ("medium", S)),
        ("present, high share and percentile", True, 0.6, 99.5, None, D, ("high", S)),
        ("present, corrected disagrees, low share", True, 0.05, 97.0, True, D, ("medium", C)),
        ("present, corrected agrees, low share", True, 0.05, 97.0, False, D, None),
        ("present, share and disagreement", True, 0.3, 97.0, True, D, ("medium", S + C)),
        ("all three signals", True, 0.7, 99.9, True, D, ("high", S + C)),
        ("override lowers share", True, 0.15, 97.0, None, P("band_aid:share=0.1"), ("low", S)),
        ("override disables concept", True, 0.9, 99.9, True, P("band_aid:enabled=off"), None),
        ("min percentile not reached", True, 0.9, 90.0, None, P("min_pct=95"), None),
        ("min percentile reached", True, 0.9, 96.0, None, P("min_pct=95"), ("medium", S)),
        ("other concept's override ignored", True, 0.15, 97.0, None, P("ruler:share=0.1"), None),
        ("custom high thresholds", True, 0.3, 90.0, None, P("high_share=0.25,high_pct=85"), ("high", S)),
    ],
)  # fmt: skip
def test_policy_table(
    case: str,
    present: bool,
    share: float,
    pct: float,
    corrected: bool | None,
    policy: PolicyConfig,
    expect: tuple[str, tuple[str, ...]] | None,
) -> None:
    d = evaluate([score("band_aid", present=present, share=share, percentile=pct)], policy, corrected)
    if expect is None:
        assert not d.flagged and d.severity is None, case
        return
    assert d.flagged and d.concepts == ("band_aid",), case
    (f,) = d.flags
    assert (str(f.severity), f.relied_on) == expect, case
    assert f.reasons[0].startswith("band_aid present"), f.reasons
    assert len(f.reasons) == 1 + len(f.relied_on)


def test_worst_severity_and_order_over_concepts() -> None:
    r = result(
        score("band_aid", share=0.3),
        score("ruler", share=0.8, percentile=99.9),
        score("skin_marker", present=False),
    )
    d = evaluate(r)  # an AuditResult works as well as its scores
    assert d.concepts == ("band_aid", "ruler")
    assert d.severity is Severity.HIGH
    assert d.to_json()["severity"] == "high" and d.to_json()["flags"][0]["concept"] == "band_aid"


def test_default_policy_is_presence_and_share_above_the_threshold() -> None:
    """Without a corrected version, the default policy flags exactly the present concepts whose
    share is strictly above 0.2 (the rule written out here as a reference), in score order."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        cs = [
            score(c, present=bool(rng.random() < 0.6), share=float(rng.choice([0.2, rng.random()])))
            for c in ("band_aid", "ruler", "skin_marker")
        ]
        assert evaluate(cs).concepts == tuple(c.concept for c in cs if c.present and c.relevance_share > 0.2)


@pytest.mark.parametrize(
    ("concepts", "threshold", "flagged", "names"),
    [
        ([], 0.2, False, ()),
        ([("band_aid", False, 0.9)], 0.2, False, ()),  # absent: high share alone never flags
        ([("band_aid", True, 0.1)], 0.2, False, ()),  # present but not used
        ([("band_aid", True, 0.2)], 0.2, False, ()),  # equal to the threshold: no flag
        ([("band_aid", True, 0.21)], 0.2, True, ("band_aid",)),
        ([("band_aid", True, 0.5), ("ruler", True, 0.9)], 0.2, True, ("band_aid", "ruler")),
        ([("band_aid", True, 0.5), ("ruler", False, 0.9)], 0.2, True, ("band_aid",)),
        ([("band_aid", True, 0.0)], 0.0, False, ()),
        ([("band_aid", True, 1.0)], 1.0, False, ()),
    ],
)
def test_share_threshold_table(concepts, threshold, flagged, names) -> None:
    """The default share (``MEDAUDIT_FLAG_SHARE``) over several concepts; the flat ``reasons``
    of the response name each flagging concept and its presence first."""
    cs = [score(c, present=p, share=s, percentile=97.0) for c, p, s in concepts]
    d = evaluate(cs, PolicyConfig(ConceptPolicy(share=threshold)))
    assert d.flagged is flagged and d.concepts == names and len(d.flags) == len(names)
    body = d.to_json()
    assert body["flagged"] is flagged and body["concepts"] == list(names)
    for n, f in zip(names, d.flags, strict=True):
        assert f.reasons[0].startswith(n) and "present" in f.reasons[0]
        assert f"{n}: {f.reasons[0]}" in body["reasons"]


def test_parse_defaults_then_overrides_in_any_order() -> None:
    p = PolicyConfig.parse("band_aid:high_pct=90; share=0.3 ,ruler:enabled=0")
    assert p.default == ConceptPolicy(share=0.3)
    assert p.for_concept("band_aid") == ConceptPolicy(share=0.3, high_percentile=90.0)  # inherits share
    assert p.for_concept("ruler").enabled is False
    assert p.for_concept("timestamp") == p.default
    assert PolicyConfig.parse(p.to_spec()) == p
    assert PolicyConfig.parse("") == PolicyConfig()
    assert (
        PolicyConfig.parse("", ConceptPolicy(share=0.35)).default.share == 0.35
    )  # MEDAUDIT_FLAG_SHARE seeds it


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("share", r"'share' is not 'key=value'"),
        ("band_aid:share=", r"is not 'key=value'"),
        ("shares=0.1", r"unknown key 'shares'.*valid keys: enabled, share, min_pct, high_share, high_pct"),
        ("band_aid:share=0.1,band_aid:share=0.2", r"share is set twice for concept 'band_aid'"),
        ("share=0.1,share=0.2", r"share is set twice for the defaults"),
        ("share=high", r"'high' is not a number"),
        ("share=1.5", r"defaults: share must lie in \[0, 1\], got 1.5"),
        ("ruler:min_pct=120", r"concept 'ruler': min_percentile must lie in \[0, 100\]"),
        ("ruler:enabled=maybe", r"enabled must be on/off"),
        ("bad name!:share=0.1", r"'bad name!' .* is not a concept name"),
        ("share=nan", r"share must lie in"),
    ],
)
def test_parse_errors_name_the_variable_and_the_value(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^MEDAUDIT_FLAG_POLICY: .*" + message):
        PolicyConfig.parse(spec)


def test_overrides_of_unknown_concepts_are_caught_at_start() -> None:
    p = PolicyConfig.parse("band_aid:share=0.1,bandaid:enabled=0")
    p.check_concepts(["band_aid", "bandaid", "ruler"])
    with pytest.raises(
        ConfigError,
        match=r"names concepts no served concept bank has: bandaid; known concepts: band_aid, ruler",
    ):
        p.check_concepts(["band_aid", "ruler"])
