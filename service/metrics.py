"""Every Prometheus series medaudit exports, declared once, so dashboards, alerts and code agree.

Dashboards (``deploy/grafana/``) and alert rules (``deploy/prometheus/``) are written against the
names here; renaming one is a breaking change for them (``tests/deploy`` checks that every name a
rule or panel uses is declared here).

Rules of this module:

* ``prometheus_client`` directly, at module level (BentoML 1.4's own advice; ``bentoml.metrics`` is
  deprecated). Under ``bentoml serve`` every process of every service writes to the shared
  ``PROMETHEUS_MULTIPROC_DIR`` and the entry service's ``/metrics`` aggregates them, so a series
  set in the :class:`~service.api.Auditor` process shows up on the public port.
* Labels are low-cardinality by construction: endpoint, version, concept, stage, outcome,
  severity, routing ``via``. **Never** a request id, subject key or patient id.
* Gauges declare how worker processes combine (``multiprocess_mode``): ``max`` for facts every
  worker knows alike (model info), ``livesum`` for per-process amounts (spool size).

Names follow Prometheus conventions: ``medaudit_`` prefix, ``_total`` counters, ``_seconds``
durations, base units.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

#: Request latency buckets (s): ~5 ms to 60 s, denser where predict and audit live on a CPU.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Calibrated percentile among clean validation images, 0–100: comparable across concepts and
#: versions (raw scores are not), dense at the top where presence is decided.
PERCENTILE_BUCKETS = (10, 25, 50, 75, 90, 95, 97.5, 99, 99.5, 99.9, 100)
SHARE_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0)

REQUESTS = Counter(
    "medaudit_requests",
    "HTTP requests by endpoint, answering version ('none' before routing) and outcome.",
    ["endpoint", "version", "outcome"],
)
STAGE_SECONDS = Histogram(
    "medaudit_stage_seconds",
    "Time per request stage: decode, route, predict, explain (LRP + concept scores + masks), "
    "flag_publish, total.",
    ["endpoint", "stage"],
    buckets=LATENCY_BUCKETS,
)
BATCH_IMAGES = Histogram(
    "medaudit_batch_images",
    "Images per model call in the batched services (what adaptive batching achieved).",
    ["service", "version"],
    buckets=(1, 2, 4, 8, 16, 32),
)
AUDIT_QUEUE_SECONDS = Histogram(
    "medaudit_audit_queue_seconds",
    "Time an audit waited in the auditor's queue for a free LRP process (service.audit_pool): "
    "near zero while the processes keep up, growing as they saturate.",
    buckets=LATENCY_BUCKETS,
)
AUDIT_LANE_RESTARTS = Counter(
    "medaudit_audit_lane_restarts",
    "LRP processes of the auditor that died holding a batch and were replaced.",
)
CONCEPT_PERCENTILE = Histogram(
    "medaudit_concept_percentile",
    "Audited images' concept score as a percentile among clean validation images.",
    ["version", "concept"],
    buckets=PERCENTILE_BUCKETS,
)
CONCEPT_SHARE = Histogram(
    "medaudit_concept_relevance_share",
    "Share of the predicted class's relevance along the concept's CAV.",
    ["version", "concept"],
    buckets=SHARE_BUCKETS,
)
CONCEPT_PRESENT = Counter(
    "medaudit_concept_present",
    "Audited images on which the concept was judged present.",
    ["version", "concept"],
)
PREDICTIONS = Counter(
    "medaudit_predictions",
    "Predicted labels by version (the per-version prediction mix of an A/B comparison).",
    ["version", "label"],
)
FLAGS = Counter(
    "medaudit_flags",
    "Flag decisions raised, by version, concept and severity.",
    ["version", "concept", "severity"],
)
SCREENED = Counter(
    "medaudit_screened_requests",
    "Requests answered with a screen (prediction, concept scores, relevance shares and flag "
    "decision without a heatmap; service.screening), by answering version.",
    ["version"],
)
SCREEN_FLAGS = Counter(
    "medaudit_screen_flags",
    "Flags raised on screened requests, by version (one per flagging concept): over "
    "medaudit_screened_requests_total, the flags per screened request.",
    ["version"],
)
HEATMAPS = Counter(
    "medaudit_heatmaps",
    "Full audits (LRP heatmap to the input, masks) computed, by version and reason: requested "
    "(/audit, /compare, detail=full), flagged (a screen that flagged), sampled (monitoring rate).",
    ["version", "reason"],
)
AB_ASSIGNMENTS = Counter(
    "medaudit_ab_assignments",
    "Requests assigned to a version, by how it was chosen (explicit, hash, random).",
    ["version", "via"],
)
SHADOW = Counter(
    "medaudit_shadow_comparisons",
    "Shadow predictions compared with the answering version's, by agreement.",
    ["version", "shadow", "agree"],
)
FLAG_PUBLISH = Counter(
    "medaudit_flag_publish",
    "Flag events by publishing outcome: published, spooled, replayed, dropped, duplicate.",
    ["outcome"],
)
SPOOL_EVENTS = Gauge(
    "medaudit_flag_spool_events",
    "Flag events waiting in the local durable spool for Redis to come back.",
    multiprocess_mode="livesum",
)
MODEL_INFO = Gauge(
    "medaudit_model_info",
    "1 for every served version, with its store tag and the sha256 of its weights and ONNX graph.",
    ["version", "tag", "weights_sha256", "onnx_sha256"],
    multiprocess_mode="max",
)

# Exported by `medaudit worker` (its own /metrics port), from XINFO/XPENDING/XLEN.
QUEUE_LENGTH = Gauge(
    "medaudit_flag_queue_length", "Entries in the flag stream (XLEN).", multiprocess_mode="max"
)
QUEUE_LAG = Gauge(
    "medaudit_flag_queue_lag", "Entries not yet delivered to the review group.", multiprocess_mode="max"
)
QUEUE_PENDING = Gauge(
    "medaudit_flag_queue_pending", "Entries delivered but not yet acknowledged.", multiprocess_mode="max"
)
DEAD_LETTERS = Gauge(
    "medaudit_flag_dead_letters", "Entries in the dead-letter stream.", multiprocess_mode="max"
)
REVIEWS = Counter(
    "medaudit_flag_reviews",
    "Review records written by workers, and reviewer verdicts.",
    ["event"],
)
