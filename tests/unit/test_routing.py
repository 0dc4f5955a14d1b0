"""A/B routing: proportions, stability per key, explicit override, minimal movement on reweighting."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from medaudit.models.errors import ConfigError
from medaudit.service.errors import UnknownModelVersionError
from medaudit.service.routing import Route, Router

KEYS = [f"subject-{i}" for i in range(10_000)]


def test_proportions_within_three_points() -> None:
    r = Router({"vanilla": 0.5, "pclarc": 0.3, "rrclarc": 0.2})
    counts = Counter(r.assign(k) for k in KEYS)
    for v, w in r.weights.items():
        assert abs(counts[v] / len(KEYS) - w) < 0.03, (v, counts[v])


def test_weights_are_normalised_and_zero_weight_is_never_assigned() -> None:
    r = Router({"a": 2, "b": 6, "c": 0})
    assert r.weights == {"a": 0.25, "b": 0.75, "c": 0.0} and r.versions == ("a", "b", "c")
    assert "c" not in {r.assign(k) for k in KEYS[:2000]}
    assert r.choose("c", "anyone") == "c"  # served: reachable explicitly


def test_stable_per_key_and_across_instances() -> None:
    a, b = Router({"x": 1, "y": 1}), Router({"y": 1.0, "x": 1.0})  # order of the mapping is irrelevant
    assert [a.assign(k) for k in KEYS[:500]] == [b.assign(k) for k in KEYS[:500]]
    assert len({a.assign("same") for _ in range(20)}) == 1


def test_salt_reshuffles() -> None:
    a, b = Router({"x": 1, "y": 1}), Router({"x": 1, "y": 1}, salt="experiment-2")
    moved = sum(a.assign(k) != b.assign(k) for k in KEYS[:2000])
    assert 800 < moved < 1200  # about half, independently


def test_explicit_version_wins() -> None:
    r = Router({"vanilla": 1.0, "pclarc": 0.0})
    assert r.choose("pclarc", "subject-1") == "pclarc"
    assert r.route(" pclarc ", None) == Route("pclarc", None, "explicit")
    assert r.route("", "subject-1").via == "hash"  # an empty header is no header


def test_unknown_explicit_version_lists_valid_ones() -> None:
    r = Router({"vanilla": 1.0, "pclarc": 1.0})
    with pytest.raises(UnknownModelVersionError) as ei:
        r.choose("rrclarc", "k")
    body = ei.value.to_json()
    assert ei.value.status == 404 and body["error"] == "unknown_model_version"
    assert body["valid_versions"] == ["pclarc", "vanilla"] and "'rrclarc'" in body["detail"]


def test_keyless_requests_are_random_with_the_weights() -> None:
    r = Router({"a": 0.8, "b": 0.2}, rng=random.Random(0))
    counts = Counter(r.route(None, None).version for _ in range(5000))
    assert abs(counts["a"] / 5000 - 0.8) < 0.03
    assert r.route(None, None).via == "random"


def test_shadow_is_reported_unless_it_is_the_primary() -> None:
    r = Router({"vanilla": 1.0, "pclarc": 0.0}, shadow="pclarc")
    assert r.route(None, "k") == Route("vanilla", "pclarc", "hash")
    assert r.route("pclarc", "k").shadow is None


def test_changing_one_weight_moves_only_keys_that_must_move() -> None:
    before = Router({"a": 0.4, "b": 0.3, "c": 0.3})
    after = Router({"a": 0.2, "b": 0.3, "c": 0.3})  # only a's weight drops
    moves = Counter((before.assign(k), after.assign(k)) for k in KEYS)
    moved = {pair: n for pair, n in moves.items() if pair[0] != pair[1]}
    assert set(moved) <= {("a", "b"), ("a", "c")}, moved  # b and c never swap keys
    # a's share goes 0.4 -> 0.25: about 15 % of keys move, no more
    assert abs(sum(moved.values()) / len(KEYS) - 0.15) < 0.02


def test_adding_a_version_only_takes_keys() -> None:
    before = Router({"a": 1, "b": 1})
    after = Router({"a": 1, "b": 1, "c": 1})
    for k in KEYS[:3000]:
        new = after.assign(k)
        assert new in (before.assign(k), "c")


@pytest.mark.parametrize(
    ("weights", "shadow", "match"),
    [
        ({}, None, "empty"),
        ({"a": -1.0, "b": 1.0}, None, "'a'.*>= 0"),
        ({"a": float("nan")}, None, "finite"),
        ({"a": 0.0, "b": 0.0}, None, "sum to 0"),
        ({"a": "x"}, None, "must be a number"),
        ({"": 1.0}, None, "non-empty"),
        ({"a": 1.0}, "b", "shadow version 'b' is not served; served versions: a"),
    ],
)
def test_invalid_weights(weights: dict, shadow: str | None, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Router(weights, shadow)
