"""A durable local spool: append-only JSONL files holding what Redis has not taken yet.

Each producer process owns one *slot* (``<name>-<n>.jsonl``), held by an exclusive ``flock`` on
``<name>-<n>.lock`` for the life of the process, so BentoML's worker processes sharing one
directory never write the same file, and a restarted process takes over a free slot. Records
left in slots that nobody holds (a process that died, or fewer processes than before) are
**adopted** at open: moved into this process's file, ahead of anything new.

Durability: every :meth:`Spool.append` writes its records, flushes and ``os.fsync``\\ s before it
returns; a batch of records shares one fsync (none of them was acknowledged before). The file is
only ever appended to, except by :meth:`Spool.rewrite_locked`, which writes the records still owed
to a temporary file, fsyncs it, renames it over the old one and fsyncs the directory, so a crash
at any point leaves either the old or the new file, never a partial one. A torn last line (a
crash mid-append) is skipped with a warning when the file is read.

Records carry a sequence number ``seq``; readers sort by it, which restores submit order even
though a full in-memory queue lets a newer record reach the file before older ones (see
:mod:`medaudit.service.flags.producer`).

Thread safety: :attr:`Spool.lock` guards the file; methods ending in ``_locked`` expect the
caller to hold it. The lock is only held for file operations, never across network calls.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medaudit.service.errors import SpoolError

log = logging.getLogger(__name__)

#: Most slots (concurrent producer processes) one directory supports.
MAX_SLOTS = 256

Record = dict[str, Any]


class Spool:
    """One producer's spool file in ``directory`` (see the module docstring).

    Args:
        directory: Created if missing.
        name: File name stem; producers of different kinds use different names.
    """

    def __init__(self, directory: str | Path, name: str = "flags") -> None:
        self.directory = Path(directory)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create the spool directory {self.directory}: {e.strerror}") from e
        self.lock = threading.Lock()
        self._name = name
        self._slot, fd = self._take_slot()
        self._lock_fd: int | None = fd
        self.path = self._file(self._slot)
        self._fh: Any = None
        self._count = 0
        self.corrupt = 0
        with self.lock:
            self._adopt_and_normalise()

    # -- slots -----------------------------------------------------------------------------------

    def _file(self, slot: int) -> Path:
        return self.directory / f"{self._name}-{slot}.jsonl"

    def _lockfile(self, slot: int) -> Path:
        return self.directory / f"{self._name}-{slot}.lock"

    def _try_lock(self, slot: int) -> int | None:
        fd = os.open(self._lockfile(slot), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def _take_slot(self) -> tuple[int, int]:
        for slot in range(MAX_SLOTS):
            try:
                fd = self._try_lock(slot)
            except OSError as e:
                raise SpoolError(f"cannot lock a slot in {self.directory}: {e.strerror}") from e
            if fd is not None:
                return slot, fd
        raise SpoolError(f"all {MAX_SLOTS} spool slots in {self.directory} are held by live processes")

    @property
    def slot(self) -> int:
        return self._slot

    def _adopt_and_normalise(self) -> None:
        """Reads this slot's records plus those of unheld slots, and rewrites this slot's file."""
        own = sorted(self._read(self.path), key=_seq)
        adopted: list[Record] = []
        orphans: list[tuple[Path, int]] = []
        for p in sorted(self.directory.glob(f"{self._name}-*.jsonl")):
            try:
                slot = int(p.stem.rsplit("-", 1)[1])
            except ValueError:
                continue
            if slot == self._slot:
                continue
            fd = self._try_lock(slot)
            if fd is None:
                continue  # a live producer's file
            recs = sorted(self._read(p), key=_seq)
            if recs:
                log.warning("flag spool: adopting %d records from unheld slot file %s", len(recs), p)
            adopted += recs
            orphans.append((p, fd))
        records = own + adopted
        for i, r in enumerate(records):
            r["seq"] = i  # renumbered: the order above, and every new record after them
        if records or self.path.exists():
            self._write_atomically(records, b"")
        for p, fd in orphans:  # only after our copy is durable
            p.unlink(missing_ok=True)
            os.close(fd)
        self._count = len(records)
        self._open_append()

    # -- reading and writing ---------------------------------------------------------------------

    def _read(self, path: Path, start: int = 0) -> list[Record]:
        try:
            data = path.read_bytes()[start:]
        except FileNotFoundError:
            return []
        out = []
        for n, line in enumerate(data.split(b"\n")):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not isinstance(rec.get("seq"), int):
                    raise ValueError("not a spool record")
            except ValueError:
                self.corrupt += 1
                log.warning("flag spool %s: skipping unreadable line %d (%d bytes)", path, n + 1, len(line))
                continue
            out.append(rec)
        return out

    def _open_append(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the life of the spool

    def _write_atomically(self, records: Iterable[Record], tail: bytes) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            for r in records:
                f.write(_line(r))
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.directory)

    @property
    def pending(self) -> int:
        """Records in the file (approximate without the lock; exact under it)."""
        return self._count

    def append(self, records: Iterable[Record]) -> int:
        """Appends records durably (one fsync for the batch). Returns how many were written.

        Raises:
            OSError: The write or fsync failed (disk full, I/O error); nothing is counted.
        """
        with self.lock:
            return self.append_locked(records)

    def append_locked(self, records: Iterable[Record]) -> int:
        blob = b"".join(_line(r) for r in records)
        if not blob:
            return 0
        n = blob.count(b"\n")
        self._fh.write(blob)
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._count += n
        return n

    def snapshot_locked(self) -> tuple[list[Record], int]:
        """Every record, sorted by ``seq``, and the file size they were read up to."""
        size = self.path.stat().st_size if self.path.exists() else 0
        recs = self._read(self.path)
        return sorted(recs, key=_seq), size

    def rewrite_locked(self, keep: list[Record], read_up_to: int) -> None:
        """Replaces the records read by :meth:`snapshot_locked` with ``keep``.

        Bytes appended after ``read_up_to`` (records that arrived since the snapshot) are kept
        behind them. With nothing to keep the file is truncated to those bytes (often empty).
        """
        try:
            tail = self.path.read_bytes()[read_up_to:]
        except FileNotFoundError:
            tail = b""
        self._write_atomically(keep, tail)
        self._count = len(keep) + tail.count(b"\n")
        self._open_append()

    def next_seq(self) -> int:
        """The first sequence number above every record in the file (call once, at start)."""
        with self.lock:
            recs = self._read(self.path)
        return max((_seq(r) for r in recs), default=-1) + 1

    def close(self) -> None:
        """Closes the file and gives the slot up (records stay for the next process to adopt)."""
        with self.lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            if self._lock_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._lock_fd)
                self._lock_fd = None


def _seq(r: Record) -> int:
    return int(r["seq"])


def _line(r: Record) -> bytes:
    return json.dumps(r, separators=(",", ":")).encode() + b"\n"


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
