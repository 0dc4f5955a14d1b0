"""Where created DICOM objects wait to be retrieved (WADO-RS), and DICOMweb's multipart bodies.

:class:`InstanceStore` keeps each created instance as a file, ``<root>/<study>/<series>/<sop>.dcm``
(mode 0600, in a 0700 folder), for ``ttl_s`` seconds after it was written; expired files are
never served, and deleted by a sweep every :data:`SWEEP_EVERY_S` seconds (a daemon thread,
:meth:`InstanceStore.start_sweeping`) and on writes. The store is a folder, not process memory,
so that every API worker of one host serves what any of them created. These files hold patient
data (the objects carry the source's Patient module): docs/dicom.md says where and for how long.

:func:`multipart_related` writes a ``multipart/related; type="application/dicom"`` body (PS3.18
§8.6.1.2) and :func:`parse_multipart_related` reads one (a STOW-RS request).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from medaudit.service.envvars import positive_int

log = logging.getLogger(__name__)

DICOM = "application/dicom"
MULTIPART_RELATED = "multipart/related"
#: Least seconds between two sweeps of the store (a sweep walks every file; a write is frequent).
SWEEP_EVERY_S = 30.0
#: A DICOM UID: digits and dots, at most 64 characters (PS3.5 §9.1); also what keeps a path safe.
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_uid(s: str) -> bool:
    return len(s) <= 64 and bool(_UID.match(s))


@dataclass(frozen=True)
class DicomWebSettings:
    """``MEDAUDIT_DICOM_*``: where created objects are kept and for how long, and the STOW limits.

    Attributes:
        store_dir: ``MEDAUDIT_DICOM_DIR`` (default: ``medaudit-dicomweb-<uid>`` in the temp folder).
        ttl_s: ``MEDAUDIT_DICOM_TTL_S``: seconds a created object stays retrievable (default 3600).
        max_frames: ``MEDAUDIT_DICOM_MAX_FRAMES``: frames audited per instance with ``frames=all``.
        max_instances: ``MEDAUDIT_STOW_MAX_INSTANCES``: instances per STOW-RS request.
        max_request_bytes: ``MEDAUDIT_STOW_MAX_BYTES``: bytes of one STOW-RS request body.
        subject_secret: ``MEDAUDIT_SUBJECT_SECRET``: when set, a DICOM request without
            ``X-Subject-Key`` is routed by a keyed hash (HMAC-SHA256) of its Patient ID, so one
            patient keeps one version; the raw ID is never a routing key or in a flag.
    """

    store_dir: Path
    ttl_s: int = 3600
    max_frames: int = 8
    max_instances: int = 16
    max_request_bytes: int = 128 * 2**20
    subject_secret: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> DicomWebSettings:
        default_dir = Path(tempfile.gettempdir()) / f"medaudit-dicomweb-{os.getuid()}"
        return cls(
            store_dir=Path(env.get("MEDAUDIT_DICOM_DIR") or default_dir),
            ttl_s=positive_int(env, "MEDAUDIT_DICOM_TTL_S", cls.ttl_s),
            max_frames=positive_int(env, "MEDAUDIT_DICOM_MAX_FRAMES", cls.max_frames),
            max_instances=positive_int(env, "MEDAUDIT_STOW_MAX_INSTANCES", cls.max_instances),
            max_request_bytes=positive_int(env, "MEDAUDIT_STOW_MAX_BYTES", cls.max_request_bytes),
            subject_secret=env.get("MEDAUDIT_SUBJECT_SECRET") or None,
        )


class InstanceStore:
    """Created instances on disk for ``ttl_s`` seconds (see the module docstring).

    Args:
        root: The folder (created 0700 if missing).
        ttl_s: Seconds a file is served after it was written.
    """

    def __init__(self, root: Path, ttl_s: int) -> None:
        self.root = Path(root)
        self.ttl_s = ttl_s
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._swept = 0.0

    def _path(self, study: str, series: str, sop: str) -> Path:
        for uid in (study, series, sop):
            if not is_uid(uid):
                raise ValueError(f"not a DICOM UID: {uid[:80]!r}")
        return self.root / study / series / f"{sop}.dcm"

    def put(self, study: str, series: str, sop: str, data: bytes) -> None:
        """Writes one instance (atomically: readers never see half a file); sweeps expired ones when
        the last sweep is :data:`SWEEP_EVERY_S` old."""
        path = self._path(study, series, sop)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        if time.monotonic() - self._swept >= min(SWEEP_EVERY_S, self.ttl_s):
            self.sweep()

    def _fresh(self, path: Path, now: float) -> bool:
        try:
            return now - path.stat().st_mtime <= self.ttl_s
        except FileNotFoundError:
            return False

    def get(self, study: str, series: str | None = None, sop: str | None = None) -> list[bytes]:
        """The unexpired instances of a study, a series or one instance (empty: none or expired)."""
        for uid in (study, series, sop):
            if uid is not None and not is_uid(uid):
                return []
        base = self.root / study
        if series is not None:
            base = base / series
        if sop is not None:
            paths: Iterable[Path] = [base / f"{sop}.dcm"]
        else:
            paths = sorted(base.rglob("*.dcm")) if base.is_dir() else []
        now = time.time()
        out = []
        for p in paths:
            if self._fresh(p, now):
                try:
                    out.append(p.read_bytes())
                except FileNotFoundError:  # swept meanwhile
                    continue
        return out

    def start_sweeping(self, every_s: float = SWEEP_EVERY_S) -> threading.Thread:
        """Sweeps every ``every_s`` seconds in a daemon thread, for as long as the process runs, so
        that expired patient data goes even when no request comes."""

        def loop() -> None:
            while True:
                time.sleep(every_s)
                try:
                    self.sweep()
                except OSError as e:  # a vanished folder must not end the sweeping
                    log.warning("sweeping %s: %s", self.root, e.strerror or type(e).__name__)

        t = threading.Thread(target=loop, name="dicom-store-sweep", daemon=True)
        t.start()
        return t

    def sweep(self) -> int:
        """Deletes expired instances (and the folders they leave empty); returns how many."""
        self._swept = time.monotonic()
        now, n = time.time(), 0
        for p in self.root.rglob("*.dcm"):
            if not self._fresh(p, now):
                p.unlink(missing_ok=True)
                n += 1
        for d in sorted((d for d in self.root.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            # an empty folder goes once it is as old as the TTL: a new one may be about to be filled
            if self._fresh(d, now):
                continue
            with contextlib.suppress(OSError):
                d.rmdir()
        return n


# ------------------------------------------------------------------------------- multipart


def multipart_related(parts: Iterable[tuple[bytes, str | None]]) -> tuple[bytes, str]:
    """A ``multipart/related; type="application/dicom"`` body of ``(file, Content-Location)`` parts,
    and its content type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for data, location in parts:
        head = f"--{boundary}\r\nContent-Type: {DICOM}\r\n"
        if location:
            head += f"Content-Location: {location}\r\n"
        chunks += [head.encode(), b"\r\n", data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'{MULTIPART_RELATED}; type="{DICOM}"; boundary={boundary}'


def content_type_params(content_type: str) -> tuple[str, dict[str, str]]:
    """``multipart/related; type="application/dicom"; boundary=x`` -> (base type, params)."""
    base, *rest = content_type.split(";")
    params = {}
    for p in rest:
        k, sep, v = p.partition("=")
        if sep:
            params[k.strip().lower()] = v.strip().strip('"')
    return base.strip().lower(), params


def parse_multipart_related(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """The parts of a multipart body as ``(part content type, bytes)``.

    Raises:
        ValueError: No boundary, or no part (the message names what is missing).
    """
    base, params = content_type_params(content_type)
    boundary = params.get("boundary")
    if not base.startswith("multipart/") or not boundary:
        raise ValueError(
            f'expected Content-Type multipart/related; type="{DICOM}"; boundary=..., got {content_type!r}'
        )
    delimiter = b"--" + boundary.encode("latin-1")
    pieces = body.split(delimiter)
    parts = []
    for piece in pieces[1:]:
        if piece.startswith(b"--"):  # the closing delimiter
            break
        piece = piece[2:] if piece.startswith(b"\r\n") else piece
        head, sep, data = piece.partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part has no header/body separator (CRLF CRLF)")
        if data.endswith(b"\r\n"):
            data = data[:-2]
        ctype = params.get("type", DICOM)
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-type":
                ctype = value.strip()
        parts.append((ctype, data))
    if not parts:
        raise ValueError(f"the multipart body has no part delimited by --{boundary}")
    return parts
