"""The flag event's wire format, the key layout and the MEDAUDIT_FLAG_* settings (no Redis)."""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flagtools import result, score

from medaudit.models.errors import ConfigError
from medaudit.service.config import Settings, unknown_variables
from medaudit.service.errors import EventFormatError
from medaudit.service.flags.events import SCHEMA_VERSION, FlagEvent, FlagKeys, subject_hash
from medaudit.service.flags.policy import evaluate
from medaudit.service.flags.settings import FlagSettings


def _event(**kw: object) -> FlagEvent:
    base: dict[str, object] = dict(
        flag_id="r1:band_aid", request_id="r1", created_at="2026-01-01T00:00:00.000+00:00", created_ms=1,
        model_version="vanilla", layer="identity_2", concept="band_aid", score=1.5, threshold=1.0,
        percentile=99.0, relevance_share=0.25, severity="medium", reasons=("a", "b, with \"quotes\""),
        label="benign", probability=0.75,
    )  # fmt: skip
    base.update(kw)
    return FlagEvent(**base)  # type: ignore[arg-type]


def test_fields_round_trip_as_bytes_like_redis_returns_them() -> None:
    ev = _event(subject_hash=subject_hash("patient-7"), heatmap_key="p:blob:r1:heatmap", features_dim=512)
    fields = ev.to_fields()
    assert all(isinstance(v, str) for v in fields.values()) and fields["schema"] == str(SCHEMA_VERSION)
    raw = {k.encode(): v.encode() for k, v in fields.items()}
    assert FlagEvent.from_fields(raw) == ev
    assert json.loads(fields["reasons"]) == ["a", 'b, with "quotes"']


def test_the_corrected_answer_and_the_layers_round_trip_and_older_events_still_parse() -> None:
    ev = _event(
        corrected_disagrees="1", corrected_version="pclarc-band_aid", corrected_label="malignant",
        corrected_probability=0.625, image_key="p:blob:r1:image", heat_layer_key="p:blob:r1:heat_layer",
    )  # fmt: skip
    assert FlagEvent.from_fields(ev.to_fields()) == ev
    plain = _event().to_fields()
    assert plain["corrected_probability"] == "" and FlagEvent.from_fields(plain).corrected_probability is None
    # An event written before these fields existed (same schema: they are optional).
    old = {
        k: v
        for k, v in plain.items()
        if not k.startswith("corrected_") and k not in ("image_key", "heat_layer_key")
    }
    back = FlagEvent.from_fields(old)
    assert (back.corrected_label, back.corrected_probability, back.image_key) == ("", None, "")
    with pytest.raises(EventFormatError, match="corrected_probability"):
        FlagEvent.from_fields({**plain, "corrected_probability": "nan"})


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"schema": "2"}, r"schema '2' is not 1"),
        ({"schema": None}, r"schema None is not 1"),
        ({"score": None}, r"lacks field 'score'"),
        ({"score": "high"}, r"field 'score' = 'high'"),
        ({"percentile": "nan"}, r"field 'percentile' = 'nan': not finite"),
        ({"reasons": "[1, 2]"}, r"field 'reasons'"),
        ({"created_ms": "soon"}, r"field 'created_ms'"),
        ({"flag_id": "r2:band_aid"}, r"is not request id \+ ':' \+ concept"),
    ],
)
def test_malformed_entries_are_refused_by_name(change: dict[str, str | None], message: str) -> None:
    fields: dict[str, str] = _event().to_fields()
    for k, v in change.items():
        if v is None:
            del fields[k]
        else:
            fields[k] = v
    with pytest.raises(EventFormatError, match=message):
        FlagEvent.from_fields(fields)


def test_optional_fields_may_be_missing() -> None:
    fields = _event().to_fields()
    for k in ("subject_hash", "mask_key", "features_dim", "corrected_disagrees"):
        del fields[k]
    assert FlagEvent.from_fields(fields).features_dim == 0


def test_subject_key_is_only_ever_hashed() -> None:
    assert subject_hash(None) == subject_hash("") == ""
    assert subject_hash("patient-7") == hashlib.sha256(b"patient-7").hexdigest()
    keyed = subject_hash("patient-7", "s3cret")
    assert keyed == hmac.new(b"s3cret", b"patient-7", hashlib.sha256).hexdigest()
    assert keyed != subject_hash("patient-7") and keyed != subject_hash("patient-7", "other")


def test_the_publisher_keys_subject_hashes_with_the_secret(tmp_path: Path) -> None:
    """With MEDAUDIT_SUBJECT_SECRET the flag's hash is the keyed one: a low-entropy subject key
    (a patient number) cannot be found by hashing every candidate; the secret is not in the
    settings' repr."""
    from medaudit.service.flags.producer import FlagPublisher

    settings = FlagSettings.from_env({"MEDAUDIT_SUBJECT_SECRET": "s3cret"})
    assert settings.subject_secret == "s3cret" and "s3cret" not in repr(settings)
    pub = FlagPublisher(
        "redis://127.0.0.1:1/0",
        spool_dir=tmp_path,
        keys=FlagKeys("t"),
        subject_secret=settings.subject_secret,
    )
    try:
        r = result(score("band_aid"))
        rec = pub.record(r, evaluate(r), "req-1", "vanilla", "4711", None, datetime(2026, 1, 2, tzinfo=UTC))
    finally:
        pub.close(0.5)
    (event,) = [FlagEvent.from_fields(e) for e in rec["events"]]
    assert event.subject_hash == subject_hash("4711", "s3cret") != hashlib.sha256(b"4711").hexdigest()


def test_publisher_record_holds_no_image_and_no_raw_subject_key(tmp_path: Path) -> None:
    """What would go on the stream: ids, numbers and object keys only."""
    from medaudit.service.flags.producer import FlagPublisher

    pub = FlagPublisher("redis://127.0.0.1:1/0", spool_dir=tmp_path, keys=FlagKeys("t"))
    try:
        r = result(score("band_aid"), score("ruler", share=0.5))
        rec = pub.record(
            r, evaluate(r), "req-1", "vanilla", "patient-7", None, datetime(2026, 1, 2, tzinfo=UTC)
        )
    finally:
        pub.close(0.5)
    events = [FlagEvent.from_fields(e) for e in rec["events"]]
    assert [e.flag_id for e in events] == ["req-1:band_aid", "req-1:ruler"]
    assert {e.heatmap_key for e in events} == {"t:blob:req-1:heatmap"}
    assert [e.mask_key for e in events] == ["t:blob:req-1:mask:band_aid", "t:blob:req-1:mask:ruler"]
    assert events[0].features_key == "t:blob:req-1:features" and events[0].features_dim == 16
    assert events[0].created_ms == 1767312000000 and events[0].corrected_disagrees == ""
    stream_text = json.dumps(rec["events"])
    assert "patient-7" not in stream_text and r.heatmap_png not in stream_text
    assert set(rec["blobs"]) == {
        "t:blob:req-1:heatmap",
        "t:blob:req-1:features",
        *(e.mask_key for e in events),
    }


def test_keys_live_under_the_prefix() -> None:
    k = FlagKeys("medaudit")
    assert (k.stream, k.dlq, k.open_index) == (
        "medaudit:flags",
        "medaudit:flags:dlq",
        "medaudit:reviews:open",
    )
    assert k.review("r:c") == "medaudit:review:r:c" and k.published("r") == "medaudit:published:r"
    with pytest.raises(ConfigError, match=r"prefix 'a b' must be"):
        FlagKeys("a b")


def test_flag_settings_from_env() -> None:
    env = {
        "MEDAUDIT_FLAG_POLICY": "ruler:enabled=0",
        "MEDAUDIT_FLAG_PREFIX": "prod",
        "MEDAUDIT_FLAG_TTL": "3_600",
        "MEDAUDIT_FLAG_SPOOL_DIR": "/var/spool/medaudit",
        "MEDAUDIT_FLAG_MAX_DELIVERIES": "3",
        "MEDAUDIT_FLAG_QUEUE": "",  # empty = unset
    }
    s = FlagSettings.from_env(env)
    assert (s.prefix, s.ttl_s, s.spool_dir, s.max_deliveries, s.queue_size) == (
        "prod", 3600, Path("/var/spool/medaudit"), 3, 1000
    )  # fmt: skip
    assert s.keys.stream == "prod:flags" and not s.policy().for_concept("ruler").enabled
    assert s.policy(default_share=0.3).default.share == 0.3
    full = Settings.from_env({**env, "MEDAUDIT_AUTH": "off"})
    assert full.flags == s
    assert unknown_variables({**env, "MEDAUDIT_FLAG_TLL": "1"}) == ["MEDAUDIT_FLAG_TLL"]


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEDAUDIT_FLAG_TTL": "a week"}, r"MEDAUDIT_FLAG_TTL must be a positive integer, got 'a week'"),
        ({"MEDAUDIT_FLAG_MAXLEN": "0"}, r"MEDAUDIT_FLAG_MAXLEN must be a positive integer"),
        ({"MEDAUDIT_FLAG_PREFIX": "my prefix"}, r"MEDAUDIT_FLAG_PREFIX: flag key prefix 'my prefix'"),
        ({"MEDAUDIT_FLAG_POLICY": "band_aid:shar=1"}, r"MEDAUDIT_FLAG_POLICY: unknown key 'shar'"),
        ({"MEDAUDIT_FLAG_GROUP": "a b"}, r"MEDAUDIT_FLAG_GROUP must be a non-empty name"),
    ],
)
def test_flag_settings_errors_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        FlagSettings.from_env(env)
