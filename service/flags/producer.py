"""Publishing flags without ever blocking or failing the HTTP request that produced them.

:meth:`FlagPublisher.submit` runs the flag policy (pure, microseconds), builds one record per
flagged request (its events plus the image, heatmap layer, masks and features) and puts it on a
bounded in-memory queue; a background thread PNG-encodes the image and heatmap layer and
publishes it. The request thread never touches the network and encodes no image.

One record is published by one Lua script (:data:`PUBLISH_LUA`), atomically: the blobs with a TTL,
one ``XADD <prefix>:flags MAXLEN ~ N`` per flagging concept, then the idempotency marker
``<prefix>:published:<request id>`` (same TTL). A record whose marker exists is skipped, so a
retried or replayed publish of a request never adds its flags twice, even when the first attempt
reached Redis but its reply was lost.

When Redis does not answer (connection refused, timeout) or the queue is full, records go to the
local durable spool (:mod:`medaudit.service.flags.spool`). While the spool holds anything, new records are
appended behind it rather than published, and the spool is replayed, sorted by sequence number,
as soon as Redis answers again (exponential backoff between attempts): so the stream receives one
producer's flags in submit order. The spool is rewritten (shrunk) only after its records were
published. A record Redis refuses for good (e.g. ``WRONGTYPE`` on a key some other program
created) goes to ``<spool>/<name>-rejected.jsonl`` and counts as dropped, so it cannot block the
records behind it.

What is lost on a crash: records still in the in-memory queue (at most ``queue_size``) and the one
being published. ``close()`` at shutdown drains the queue to Redis or, past its timeout, to the
spool.

Counters (plain ints, for Prometheus later), all counting *requests* (one record, one or more
flags): ``submitted``, ``published`` (reached the stream, directly or by replay), ``replayed``
(of which from the spool), ``spooled``, ``duplicates`` (Redis already had them), ``dropped``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import redis

from medaudit.service.errors import RedisUnavailableError
from medaudit.service.flags.events import FlagEvent, FlagKeys, check_request_id, subject_hash
from medaudit.service.flags.policy import PolicyConfig, PolicyDecision, evaluate
from medaudit.service.flags.redis_conn import LOCALHOST_URL, check_bytes_client, connect, ensure_redis, redact
from medaudit.service.flags.settings import DEFAULT_TTL_S, FlagSettings, default_spool_dir
from medaudit.service.flags.spool import Record, Spool

if TYPE_CHECKING:
    from medaudit.service.audit import AuditResult
    from medaudit.service.config import Settings

log = logging.getLogger(__name__)

#: KEYS: [marker, stream, blob keys…]; ARGV: [ttl, maxlen, n_events, (2k, field, value × k) per
#: event, one value per blob key]. Returns the number of events added, 0 when already published.
#: Blobs first and the marker last: a script that fails half-way leaves no marker, so a retry
#: publishes again (the worker's review records are idempotent per flag id).
PUBLISH_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local ttl = ARGV[1]
local n_events = tonumber(ARGV[3])
local i = 4
for e = 1, n_events do i = i + 1 + tonumber(ARGV[i]) end
for k = 3, #KEYS do
  redis.call('SET', KEYS[k], ARGV[i], 'EX', ttl)
  i = i + 1
end
i = 4
local ids = {}
for e = 1, n_events do
  local n = tonumber(ARGV[i])
  i = i + 1
  local args = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*'}
  for j = 0, n - 1 do args[#args + 1] = ARGV[i + j] end
  i = i + n
  ids[#ids + 1] = redis.call(unpack(args))
end
redis.call('SET', KEYS[1], table.concat(ids, ','), 'EX', ttl)
return #ids
"""

#: Redis errors that mean "try again later", beyond connection errors and timeouts.
_TRANSIENT_PREFIXES = (
    "OOM",
    "LOADING",
    "BUSY",
    "MASTERDOWN",
    "READONLY",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOREPLICAS",
)


#: Counter attribute -> outcome label passed to the observer.
_OUTCOMES = {
    "published": "published",
    "replayed": "replayed",
    "spooled": "spooled",
    "duplicates": "duplicate",
    "dropped": "dropped",
}


def _transient(e: Exception) -> bool:
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return True
    return isinstance(e, redis.ResponseError) and str(e).upper().startswith(_TRANSIENT_PREFIXES)


class FlagPublisher:
    """Turns audit results into flag events on the stream; see the module docstring.

    Args:
        url: Redis URL; ignored when ``client`` is given.
        policy: Flag policy (default thresholds when None).
        keys: Key layout (prefix).
        spool_dir: Spool directory (default :func:`medaudit.service.flags.settings.default_spool_dir`).
        queue_size: Records the in-memory queue holds before submits go to the spool directly.
        maxlen: Approximate stream length cap (``XADD MAXLEN ~``).
        ttl_s: Lifetime of blobs and of the idempotency marker, seconds.
        timeout: Socket timeout of each publish, s: how long an unresponsive Redis holds up the
            background thread (never the caller).
        backoff: (first, longest) wait between attempts while Redis is down, s.
        client: A bytes client (:func:`medaudit.service.flags.redis_conn.connect`) to use instead of ``url``.
        observer: Called as ``observer(outcome, n)`` whenever a counter moves, with ``outcome`` one
            of ``published``, ``replayed``, ``spooled``, ``duplicate``, ``dropped`` (the labels of
            ``medaudit_flag_publish_total``); read ``publisher.spool.pending`` there for the
            spool gauge. It runs on the caller's or the publisher's thread and must not raise.
        subject_secret: Keys the flag's hash of ``X-Subject-Key`` (:func:`subject_hash`).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        policy: PolicyConfig | None = None,
        keys: FlagKeys | None = None,
        spool_dir: str | Path | None = None,
        queue_size: int = 1000,
        maxlen: int = 100_000,
        ttl_s: int = DEFAULT_TTL_S,
        timeout: float = 1.0,
        backoff: tuple[float, float] = (0.05, 2.0),
        client: redis.Redis | None = None,
        observer: Callable[[str, int], None] | None = None,
        subject_secret: str | None = None,
    ) -> None:
        if client is None:
            client = connect(
                url or LOCALHOST_URL, timeout=timeout, connect_timeout=min(timeout, 0.5), retries=0
            )
        check_bytes_client(client)
        if queue_size < 1 or maxlen < 1 or ttl_s < 1:
            raise ValueError(
                f"queue_size, maxlen and ttl_s must be >= 1; got {queue_size}, {maxlen}, {ttl_s}"
            )
        self.client = client
        self.policy = policy or PolicyConfig()
        self.keys = keys or FlagKeys()
        self.maxlen, self.ttl_s = maxlen, ttl_s
        self.spool = Spool(spool_dir if spool_dir is not None else default_spool_dir())
        self._rejected_path = self.spool.directory / "flags-rejected.jsonl"
        self._script = client.register_script(PUBLISH_LUA)
        self._queue: queue.Queue[Record] = queue.Queue(maxsize=queue_size)
        self._seq = self.spool.next_seq()
        self._submit_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._backoff_min, self._backoff_max = backoff
        self._backoff = 0.0
        self._retry_at = 0.0
        self._down = False
        self._closing = threading.Event()
        self._closed = False
        self._deadline = float("inf")
        self.submitted = self.published = self.replayed = self.spooled = self.duplicates = self.dropped = 0
        self.flags_published = 0
        self._observer = observer
        self._subject_secret = subject_secret
        self._thread = threading.Thread(target=self._run, name="flag-publisher", daemon=True)
        self._thread.start()

    @classmethod
    def from_settings(
        cls, settings: Settings, *, default_share: float | None = None, **kwargs: Any
    ) -> FlagPublisher:
        """The publisher the service runs: ``settings.redis_url`` and ``settings.flags``.

        With no Redis URL configured, a local Redis or an embedded one (:func:`ensure_redis`) is
        used when one answers; otherwise ``redis://127.0.0.1:6379/0``, spooling until it answers.

        Args:
            settings: The service settings.
            default_share: The policy's default ``share`` unless ``MEDAUDIT_FLAG_POLICY`` sets
                one; None: ``settings.flag_share`` (``MEDAUDIT_FLAG_SHARE``).
            **kwargs: Overrides of the constructor's arguments.
        """
        f: FlagSettings = settings.flags
        url = settings.redis_url
        if url is None:
            try:
                url = ensure_redis(None)
            except RedisUnavailableError as e:
                log.warning("flags: %s; spooling until %s answers", e, LOCALHOST_URL)
                url = LOCALHOST_URL
        args: dict[str, Any] = {
            "policy": settings.policy() if default_share is None else f.policy(default_share),
            "keys": f.keys,
            "spool_dir": f.spool_dir,
            "queue_size": f.queue_size,
            "maxlen": f.maxlen,
            "ttl_s": f.ttl_s,
            "subject_secret": f.subject_secret,
        }
        args.update(kwargs)
        return cls(url, **args)

    # -- the caller's side -----------------------------------------------------------------------

    def submit(
        self,
        result: AuditResult,
        *,
        request_id: str,
        version: str,
        subject_key: str | None = None,
        corrected_disagrees: bool | None = None,
        corrected: Mapping[str, Any] | None = None,
    ) -> PolicyDecision:
        """Decides the flags of one audit and queues them for publishing. Never raises, never waits.

        A flagged request's record is built here, on the caller's thread, without encoding any
        image: the bare input and the heatmap layer (~8 ms of PNG encoding at 224 px) are encoded
        by the background thread (:meth:`_encode`), so the request (on the service's event loop)
        does not wait for them.

        Args:
            result: The answering version's audit of the request's image.
            request_id: The request's id (``X-Request-ID``): the idempotency key, so publish each
                request once, under one id (for ``/compare``, the answering version only, or one
                id per version such as ``f"{rid}.{version}"``).
            version: The answering version.
            subject_key: ``X-Subject-Key``; only its sha256 is stored.
            corrected_disagrees: Whether a corrected version (e.g. the shadow) gave a different
                label; None when none was asked (or to derive it from ``corrected``).
            corrected: That corrected version's prediction JSON (``version``, ``label``,
                ``probabilities``), stored with the flag so that a reviewer sees its answer.

        Returns:
            The policy decision (empty when nothing flags, and also when building the record
            failed, which is logged and counted as dropped).
        """
        try:
            if corrected_disagrees is None and corrected is not None:
                corrected_disagrees = str(corrected.get("label")) != result.prediction.label
            decision = evaluate(result, self.policy, corrected_disagrees)
            if decision.flagged:
                self.enqueue(
                    self.record(
                        result,
                        decision,
                        request_id,
                        version,
                        subject_key,
                        corrected_disagrees,
                        corrected=corrected,
                    )
                )
            return decision
        except Exception:  # a bug here must not fail the request that was audited fine
            log.exception("flags: could not build the flag record of request %r", request_id)
            self._add("dropped")
            return PolicyDecision()

    def record(
        self,
        result: AuditResult,
        decision: PolicyDecision,
        request_id: str,
        version: str,
        subject_key: str | None = None,
        corrected_disagrees: bool | None = None,
        now: datetime | None = None,
        *,
        corrected: Mapping[str, Any] | None = None,
    ) -> Record:
        """The spoolable record of one flagged request: events as stream fields, blobs as base64.

        Pixels it stores (once per request, shared by its flags): the bare model-size input
        (``image``, RGB PNG) and the heatmap as its own RGBA layer (``heat_layer``), which the
        workbench shows as separate overlays and from which ``/reviews`` and ``medaudit review``
        compose the blend they hand out; plus one mask PNG per flagging concept. A result that
        lacks the raw heatmap or the input (one built by hand) stores its blend (``heatmap``), as
        every record did before. At 224 px: image ~65 KiB + layer ~4 KiB, where the blend alone
        was ~66 KiB (docs/review-ui.md).
        """
        rid = check_request_id(request_id)
        now = now or datetime.now(UTC)
        k = self.keys
        blobs: dict[str, str] = {}
        pending: dict[str, tuple[str, np.ndarray]] = {}
        heat_key = feat_key = image_key = layer_key = ""
        # Pixels only where the audit has a heatmap: a withheld one (heatmap_note) stays withheld.
        if result.heatmap_png and result.image is not None and result.heatmap is not None:
            # the bare input and the heatmap alone; the blend is composed from them when asked
            # for (medaudit.service.flags.review.compose_blend), so it is not stored as well
            # (encoded to PNG by the background thread: _encode)
            image_key, layer_key = k.blob(rid, "image"), k.blob(rid, "heat_layer")
            pending[image_key] = ("image", np.array(result.image, dtype=np.uint8))
            pending[layer_key] = ("heat_layer", np.array(result.heatmap, dtype=np.float16))
        elif result.heatmap_png:  # a result without its pixels (built by hand): the blend only
            heat_key = k.blob(rid, "heatmap")
            blobs[heat_key] = result.heatmap_png
        c_version = c_label = ""
        c_prob: float | None = None
        if corrected is not None:
            c_version, c_label = str(corrected.get("version", "")), str(corrected.get("label", ""))
            p = (corrected.get("probabilities") or {}).get(c_label)
            c_prob = float(p) if p is not None and np.isfinite(p) else None
        dim = 0
        if result.features is not None:
            feats = np.ascontiguousarray(np.asarray(result.features).ravel(), dtype="<f4")
            feat_key, dim = k.blob(rid, "features"), int(feats.size)
            blobs[feat_key] = base64.b64encode(feats.tobytes()).decode()
        masks = {c.concept: c.mask_png for c in result.concepts if c.mask_png}
        probs: Mapping[str, float] = result.prediction.probabilities
        events = []
        for f in decision.flags:
            mask_key = ""
            if f.concept in masks:
                mask_key = k.blob(rid, f"mask:{f.concept}")
                blobs[mask_key] = masks[f.concept]
            ev = FlagEvent(
                flag_id=f"{rid}:{f.concept}",
                request_id=rid,
                created_at=now.isoformat(timespec="milliseconds"),
                created_ms=int(now.timestamp() * 1000),
                model_version=version,
                layer=result.layer,
                concept=f.concept,
                score=f.score,
                threshold=f.threshold,
                percentile=f.percentile,
                relevance_share=f.relevance_share,
                severity=str(f.severity),
                reasons=f.reasons,
                label=result.prediction.label,
                probability=float(probs.get(result.prediction.label, float("nan"))),
                subject_hash=subject_hash(subject_key, self._subject_secret),
                corrected_disagrees="" if corrected_disagrees is None else str(int(corrected_disagrees)),
                corrected_version=c_version,
                corrected_label=c_label,
                corrected_probability=c_prob,
                heatmap_key=heat_key,
                mask_key=mask_key,
                features_key=feat_key,
                features_dim=dim,
                image_key=image_key,
                heat_layer_key=layer_key,
            )
            events.append(ev.to_fields())
        rec: Record = {
            "request_id": rid,
            "stream": k.stream,
            "marker": k.published(rid),
            "events": events,
            "blobs": blobs,
        }
        if pending:
            rec["pending"] = pending
        return rec

    @staticmethod
    def _encode(rec: Record) -> Record:
        """Encodes the PNGs :meth:`record` left to the background thread into ``rec["blobs"]``, in
        place (a no-op once done). Runs before a record is published, spooled or rejected."""
        pending = rec.pop("pending", None)
        if not pending:
            return rec
        # here, not at the top: medaudit.service.audit imports torch, which the producer's own
        # users (tests, tools replaying spools) need not load
        from medaudit.service.audit import heat_layer, png_base64

        for key, (kind, arr) in pending.items():
            try:
                rec["blobs"][key] = png_base64(heat_layer(arr) if kind == "heat_layer" else arr)
            except Exception:  # the flag still counts: its page shows this image as missing
                log.exception("flags: could not encode the %s of request %r", kind, rec.get("request_id"))
        return rec

    def enqueue(self, rec: Record) -> None:
        """Queues a record for the background thread; to the spool when the queue is full."""
        with self._submit_lock:
            rec["seq"] = self._seq
            self._seq += 1
            self._add("submitted")
            if self._closed:
                log.error(
                    "flags: submit after close(); the flags of request %r are lost", rec.get("request_id")
                )
                self._add("dropped")
                return
            try:
                if self._closing.is_set():
                    raise queue.Full  # after close(): straight to the spool, nothing is lost
                self._queue.put_nowait(rec)
            except queue.Full:
                self._spool([rec])

    # -- counters and state ----------------------------------------------------------------------

    def _add(self, name: str, n: int = 1) -> None:
        with self._count_lock:
            setattr(self, name, getattr(self, name) + n)
        outcome = _OUTCOMES.get(name)
        if self._observer is not None and outcome is not None:
            try:
                self._observer(outcome, n)
            except Exception:  # metrics must never break publishing
                log.exception("flags: the publisher's observer raised")

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize()

    @property
    def redis_ok(self) -> bool:
        """False from a failed publish until the next successful one."""
        return not self._down

    def stats(self) -> dict[str, Any]:
        """Counters and gauges, JSON-ready (for /metrics and logs)."""
        return {
            "submitted": self.submitted,
            "published": self.published,
            "flags_published": self.flags_published,
            "replayed": self.replayed,
            "spooled": self.spooled,
            "duplicates": self.duplicates,
            "dropped": self.dropped,
            "queue_depth": self.queue_depth,
            "spool_pending": self.spool.pending,
            "redis_ok": self.redis_ok,
        }

    # -- the background thread -------------------------------------------------------------------

    def _drain_queue(self) -> list[Record]:
        out = []
        while True:
            try:
                out.append(self._encode(self._queue.get_nowait()))
            except queue.Empty:
                return out

    def _spool(self, recs: list[Record]) -> None:
        if not recs:
            return
        for rec in recs:
            self._encode(rec)  # the spool holds JSON (a full queue spools on the caller's thread)
        try:
            self.spool.append(recs)
            self._add("spooled", len(recs))
        except OSError as e:
            log.error(
                "flags: the spool %s cannot be written (%s); %d flagged requests lost",
                self.spool.path,
                e,
                len(recs),
            )
            self._add("dropped", len(recs))

    def _publish(self, rec: Record) -> int:
        blob_keys = list(rec["blobs"])
        args: list[Any] = [self.ttl_s, self.maxlen, len(rec["events"])]
        for ev in rec["events"]:
            args.append(2 * len(ev))
            for f, v in ev.items():
                args += [f, v]
        args += [base64.b64decode(rec["blobs"][b]) for b in blob_keys]
        return int(self._script(keys=[rec["marker"], rec["stream"], *blob_keys], args=args))

    def _try_publish(self, rec: Record) -> bool | None:
        """True: published or already there; None: transient failure (retry later); False: rejected."""
        try:
            added = self._publish(rec)
        except Exception as e:
            if _transient(e):
                self._failed(e)
                return None
            self._reject(rec, e)
            return False
        self._ok()
        if added:
            self._add("published")
            self._add("flags_published", added)
        else:
            self._add("duplicates")
        return True

    def _failed(self, e: Exception) -> None:
        self._backoff = min(max(2 * self._backoff, self._backoff_min), self._backoff_max)
        self._retry_at = time.monotonic() + self._backoff
        if not self._down:
            log.warning(
                "flags: Redis does not answer (%s: %s); spooling to %s", type(e).__name__, e, self.spool.path
            )
        self._down = True

    def _ok(self) -> None:
        if self._down:
            log.info("flags: Redis answers again")
        self._down = False
        self._backoff = 0.0
        self._retry_at = 0.0

    def _reject(self, rec: Record, e: Exception) -> None:
        log.error(
            "flags: Redis refused the flags of request %r for good (%s); kept in %s",
            rec.get("request_id"),
            e,
            self._rejected_path,
        )
        try:
            with open(self._rejected_path, "ab") as f:
                f.write(json.dumps({**rec, "error": str(e)}, separators=(",", ":")).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as oe:
            log.error("flags: cannot write %s: %s", self._rejected_path, oe)
        self._add("dropped")

    def _replay(self) -> None:
        """Publishes the spool in sequence order, then shrinks it to what is still owed."""
        with self.spool.lock:
            batch = self._drain_queue()
            if batch:
                try:
                    self.spool.append_locked(batch)
                    self._add("spooled", len(batch))
                except OSError as e:
                    log.error(
                        "flags: the spool cannot be written (%s); %d flagged requests lost", e, len(batch)
                    )
                    self._add("dropped", len(batch))
            records, upto = self.spool.snapshot_locked()
        keep: list[Record] = []
        done = 0
        for i, rec in enumerate(records):
            before = self.published
            ok = self._try_publish(rec)
            if ok is None:
                keep = records[i:]
                break
            done += 1
            if self.published > before:
                self._add("replayed")
        if done or not records:
            with self.spool.lock:
                self.spool.rewrite_locked(keep, upto)
        if not keep and records:
            log.info("flags: replayed the spool (%d requests)", done)

    def _run(self) -> None:
        while True:
            try:
                if self._step():
                    return
            except Exception:  # the thread must survive anything; a bug is logged and retried
                log.exception("flags: publisher thread error")
                time.sleep(0.1)

    def _step(self) -> bool:
        """One iteration of the background thread; True when it should exit."""
        now = time.monotonic()
        if self._closing.is_set() and now >= self._deadline:
            self._spool(self._drain_queue())
            return True
        if self.spool.pending and now >= self._retry_at:
            self._replay()
        if self._closing.is_set() and self._queue.empty() and not self.spool.pending:
            return True
        wait = 0.05 if not self.spool.pending else max(0.0, min(0.05, self._retry_at - time.monotonic()))
        try:
            rec = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
        except queue.Empty:
            return False
        self._encode(rec)
        if self.spool.pending or time.monotonic() < self._retry_at:
            self._spool([rec, *self._drain_queue()])  # degraded: behind the spool, in order
            return False
        if self._try_publish(rec) is None:
            self._spool([rec, *self._drain_queue()])
        return False

    # -- shutdown --------------------------------------------------------------------------------

    def close(self, timeout: float = 5.0) -> bool:
        """Publishes what is queued (and spooled) for up to ``timeout`` s, then spools the rest.

        Submits while it runs go straight to the spool; submits after it are dropped (logged).
        Returns True when nothing is left unpublished. Records left in the spool are published by
        the next publisher that opens the same spool directory.
        """
        self._deadline = time.monotonic() + timeout
        self._closing.set()
        self._thread.join(timeout + 1.0)
        with self._submit_lock:
            self._spool(self._drain_queue())  # whatever the thread could not take in time
            self._closed = True
        left = self.spool.pending
        if left:
            log.warning(
                "flags: %d flagged requests stay in the spool %s for the next start", left, self.spool.path
            )
        done = left == 0 and not self._thread.is_alive()
        if not self._thread.is_alive():
            self.spool.close()  # gives the slot up; a stuck thread keeps it so it can still spool
        return done

    def __enter__(self) -> FlagPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        kw = self.client.get_connection_kwargs()
        where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        return f"FlagPublisher({redact(str(where))}, stream={self.keys.stream!r})"
