"""The client side of DICOM in, DICOM out: multipart/related bodies and the STOW-RS answer.

No DICOM library: the objects travel as the Part-10 bytes the service wrote (read them with
pydicom or hand them to a PACS). :func:`stow_body` writes a STOW-RS request,
:func:`parse_parts` reads a ``multipart/related; type="application/dicom"`` answer, and
:func:`parse_stow` the JSON answer of ``POST /dicomweb/studies``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DICOM",
    "DICOM_PARTS",
    "DicomObjectRef",
    "StowInstance",
    "StowResponse",
    "parse_parts",
    "parse_stow",
    "stow_body",
]

DICOM = "application/dicom"
#: The ``Accept`` of a DICOM answer (PS3.18: several instances, one part each).
DICOM_PARTS = f'multipart/related; type="{DICOM}"'


@dataclass(frozen=True)
class DicomObjectRef:
    """One created DICOM instance: its kind (``SEG``, ``PM``, ``SR``), UIDs and WADO-RS path."""

    kind: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    url: str


@dataclass(frozen=True)
class StowInstance:
    """One instance of a STOW-RS request: audited (``ok``) with what was created, or ``failed``
    with the error the service gives (``error``, ``detail``, ``http_status``)."""

    index: int
    status: str
    version: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None
    frames: tuple[Mapping[str, Any], ...] = ()
    objects: tuple[DicomObjectRef, ...] = ()
    notes: tuple[str, ...] = ()
    error: str | None = None
    detail: str | None = None
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True)
class StowResponse:
    """The answer of ``POST /dicomweb/studies``: one entry per instance, in the order sent."""

    request_id: str
    instances: tuple[StowInstance, ...]
    audited: int
    failed: int
    retrievable_for_s: int


def parse_stow(body: Mapping[str, Any]) -> StowResponse:
    def instance(d: Mapping[str, Any]) -> StowInstance:
        objs = tuple(
            DicomObjectRef(**{k: str(o[k]) for k in DicomObjectRef.__dataclass_fields__})
            for o in d.get("objects", ())
        )
        return StowInstance(
            index=int(d["index"]),
            status=str(d["status"]),
            version=d.get("version"),
            sop_instance_uid=d.get("sop_instance_uid"),
            study_instance_uid=d.get("study_instance_uid"),
            frames=tuple(d.get("frames", ())),
            objects=objs,
            notes=tuple(d.get("notes", ())),
            error=d.get("error"),
            detail=d.get("detail"),
            http_status=d.get("http_status"),
        )

    return StowResponse(
        request_id=str(body["request_id"]),
        instances=tuple(instance(d) for d in body["instances"]),
        audited=int(body["audited"]),
        failed=int(body["failed"]),
        retrievable_for_s=int(body["retrievable_for_s"]),
    )


def stow_body(files: Iterable[bytes]) -> tuple[bytes, str]:
    """A STOW-RS request body of Part-10 files, and its content type."""
    boundary = uuid.uuid4().hex
    chunks = []
    for data in files:
        chunks += [f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"{DICOM_PARTS}; boundary={boundary}"


def parse_parts(content: bytes, content_type: str) -> tuple[bytes, ...]:
    """The parts of a ``multipart/related`` answer (an ``application/dicom`` one: itself).

    Raises:
        ValueError: Not a multipart body, or one without a boundary.
    """
    base, _, rest = content_type.partition(";")
    if base.strip().lower() == DICOM:
        return (content,)
    params = {}
    for p in rest.split(";"):
        k, sep, v = p.partition("=")
        if sep:
            params[k.strip().lower()] = v.strip().strip('"')
    boundary = params.get("boundary")
    if base.strip().lower() != "multipart/related" or not boundary:
        raise ValueError(f"expected {DICOM_PARTS} with a boundary, got {content_type!r}")
    out = []
    for piece in content.split(b"--" + boundary.encode("latin-1"))[1:]:
        if piece.startswith(b"--"):
            break
        _head, found, data = piece.partition(b"\r\n\r\n")
        if found:
            out.append(data[:-2] if data.endswith(b"\r\n") else data)
    return tuple(out)
