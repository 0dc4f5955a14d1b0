"""The flag worker: stream entries become durable review records, exactly one per flag.

Consumer-group pattern of the Redis Streams docs (peers.md §5), Redis ≥ 6.2 only:

1. ``XGROUP CREATE <stream> <group> 0 MKSTREAM`` once (``BUSYGROUP`` ignored), so a group created
   after the first flags still sees them.
2. At start, this consumer's own pending entries (``XREADGROUP … 0``): what it read before a
   restart but never acknowledged.
3. Then ``XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s >``.
4. Per entry: write the review record **first** (:data:`WRITE_REVIEW_LUA`: ``<prefix>:review:<flag
   id>`` plus the open index, only if the record does not exist yet), **then** ``XACK``. A crash
   between the two redelivers the entry and the second write is a no-op: at-least-once delivery,
   exactly one record.
5. Every ``claim_interval_s``: ``XAUTOCLAIM`` entries idle longer than ``min_idle_ms`` (their
   consumer died or is stuck), following the cursor to ``0-0``. That includes this consumer's own
   failed entries, which is how a failing entry is retried.
6. Dead letters: an entry whose delivery count (``XPENDING`` extended form) exceeds
   ``max_deliveries`` is not processed again; one whose handler fails on its last allowed delivery
   isn't retried. Both are copied to ``<prefix>:flags:dlq`` (``XADD``) **then** acknowledged, so a
   crash leaves a duplicate in the DLQ, never a loss. A poison entry therefore costs
   ``max_deliveries`` attempts spread over ``min_idle_ms`` intervals and blocks nothing else.

Errors are sorted in two kinds: a Redis connection error or timeout is the infrastructure's, so the
worker backs off and retries without counting it against the entry; anything else raised while
handling an entry (a malformed event, a ``WRONGTYPE`` reply) is the entry's.

Several workers run in parallel; each needs its own consumer name (default ``<hostname>-<pid>``).
SIGTERM/SIGINT (:func:`install_signal_handlers`) finish the current entry and stop; entries read
but not handled stay pending and are reclaimed by the next start or by another worker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from medaudit.service.flags.events import FlagEvent, FlagKeys

log = logging.getLogger(__name__)

#: KEYS: [review hash, open index]; ARGV: [score (ms), flag id, field, value, …].
#: Returns 1 when the record was written, 0 when it existed (a redelivery).
WRITE_REVIEW_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

#: Most entries ``queue_stats`` reads to count the lag where Redis does not report it.
LAG_SCAN_LIMIT = 1000

#: Called at ``"before_write"`` and ``"after_write"`` of each entry (tests slow or break it there).
Hook = Callable[[str, FlagEvent], None]


def default_consumer() -> str:
    """``<hostname>-<pid>``: unique per live worker, recognisable in ``XINFO CONSUMERS``."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    """How a worker reads, reclaims and gives up.

    Attributes:
        group: Consumer group.
        consumer: This worker's name in the group.
        count: Entries per ``XREADGROUP``/``XAUTOCLAIM`` call.
        block_ms: ``XREADGROUP BLOCK``: how long a read waits for new entries (also the longest
            delay before a stop request is noticed).
        min_idle_ms: Pending entries idle this long are reclaimed. Above the slowest legitimate
            handling time, or two workers handle the same entry (harmless, but wasted).
        claim_interval_s: Seconds between ``XAUTOCLAIM`` sweeps.
        max_deliveries: Deliveries allowed before an entry goes to the dead-letter stream.
        dlq_maxlen: Approximate cap of the dead-letter stream.
        forget_after_ms: Other consumers idle this long with nothing pending are removed from the
            group (``XGROUP DELCONSUMER``), so dead workers do not pile up in ``XINFO``.
    """

    group: str = "medaudit-review"
    consumer: str = field(default_factory=default_consumer)
    count: int = 32
    block_ms: int = 2000
    min_idle_ms: int = 60_000
    claim_interval_s: float = 5.0
    max_deliveries: int = 5
    dlq_maxlen: int = 100_000
    forget_after_ms: int = 24 * 3600 * 1000

    def __post_init__(self) -> None:
        if self.count < 1 or self.block_ms < 1 or self.min_idle_ms < 1 or self.max_deliveries < 1:
            raise ValueError(
                "count, block_ms, min_idle_ms and max_deliveries must be >= 1; got "
                f"{self.count}, {self.block_ms}, {self.min_idle_ms}, {self.max_deliveries}"
            )


@dataclass
class WorkerStats:
    """What one worker did (counts of entries)."""

    written: int = 0  # review records created
    redelivered: int = 0  # entries whose record already existed (written before a crash)
    failed: int = 0  # handler failures (the entry stays pending, or goes to the DLQ)
    dead_lettered: int = 0
    claimed: int = 0  # entries taken over by XAUTOCLAIM
    forgotten_consumers: int = 0

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


class Worker:
    """Moves flag events from the stream into review records; see the module docstring.

    Args:
        client: A bytes client (:func:`medaudit.service.flags.redis_conn.connect`) whose socket timeout
            exceeds ``config.block_ms``.
        keys: Key layout.
        config: Reading and retry settings.
        hook: Optional ``hook(stage, event)`` called before and after the review write.
    """

    def __init__(
        self,
        client: redis.Redis,
        keys: FlagKeys | None = None,
        config: WorkerConfig | None = None,
        hook: Hook | None = None,
    ) -> None:
        self.r = client
        self.keys = keys or FlagKeys()
        self.cfg = config or WorkerConfig()
        self.hook = hook
        self.stats = WorkerStats()
        self._write = client.register_script(WRITE_REVIEW_LUA)
        self._next_claim = 0.0

    # -- setup -----------------------------------------------------------------------------------

    def ensure_group(self) -> None:
        """Creates the group at the start of the stream (and the stream); an existing one is kept."""
        ensure_group(self.r, self.keys, self.cfg.group)

    # -- the loop --------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None, *, drain: bool = False) -> WorkerStats:
        """Handles entries until ``stop`` is set (or, with ``drain``, until the group has nothing left).

        ``drain`` stops once nothing is undelivered and nothing is pending for any consumer
        (entries of dead consumers are reclaimed first, after ``min_idle_ms``), which suits batch
        runs and tests.
        """
        stop = stop or threading.Event()
        backoff = 0.0
        self.ensure_group()
        own_done = False
        while not stop.is_set():
            try:
                if not own_done:
                    self._own_pending(stop)
                    own_done = True
                if time.monotonic() >= self._next_claim:
                    self.claim(stop)
                    self._next_claim = time.monotonic() + self.cfg.claim_interval_s
                block = self.cfg.block_ms if not drain else min(self.cfg.block_ms, 100)
                resp = self.r.xreadgroup(
                    self.cfg.group,
                    self.cfg.consumer,
                    {self.keys.stream: ">"},
                    count=self.cfg.count,
                    block=block,
                )
                entries = _entries(resp)
                for entry_id, fields in entries:
                    if stop.is_set():
                        break  # read but not handled: stays pending, reclaimed later
                    self.handle(entry_id, fields, deliveries=1)
                backoff = 0.0
                if drain and not entries and self._group_done():
                    break
                if drain and not entries:
                    # wait for pending entries of others to become claimable
                    self._next_claim = min(self._next_claim, time.monotonic() + self.cfg.claim_interval_s)
                    stop.wait(min(0.05, self.cfg.claim_interval_s))
            except (redis.ConnectionError, redis.TimeoutError) as e:
                backoff = min(max(2 * backoff, 0.1), 5.0)
                log.warning(
                    "worker %s: Redis does not answer (%s); retrying in %.1f s", self.cfg.consumer, e, backoff
                )
                stop.wait(backoff)
        log.info("worker %s stopped: %s", self.cfg.consumer, self.stats.to_json())
        return self.stats

    def _group_done(self) -> bool:
        # Called right after a ``>`` read returned nothing, so nothing is undelivered either.
        info = group_info(self.r, self.keys, self.cfg.group)
        return bool(info) and int(info.get("pending", 0)) == 0

    def _own_pending(self, stop: threading.Event) -> None:
        """Re-reads this consumer's pending entries (a restart under the same name)."""
        start = "0-0"
        while not stop.is_set():
            resp = self.r.xreadgroup(
                self.cfg.group, self.cfg.consumer, {self.keys.stream: start}, count=self.cfg.count
            )
            entries = _entries(resp)
            if not entries:
                return
            counts = self._deliveries([e for e, _ in entries])
            for entry_id, fields in entries:
                if stop.is_set():
                    return
                self.handle(entry_id, fields, deliveries=counts.get(entry_id))
            start = entries[-1][0]

    def claim(self, stop: threading.Event | None = None) -> int:
        """One ``XAUTOCLAIM`` sweep (cursor followed to ``0-0``); handles what it took. Returns the count."""
        cursor, total = "0-0", 0
        while stop is None or not stop.is_set():
            resp = self.r.xautoclaim(
                self.keys.stream,
                self.cfg.group,
                self.cfg.consumer,
                self.cfg.min_idle_ms,
                start_id=cursor,
                count=self.cfg.count,
            )
            cursor = _text(resp[0])
            # Redis 6.2 lists entries deleted meanwhile as nil, which redis-py makes (None, None);
            # 7.0+ reports them apart (resp[2]) and drops them from the PEL itself.
            entries = [(_text(i), f) for i, f in resp[1] if i is not None]
            if entries:
                total += len(entries)
                self.stats.claimed += len(entries)
                log.info("worker %s: reclaimed %d idle entries", self.cfg.consumer, len(entries))
                counts = self._deliveries([e for e, _ in entries])
                for entry_id, fields in entries:
                    if stop is not None and stop.is_set():
                        break
                    self.handle(entry_id, fields, deliveries=counts.get(entry_id))
            if cursor == "0-0":
                break
        self._forget_dead_consumers()
        return total

    def _deliveries(self, ids: Sequence[str]) -> dict[str, int]:
        """times_delivered of pending entries (extended ``XPENDING``; one call for the batch)."""
        if not ids:
            return {}
        rows = self.r.xpending_range(
            self.keys.stream, self.cfg.group, min=ids[0], max=ids[-1], count=len(ids) + 100,
            consumername=self.cfg.consumer,
        )  # fmt: skip
        return {_text(r["message_id"]): int(r["times_delivered"]) for r in rows}

    def _forget_dead_consumers(self) -> None:
        try:
            consumers = self.r.xinfo_consumers(self.keys.stream, self.cfg.group)
        except redis.ResponseError:
            return
        for c in consumers:
            name = _text(c.get("name", b""))
            if (
                name != self.cfg.consumer
                and int(c.get("pending", 0)) == 0
                and int(c.get("idle", 0)) > self.cfg.forget_after_ms
            ):
                self.r.xgroup_delconsumer(self.keys.stream, self.cfg.group, name)
                self.stats.forgotten_consumers += 1

    # -- one entry -------------------------------------------------------------------------------

    def handle(self, entry_id: str, fields: Mapping[Any, Any] | None, deliveries: int | None) -> None:
        """Writes the entry's review record and acknowledges it, or dead-letters it.

        Args:
            entry_id: Stream entry id.
            fields: Its fields (None or empty: the entry was trimmed or deleted meanwhile).
            deliveries: Its delivery count, when known (None: looked up on failure).
        """
        n = self.cfg.max_deliveries
        if not fields:
            self.dead_letter(
                entry_id, {}, "entry was deleted or trimmed before it was handled", deliveries or 0
            )
            return
        if deliveries is not None and deliveries > n:
            self.dead_letter(
                entry_id, fields, f"delivered {deliveries} times without being acknowledged", deliveries
            )
            return
        try:
            event = FlagEvent.from_fields(fields)
            if self.hook:
                self.hook("before_write", event)
            created = self.write_review(event, entry_id)
            if created:
                self.stats.written += 1
            else:
                self.stats.redelivered += 1
            if self.hook:
                self.hook("after_write", event)
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # the infrastructure's failure, not the entry's: the loop backs off
        except Exception as e:
            self.stats.failed += 1
            count = deliveries if deliveries is not None else self._deliveries([entry_id]).get(entry_id, 1)
            reason = f"{type(e).__name__}: {e}"
            if count >= n:
                self.dead_letter(entry_id, fields, reason, count)
            else:
                log.warning(
                    "worker %s: entry %s failed (delivery %d of %d): %s",
                    self.cfg.consumer,
                    entry_id,
                    count,
                    n,
                    reason,
                )
            return
        self.r.xack(self.keys.stream, self.cfg.group, entry_id)

    def write_review(self, event: FlagEvent, entry_id: str) -> bool:
        """Creates ``<prefix>:review:<flag id>`` (status ``open``) unless it exists. True if created."""
        record = {
            **event.to_fields(),
            "status": "open",
            "stream_id": entry_id,
            "received_by": self.cfg.consumer,
            "received_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        args: list[Any] = [event.created_ms, event.flag_id]
        for k, v in record.items():
            args += [k, v]
        return bool(self._write(keys=[self.keys.review(event.flag_id), self.keys.open_index], args=args))

    def dead_letter(self, entry_id: str, fields: Mapping[Any, Any], reason: str, deliveries: int) -> None:
        """Copies the entry to the dead-letter stream, then acknowledges it (that order: no loss)."""
        body: dict[Any, Any] = {f"orig.{_text(k)}": v for k, v in fields.items()}
        body.update(
            {
                "dlq.original_id": entry_id,
                "dlq.reason": reason[:2000],
                "dlq.deliveries": str(deliveries),
                "dlq.consumer": self.cfg.consumer,
                "dlq.at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
        )
        self.r.xadd(self.keys.dlq, body, maxlen=self.cfg.dlq_maxlen, approximate=True)
        self.r.xack(self.keys.stream, self.cfg.group, entry_id)
        self.stats.dead_lettered += 1
        log.error(
            "worker %s: entry %s dead-lettered after %d deliveries: %s",
            self.cfg.consumer,
            entry_id,
            deliveries,
            reason,
        )


# --------------------------------------------------------------------------------- group and stats


def ensure_group(client: redis.Redis, keys: FlagKeys, group: str) -> bool:
    """``XGROUP CREATE <stream> <group> 0 MKSTREAM``; False when the group existed (``BUSYGROUP``)."""
    try:
        client.xgroup_create(keys.stream, group, id="0", mkstream=True)
        return True
    except redis.ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise
        return False


def group_info(client: redis.Redis, keys: FlagKeys, group: str) -> dict[str, Any]:
    """The group's ``XINFO GROUPS`` row ({} when the stream or group does not exist)."""
    try:
        rows = client.xinfo_groups(keys.stream)
    except redis.ResponseError:
        return {}
    for row in rows:
        if _text(row.get("name", b"")) == group:
            return {_text(k): v for k, v in row.items()}
    return {}


def queue_stats(
    client: redis.Redis, keys: FlagKeys | None = None, group: str = "medaudit-review"
) -> dict[str, Any]:
    """Gauges for monitoring (``medaudit_flag_queue_*`` later): one round trip per number.

    Returns:
        ``stream_length`` (XLEN), ``group_lag`` (entries never delivered to the group; counted,
        up to :data:`LAG_SCAN_LIMIT`, where Redis does not say: 6.2, or 7.x after deletions; None
        without a group), ``group_pending`` (delivered, not acknowledged),
        ``consumers``, ``dlq_length``, ``open_reviews`` and ``resolved_reviews``.
    """
    keys = keys or FlagKeys()
    info = group_info(client, keys, group)
    lag = info.get("lag")
    if info and lag is None:
        # Redis 6.2 has no lag field, and 7.x reports none after deletions: count what follows the
        # last delivered id instead, up to LAG_SCAN_LIMIT entries (a floor beyond that).
        last = _text(info.get("last-delivered-id", b"0-0"))
        lag = len(client.xrange(keys.stream, min=f"({last}", max="+", count=LAG_SCAN_LIMIT) or [])
    return {
        "stream_length": int(client.xlen(keys.stream)),
        "group_exists": bool(info),
        "group_lag": None if lag is None else int(lag),
        "group_pending": int(info.get("pending", 0)),
        "consumers": int(info.get("consumers", 0)),
        "dlq_length": int(client.xlen(keys.dlq)),
        "open_reviews": int(client.zcard(keys.open_index)),
        "resolved_reviews": int(client.zcard(keys.resolved_index)),
    }


# --------------------------------------------------------------------------------- process helpers


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT set ``stop``: the worker finishes its entry and returns (main thread only)."""

    def handler(signum: int, _frame: object) -> None:
        log.info("worker: %s received, stopping after the current entry", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _entries(resp: Any) -> list[tuple[str, Any]]:
    """``XREADGROUP`` reply for one stream (RESP2, redis-py's default) -> ``[(id, fields)]``."""
    if not resp:
        return []
    return [(_text(i), f) for i, f in resp[0][1]]


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, (bytes, bytearray)) else str(v)
