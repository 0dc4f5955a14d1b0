"""The reviewer workbench's reads of the review queue, answered inside Redis.

The queue page filters by concept, severity, version and date and shows counts per value of each
filter. Python never holds the whole queue: one Lua script (:data:`QUEUE_LUA`) walks the index
range the date filter selects (a sorted-set range by score, the flag's time in ms), reads three
fields of each record, and returns the page's ids, the number that match and the facet counts.
Redis does O(N) cheap work for N flags in the date range (10,000 open flags: a few ms of Redis
time, benchmarks/review_ui.py); what crosses the wire is one page.

Flags are named in the browser by an opaque reference (:func:`flag_ref`), never by their id: a flag
id is ``<request id>:<concept>`` and a request id is whatever the caller sent as
``X-Request-ID``, which a hospital may fill with an accession number. A reference is an HMAC of
the id under a random secret kept in Redis; ``<prefix>:ui:ref:<ref>`` maps it back for as long as
the flag's blobs live (:data:`REF_TTL_S`), refreshed each time the flag is listed.

With Redis Cluster these scripts read review records that are not among their declared keys; they
need every key under the flag prefix in one slot (a standalone Redis or Sentinel, as deployed).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from medaudit.service.errors import InvalidParameterError, UnknownFlagError
from medaudit.service.flags.events import FlagKeys
from medaudit.service.flags.review import _SUMMARY, STATUSES, _available, _record, _text

#: How long a listed flag's reference resolves: the flag blobs' default TTL (7 days).
REF_TTL_S = 7 * 24 * 3600
#: Facets of the queue page: query parameter -> review record field.
FACETS = {"concept": "concept", "severity": "severity", "version": "model_version"}
MAX_PAGE = 100
#: Most flags the concept view and the previous-verdicts lookup walk, newest first.
MAX_SCAN = 20_000

#: KEYS: [index]; ARGV: [review key prefix, min ms, max ms, offset, limit, newest first (0/1),
#: concept, severity, version ("" = any)]. Returns [matching, {page ids}, {facet, value, n, …}].
#: A facet's counts are over the flags matching the *other* filters (so a chosen value's siblings
#: still say how many they would show).
QUEUE_LUA = """
local ids
if ARGV[6] == '1' then
  ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], ARGV[3], ARGV[2])
else
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[2], ARGV[3])
end
local pre, wc, ws, wv = ARGV[1], ARGV[7], ARGV[8], ARGV[9]
local offset, limit = tonumber(ARGV[4]), tonumber(ARGV[5])
local cc, cs, cv = {}, {}, {}
local page, matching = {}, 0
-- Locals and no table per flag: the loop is most of the script's time (benchmarks/review_ui.py).
for i = 1, #ids do
  local id = ids[i]
  local f = redis.call('HMGET', pre .. id, 'concept', 'severity', 'model_version')
  local c, s, v = f[1] or '', f[2] or '', f[3] or ''
  local okc, oks, okv = wc == '' or wc == c, ws == '' or ws == s, wv == '' or wv == v
  if oks and okv then cc[c] = (cc[c] or 0) + 1 end
  if okc and okv then cs[s] = (cs[s] or 0) + 1 end
  if okc and oks then
    cv[v] = (cv[v] or 0) + 1
    if okv then
      matching = matching + 1
      if matching > offset and #page < limit then page[#page + 1] = id end
    end
  end
end
local flat = {}
for name, counts in pairs({concept = cc, severity = cs, version = cv}) do
  for value, n in pairs(counts) do
    flat[#flat + 1] = name; flat[#flat + 1] = value; flat[#flat + 1] = n
  end
end
return {matching, page, flat}
"""

#: KEYS: [open index, resolved index]; ARGV: [review key prefix, concept, top k, most scanned].
#: Returns {id, score, …} of the concept's flags (open and resolved), highest CAV score first.
CONCEPT_LUA = """
local found = {}
for i = 1, 2 do
  local ids = redis.call('ZREVRANGE', KEYS[i], 0, tonumber(ARGV[4]) - 1)
  for _, id in ipairs(ids) do
    local f = redis.call('HMGET', ARGV[1] .. id, 'concept', 'score')
    if f[1] == ARGV[2] and f[2] then found[#found + 1] = {id, tonumber(f[2])} end
  end
end
table.sort(found, function(a, b) return a[2] > b[2] end)
local out = {}
for i = 1, math.min(#found, tonumber(ARGV[3])) do
  out[#out + 1] = found[i][1]; out[#out + 1] = tostring(found[i][2])
end
return {#found, out}
"""

#: KEYS: [resolved index]; ARGV: [review key prefix, subject hash ("" = none), request id,
#: flag id to leave out, most returned, most scanned]. Resolved flags of the same subject or the
#: same request, newest first.
HISTORY_LUA = """
local ids = redis.call('ZREVRANGE', KEYS[1], 0, tonumber(ARGV[6]) - 1)
local out = {}
for _, id in ipairs(ids) do
  if id ~= ARGV[4] then
    local f = redis.call('HMGET', ARGV[1] .. id, 'subject_hash', 'request_id')
    if (ARGV[2] ~= '' and f[1] == ARGV[2]) or f[2] == ARGV[3] then
      out[#out + 1] = id
      if #out >= tonumber(ARGV[5]) then break end
    end
  end
end
return out
"""


@dataclass(frozen=True)
class QueueFilter:
    """What the queue page shows. Empty strings and None mean "any"."""

    status: str = "open"
    concept: str = ""
    severity: str = ""
    version: str = ""
    since_ms: int | None = None
    until_ms: int | None = None
    offset: int = 0
    limit: int = 25

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise InvalidParameterError(
                f"unknown status {self.status!r}; valid: {', '.join(STATUSES)}", valid=list(STATUSES)
            )
        if not 1 <= self.limit <= MAX_PAGE or not 0 <= self.offset <= 10**9:
            raise InvalidParameterError(
                f"limit must be in [1, {MAX_PAGE}] and offset in [0, 1000000000]; "
                f"got {self.limit}, {self.offset}"
            )
        for name in FACETS:
            if len(getattr(self, name)) > 200:
                raise InvalidParameterError(f"filter {name} is longer than 200 characters")


class Refs:
    """Opaque references of flags for the browser (see the module docstring)."""

    def __init__(self, client: redis.Redis, keys: FlagKeys) -> None:
        self.r = client
        self.keys = keys
        secret_key = f"{keys.prefix}:ui:secret"
        with _available():
            self.r.set(secret_key, secrets.token_hex(32), nx=True)
            secret = self.r.get(secret_key)
        assert secret is not None  # set just above, never expires
        self._secret = secret if isinstance(secret, bytes) else str(secret).encode()

    def ref(self, flag_id: str) -> str:
        return flag_ref(self._secret, flag_id)

    def remember(self, flag_ids: Sequence[str]) -> dict[str, str]:
        """``{flag id: ref}``, each ref resolvable for :data:`REF_TTL_S` from now."""
        out = {fid: self.ref(fid) for fid in flag_ids}
        with _available():
            pipe = self.r.pipeline(transaction=False)
            for fid, ref in out.items():
                pipe.set(f"{self.keys.prefix}:ui:ref:{ref}", fid, ex=REF_TTL_S)
            pipe.execute()
        return out

    def resolve(self, ref: str) -> str:
        """The flag id of a reference; :class:`UnknownFlagError` (404) for one never listed or expired."""
        if not (len(ref) == 32 and all(c in "0123456789abcdef" for c in ref)):
            raise UnknownFlagError(ref[:40])
        with _available():
            fid = self.r.get(f"{self.keys.prefix}:ui:ref:{ref}")
        if fid is None:
            raise UnknownFlagError(ref)
        return _text(fid)


def flag_ref(secret: bytes, flag_id: str) -> str:
    """32 hex characters of HMAC-SHA256(secret, flag id): stable, and says nothing of the id."""
    return hmac.new(secret, flag_id.encode(), hashlib.sha256).hexdigest()[:32]


def _summaries(client: redis.Redis, keys: FlagKeys, ids: Sequence[str], refs: Refs) -> list[dict[str, Any]]:
    """Summary records of ``ids`` in order, each with its ``ref`` and without its flag id.

    The request id stays in the body (reviewers look flags up by it); it never reaches a URL.
    """
    with _available():
        pipe = client.pipeline(transaction=False)
        for fid in ids:
            pipe.hmget(keys.review(fid), [*_SUMMARY, "threshold", "corrected_disagrees"])
        rows = pipe.execute()
    names = refs.remember(ids)
    out = []
    for fid, values in zip(ids, rows, strict=True):
        fields = (*_SUMMARY, "threshold", "corrected_disagrees")
        rec = _record({k: v for k, v in zip(fields, values, strict=True) if v is not None})
        rec.pop("flag_id", None)
        rec["ref"] = names[fid]
        out.append(rec)
    return out


def queue_page(client: redis.Redis, keys: FlagKeys, f: QueueFilter, refs: Refs) -> dict[str, Any]:
    """One filtered page of the queue with facet counts (see :data:`QUEUE_LUA`)."""
    index = keys.open_index if f.status == "open" else keys.resolved_index
    lo = "-inf" if f.since_ms is None else str(f.since_ms)
    hi = "+inf" if f.until_ms is None else str(f.until_ms)
    with _available():
        total = int(client.zcard(index))
        script = client.register_script(QUEUE_LUA)
        matching, raw_ids, flat = script(
            keys=[index],
            args=[
                f"{keys.prefix}:review:",
                lo,
                hi,
                f.offset,
                f.limit,
                int(f.status == "resolved"),
                f.concept,
                f.severity,
                f.version,
            ],
        )
    facets: dict[str, dict[str, int]] = {name: {} for name in FACETS}
    for i in range(0, len(flat), 3):
        facets[_text(flat[i])][_text(flat[i + 1])] = int(flat[i + 2])
    ids = [_text(x) for x in raw_ids]
    return {
        "status": f.status,
        "total": total,
        "matching": int(matching),
        "offset": f.offset,
        "limit": f.limit,
        "facets": {k: dict(sorted(v.items())) for k, v in facets.items()},
        "items": _summaries(client, keys, ids, refs),
    }


def concept_ranking(
    client: redis.Redis, keys: FlagKeys, concept: str, refs: Refs, top: int = 24
) -> dict[str, Any]:
    """The concept's flagged images of recent traffic, highest CAV score first (the paper's
    retrieval view, method.md §1.4), with how many of them reviewers confirmed and rejected."""
    if not 1 <= top <= MAX_PAGE:
        raise InvalidParameterError(f"top must be in [1, {MAX_PAGE}]; got {top}")
    with _available():
        script = client.register_script(CONCEPT_LUA)
        n, flat = script(
            keys=[keys.open_index, keys.resolved_index],
            args=[f"{keys.prefix}:review:", concept, top, MAX_SCAN],
        )
    ids = [_text(flat[i]) for i in range(0, len(flat), 2)]
    items = _summaries(client, keys, ids, refs)
    verdicts: dict[str, int] = {}
    for it in items:
        if it.get("verdict"):
            verdicts[it["verdict"]] = verdicts.get(it["verdict"], 0) + 1
    return {"concept": concept, "flagged": int(n), "top": top, "items": items, "verdicts_shown": verdicts}


def history(
    client: redis.Redis, keys: FlagKeys, rec: Mapping[str, Any], refs: Refs, most: int = 10
) -> list[dict[str, Any]]:
    """Earlier verdicts on the same subject (``X-Subject-Key``, hashed) or the same request."""
    with _available():
        script = client.register_script(HISTORY_LUA)
        raw = script(
            keys=[keys.resolved_index],
            args=[
                f"{keys.prefix}:review:",
                rec.get("subject_hash", ""),
                rec.get("request_id", ""),
                rec.get("flag_id", ""),
                most,
                MAX_SCAN,
            ],
        )
    return _summaries(client, keys, [_text(x) for x in raw], refs)
