"""The local spool: durable appends, one slot per producer, adoption of orphans, torn lines."""

from __future__ import annotations

import json
from pathlib import Path

from medaudit.service.flags.spool import Spool


def _recs(*seqs: int) -> list[dict[str, object]]:
    return [{"seq": s, "request_id": f"r{s}"} for s in seqs]


def test_records_survive_reopening_sorted_by_seq(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    assert sp.append(_recs(0, 2)) == 2 and sp.append(_recs(1)) == 1  # a newer record may land first
    assert sp.pending == 3
    sp.close()
    again = Spool(tmp_path)  # same slot: the last holder is gone
    assert again.slot == 0 and again.pending == 3
    with again.lock:
        recs, _ = again.snapshot_locked()
    assert [r["request_id"] for r in recs] == ["r0", "r1", "r2"]
    assert again.next_seq() == 3
    again.close()


def test_live_spools_take_different_slots_and_a_new_one_adopts_orphans(tmp_path: Path) -> None:
    a, b = Spool(tmp_path), Spool(tmp_path)
    assert (a.slot, b.slot) == (0, 1)
    a.append(_recs(0, 1))
    b.append(_recs(0))
    b.close()  # its process "died" with one record owed
    c = Spool(tmp_path)  # takes slot 1 back and keeps b's record
    assert c.slot == 1 and c.pending == 1
    a.close()
    c.close()
    d = Spool(tmp_path)  # slot 0 again; adopts slot 1's record behind its own two
    assert d.slot == 0 and d.pending == 3
    with d.lock:
        recs, _ = d.snapshot_locked()
    assert [r["seq"] for r in recs] == [0, 1, 2]
    assert not (tmp_path / "flags-1.jsonl").exists()
    d.close()


def test_rewrite_keeps_records_appended_after_the_snapshot(tmp_path: Path) -> None:
    sp = Spool(tmp_path)
    sp.append(_recs(0, 1, 2))
    with sp.lock:
        recs, upto = sp.snapshot_locked()
    sp.append(_recs(3))  # arrives while the snapshot is being published
    with sp.lock:
        sp.rewrite_locked([recs[2]], upto)  # r0 and r1 were published
        left, _ = sp.snapshot_locked()
    assert [r["seq"] for r in left] == [2, 3] and sp.pending == 2
    sp.close()


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "flags-0.jsonl").write_bytes(
        b"".join(json.dumps(r).encode() + b"\n" for r in _recs(0, 1)) + b'{"seq": 2, "requ'
    )
    sp = Spool(tmp_path)
    assert sp.pending == 2 and sp.corrupt == 1
    sp.append(_recs(5))
    with sp.lock:
        recs, _ = sp.snapshot_locked()
    assert [r["seq"] for r in recs] == [0, 1, 5]  # the torn tail did not swallow the new record
    sp.close()
