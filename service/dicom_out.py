"""An audit of a DICOM image as DICOM objects a PACS can store beside it (highdicom + pydicom).

For one source instance and the audits of one or more of its frames (:class:`FrameAudit`), three
objects, each a new series of the source's study:

* **SEG** (Segmentation, BINARY): one segment per artifact concept present on an audited frame,
  its localization mask (method.md §2.1–2.2), frame for frame over the source; none when no concept
  is present (a SEG needs a segment).
* **PM** (Parametric Map, 32-bit float; none where the answer withholds the heatmap): the class
  heatmap, the LRP relevance (method.md §3) of the predicted class, with a real-world value
  mapping (unit: none) and a window centred on 0. A Parametric Map rather than a Secondary Capture
  overlay: it carries the relevance values themselves, which a viewer colours as it likes and an
  analysis can read back, and it duplicates no pixel of the source image (an overlay would be a
  second copy of the patient's image, with a colour map baked in).
* **SR** (Comprehensive SR, TID 1500 Measurement Report): per audited frame one measurement group
  (TID 1501) referencing the source frame, with the class probabilities, each concept's CAV score,
  percentile and relevance share (NUM, exact as float in FloatingPointValue), the predicted class,
  each concept's presence and the flag (CODE), and the flag's reasons (TEXT); the algorithm
  (TID 4019) is the model version with its weights' sha256.

Every object gets the source's Patient and Study modules (highdicom copies them), its Frame of
Reference where the IOD has one (SEG, PM) and the source has one, new Series and SOP Instance
UIDs, and the model version as Contributing Equipment (and, in the SEG, as each segment's
Algorithm Identification). Masks and heatmaps are computed at the model's input size and mapped
back onto the source's pixel grid by nearest neighbour (:func:`to_source_grid`), undoing the resize
(or resize-and-centre-crop) of :func:`medaudit.service.inputs.to_model_input`.

Concepts, classes and measurements are coded in a private scheme, :data:`SCHEME` (PS3.16 §8: a
designator starting with ``99``), as ``<kind>/<name>`` code values.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any

import numpy as np
from PIL import Image

# The geometry is the one to_model_input applies; re-exported for the DICOM routes and tests.
from medaudit.models.data.geometry import Geometry, to_source_grid

#: The private coding scheme of medaudit's concept names.
SCHEME = "99MEDAUDIT"
MANUFACTURER = "medaudit"
#: Series numbers of the created objects (a viewer sorts series by them).
SERIES_NUMBER = {"SEG": 9101, "PM": 9102, "SR": 9103}
KINDS = tuple(SERIES_NUMBER)


@dataclass(frozen=True)
class Algorithm:
    """The model version that audited: ``tag`` (``resnet18-synthderm:vanilla``) and the sha256 of its
    weights, from its card."""

    tag: str
    weights_sha256: str

    @property
    def version(self) -> str:
        return self.tag.split(":", 1)[-1]


@dataclass(frozen=True)
class FrameAudit:
    """One audited frame: its 1-based number in the source, and ``/audit``'s answer for it (with the
    raw ``heatmap``)."""

    frame: int
    answer: Mapping[str, Any]


@dataclass(frozen=True, eq=False)
class DicomObject:
    """One created instance."""

    kind: str
    dataset: Any  # pydicom Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.dataset.SeriesInstanceUID)

    @property
    def study_instance_uid(self) -> str:
        return str(self.dataset.StudyInstanceUID)

    @property
    def sop_class_uid(self) -> str:
        return str(self.dataset.SOPClassUID)

    @cached_property
    def data(self) -> bytes:
        """The Part-10 file, written once (stored and answered: pydicom's writer is a third of
        what an object costs)."""
        buf = io.BytesIO()
        self.dataset.save_as(buf, enforce_file_format=True)
        return buf.getvalue()

    def to_bytes(self) -> bytes:
        """The Part-10 file (:attr:`data`)."""
        return self.data

    def ref_json(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "sop_class_uid": self.sop_class_uid,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
        }


# ------------------------------------------------------------------------------- geometry


def mask_of(png_b64: str) -> np.ndarray:
    """A concept's ``mask_png`` (base64 PNG, 0/255) as a bool array."""
    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as im:
        return np.asarray(im.convert("L")) > 127


def heatmap_of(answer: Mapping[str, Any]) -> np.ndarray:
    """The raw heatmap of an answer (``?raw_heatmap=1``) as float32."""
    heat = answer.get("heatmap")
    if not heat:
        raise ValueError("the audit answer has no raw heatmap; audit with raw_heatmap=True")
    raw = np.frombuffer(base64.b64decode(heat["data"]), dtype="<f2").reshape(heat["shape"])
    return raw.astype(np.float32)


# ------------------------------------------------------------------------------- codes


def code(kind: str, name: str, meaning: str | None = None) -> Any:
    """The private concept ``<kind>/<name>`` (meaning: the name, or ``meaning``)."""
    from highdicom.sr import CodedConcept

    value = f"{kind}/{name}" if name else kind
    return CodedConcept(value, SCHEME, (meaning or name or kind)[:64])


@cache
def _units() -> tuple[Any, Any]:
    from pydicom.sr.codedict import codes

    return codes.UCUM.NoUnits, codes.UCUM.Percent


# ------------------------------------------------------------------------------- objects


def write_objects(
    source: Any,
    frames: Sequence[FrameAudit],
    algorithm: Algorithm,
    geometry: Geometry,
    kinds: Sequence[str] = KINDS,
) -> list[DicomObject]:
    """SEG (if a concept is present), PM and SR of ``frames``' audits of ``source``.

    Args:
        source: The source instance (a pydicom Dataset; pixel data not needed).
        frames: The audited frames, each with its ``/audit`` answer (raw heatmap included).
        algorithm: The answering model version.
        geometry: How the model saw the source (to map masks and heatmaps back).
        kinds: Which of :data:`KINDS` to write.
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown DICOM object kinds {unknown}; valid: {', '.join(KINDS)}")
    if not frames:
        raise ValueError("no audited frame")
    n_frames = int(source.get("NumberOfFrames", 1) or 1)
    shape = (n_frames, int(source.Rows), int(source.Columns))
    for f in frames:
        if not 1 <= f.frame <= n_frames:
            raise ValueError(f"frame {f.frame} is not one of the source's 1..{n_frames}")
    out = []
    if "SEG" in kinds:
        seg = _segmentation(_located(source), frames, algorithm, geometry, shape)
        if seg is not None:
            out.append(DicomObject("SEG", seg))
    # a family whose LRP rules are not validated gets no heatmap (its answer's heatmap_note): no PM
    if "PM" in kinds and all(f.answer.get("heatmap") for f in frames):
        out.append(DicomObject("PM", _parametric_map(_located(source), frames, algorithm, geometry, shape)))
    if "SR" in kinds:
        out.append(DicomObject("SR", _report(source, frames, algorithm)))
    return out


def _equipment(algorithm: Algorithm) -> list[Any]:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return [
        hd.ContributingEquipment(
            MANUFACTURER,
            codes.DCM.ProcessingEquipment,
            manufacturer_model_name=algorithm.tag[:64],
            software_versions=_software(),
            contribution_description=f"audit by {algorithm.tag}, weights sha256 {algorithm.weights_sha256}"[
                :64
            ],
        )
    ]


@cache
def _software() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"medaudit {version('medaudit')}"
    except PackageNotFoundError:
        return "medaudit"


def _common(algorithm: Algorithm, kind: str) -> dict[str, Any]:
    from pydicom.uid import generate_uid

    return {
        "series_instance_uid": generate_uid(),
        "series_number": SERIES_NUMBER[kind],
        "sop_instance_uid": generate_uid(),
        "instance_number": 1,
        "manufacturer": MANUFACTURER,
        "contributing_equipment": _equipment(algorithm),
    }


def _image_common(algorithm: Algorithm, kind: str) -> dict[str, Any]:
    return {
        **_common(algorithm, kind),
        "manufacturer_model_name": algorithm.tag[:64],
        "software_versions": _software(),
        "device_serial_number": algorithm.weights_sha256[:64] or "unknown",
    }


def _has_planes(source: Any) -> bool:
    """Whether highdicom can place the source's frames itself: a Frame of Reference, and plane
    position and orientation (per frame in a multi-frame image's functional groups)."""
    if "FrameOfReferenceUID" not in source:
        return False
    if int(source.get("NumberOfFrames", 1) or 1) > 1:
        return "PerFrameFunctionalGroupsSequence" in source
    return all(k in source for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"))


def _located(source: Any) -> Any:
    """The source, or, where it has no Frame of Reference or plane geometry (secondary captures,
    photographs, legacy multi-frames), a metadata copy with a new Frame of Reference UID: the
    Parametric Map IOD requires one, and highdicom places the frames of such a source only through
    functional groups for a multi-frame one. The objects still reference the source's SOP instance."""
    if _has_planes(source):
        return source
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    copy = Dataset()
    for elem in source:
        if elem.tag.group != 0x7FE0:  # no pixel data
            copy.add(elem)
    copy.file_meta = source.file_meta
    if "FrameOfReferenceUID" not in copy:
        copy.FrameOfReferenceUID = generate_uid()
    # highdicom places a single frame by its root position, the frames of a multi-frame image by
    # their functional groups: frame i at (0, 0, -i) mm (highdicom orders frames by descending
    # position, so the derived frames keep the source order), axial, the pixel spacing or 1 mm.
    spacing = [float(x) for x in (copy.get("PixelSpacing") or copy.get("ImagerPixelSpacing") or (1.0, 1.0))]
    orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    n = int(copy.get("NumberOfFrames", 1) or 1)
    if n == 1:
        copy.ImagePositionPatient = copy.get("ImagePositionPatient") or [0.0, 0.0, 0.0]
        copy.ImageOrientationPatient = copy.get("ImageOrientationPatient") or orientation
        copy.PixelSpacing = spacing
        copy.SliceThickness = copy.get("SliceThickness") or 1.0
    else:
        from highdicom import PixelMeasuresSequence, PlaneOrientationSequence, PlanePositionSequence

        shared = Dataset()
        shared.PixelMeasuresSequence = PixelMeasuresSequence(pixel_spacing=spacing, slice_thickness=1.0)
        shared.PlaneOrientationSequence = PlaneOrientationSequence("PATIENT", orientation)
        copy.SharedFunctionalGroupsSequence = [shared]
        per_frame = []
        for i in range(n):
            item = Dataset()
            item.PlanePositionSequence = PlanePositionSequence("PATIENT", (0.0, 0.0, float(-i)))
            per_frame.append(item)
        copy.PerFrameFunctionalGroupsSequence = per_frame
    return copy


def _laterality(ds: Any, source: Any, *, required: bool) -> Any:
    """General Series Laterality (2C), which highdicom leaves out: the source's; where the IOD
    requires it (the Parametric Map's) and the source has none, empty ("unknown")."""
    value = str(source.get("Laterality", "") or "")
    if value or required:
        ds.Laterality = value
    return ds


def _segmentation(
    source: Any,
    frames: Sequence[FrameAudit],
    algorithm: Algorithm,
    geometry: Geometry,
    shape: tuple[int, int, int],
) -> Any | None:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    concepts = list(
        dict.fromkeys(c["concept"] for f in frames for c in f.answer["concepts"] if c.get("mask_png"))
    )
    if not concepts:
        return None
    masks = np.zeros((*shape, len(concepts)), dtype=np.uint8)
    for f in frames:
        for c in f.answer["concepts"]:
            if c.get("mask_png"):
                k = concepts.index(c["concept"])
                masks[f.frame - 1, :, :, k] = to_source_grid(mask_of(c["mask_png"]), shape[1:], geometry)
    family = codes.cid7162.ArtificialIntelligence
    algo = hd.AlgorithmIdentificationSequence(
        name=f"{MANUFACTURER} {algorithm.tag}"[:64],
        family=family,
        version=algorithm.version[:64],
        parameters={"weights_sha256": algorithm.weights_sha256},
    )
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=c[:64],
            segmented_property_category=codes.cid7150.PhysicalObject,
            segmented_property_type=code("concept", c, f"{c} (artifact concept)"),
            algorithm_type="AUTOMATIC",
            algorithm_identification=algo,
        )
        for i, c in enumerate(concepts)
    ]
    seg = hd.seg.Segmentation(
        source_images=[source],
        pixel_array=masks,
        segmentation_type="BINARY",
        segment_descriptions=segments,
        series_description="medaudit artifact localization",
        content_label="ARTIFACTS",
        content_description=f"Artifact concept masks by {algorithm.tag}"[:64],
        omit_empty_frames=False,
        **_image_common(algorithm, "SEG"),
    )
    return _laterality(seg, source, required=False)


def _parametric_map(
    source: Any,
    frames: Sequence[FrameAudit],
    algorithm: Algorithm,
    geometry: Geometry,
    shape: tuple[int, int, int],
) -> Any:
    import highdicom as hd

    heat = np.zeros(shape, dtype=np.float32)
    for f in frames:
        heat[f.frame - 1] = to_source_grid(heatmap_of(f.answer), shape[1:], geometry)
    top = float(np.abs(heat).max()) or 1.0
    no_units, _ = _units()
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="LRP",
        lut_explanation=f"LRP relevance of the predicted class ({algorithm.tag})"[:64],
        unit=no_units,
        value_range=(float(heat.min()), float(heat.max())),
        slope=1.0,
        intercept=0.0,
    )
    # LINEAR_EXACT: relevance is small (a width below 1 is only valid with it, PS3.3 C.11.2.1.2)
    window = hd.VOILUTTransformation(
        window_center=0.0,
        window_width=2.0 * top,
        window_explanation="relevance, symmetric about 0",
        voi_lut_function="LINEAR_EXACT",
    )
    pm = hd.pm.ParametricMap(
        source_images=[source],
        pixel_array=heat if shape[0] > 1 else heat[0],
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[window],
        series_description="medaudit LRP heatmap",
        content_label="HEATMAP",
        content_description=f"LRP relevance by {algorithm.tag}"[:64],
        **_image_common(algorithm, "PM"),
    )
    return _laterality(pm, source, required=True)


def _report(source: Any, frames: Sequence[FrameAudit], algorithm: Algorithm) -> Any:
    from highdicom.sr import (
        AlgorithmIdentification,
        CodeContentItem,
        ComprehensiveSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        RelationshipTypeValues,
        SourceImageForMeasurementGroup,
        TextContentItem,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    no_units, percent = _units()
    yes_no = {True: codes.SCT.Yes, False: codes.SCT.No}
    present_absent = {True: codes.SCT.Present, False: codes.SCT.Absent}
    algo = AlgorithmIdentification(
        name=f"{MANUFACTURER} {algorithm.tag}"[:64],
        version=algorithm.version[:64],
        parameters=[f"weights_sha256={algorithm.weights_sha256}"],
    )
    multi = int(source.get("NumberOfFrames", 1) or 1) > 1
    groups = []
    for f in frames:
        a = f.answer
        pred, flag = a["prediction"], a["flag"]
        measurements = [
            Measurement(code("probability", label, f"probability of {label}"), float(p), no_units)
            for label, p in pred["probabilities"].items()
        ]
        evaluations = [
            QualitativeEvaluation(code("prediction", "", "predicted class"), code("class", pred["label"])),
            QualitativeEvaluation(code("flagged", "", "flagged for review"), yes_no[bool(flag["flagged"])]),
        ]
        for c in a["concepts"]:
            name = c["concept"]
            measurements += [
                Measurement(code("score", name, f"{name} CAV score"), float(c["score"]), no_units),
                Measurement(code("percentile", name, f"{name} percentile"), float(c["percentile"]), percent),
                Measurement(
                    code("share", name, f"{name} relevance share"), float(c["relevance_share"]), no_units
                ),
            ]
            evaluations.append(
                QualitativeEvaluation(
                    code("present", name, f"{name} present"), present_absent[bool(c["present"])]
                )
            )
        group = MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(uid=generate_uid(), identifier=f"frame {f.frame}"),
            algorithm_id=algo,
            source_images=[
                SourceImageForMeasurementGroup.from_source_image(
                    source, referenced_frame_numbers=[f.frame] if multi else None
                )
            ],
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
        container = group[0]
        for reason in flag.get("reasons", ()):
            container.ContentSequence.append(
                TextContentItem(
                    code("reason", "", "flag reason"),
                    str(reason),
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            )
        if flag.get("severity"):
            container.ContentSequence.append(
                CodeContentItem(
                    code("severity", "", "flag severity"),
                    code("severity", str(flag["severity"])),
                    relationship_type=RelationshipTypeValues.CONTAINS,
                )
            )
        groups.append(group)
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=generate_uid(),
            name=f"{MANUFACTURER} {algorithm.tag}"[:64],
            manufacturer_name=MANUFACTURER,
            model_name=algorithm.tag[:64],
        ),
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=code("procedure", "audit", "classifier audit"),
        imaging_measurements=groups,
    )
    sr = ComprehensiveSR(
        evidence=[source],
        content=report[0],
        series_description="medaudit audit report",
        **_common(algorithm, "SR"),
    )
    return sr


def read_report(ds: Any) -> list[dict[str, Any]]:
    """The measurement groups of an SR written by :func:`write_objects`, one dict per frame:
    ``{"frame", "values": {code value: number}, "codes": {code value: code value}, "texts": [flag
    reasons], "algorithm": {"name", "version", "parameters"}}``.
    For tests and clients that read the SR back."""
    out = []

    def value_of(item: Any) -> str:
        c = item.ConceptNameCodeSequence[0]
        return str(c.get("CodeValue") or c.get("LongCodeValue"))

    for group in _items(ds.ContentSequence):
        if group.ValueType != "CONTAINER" or "ContentSequence" not in group:
            continue
        found: dict[str, Any] = {"frame": None, "values": {}, "codes": {}, "texts": [], "algorithm": {}}
        for item in group.ContentSequence:
            if item.ValueType == "NUM":
                mv = item.MeasuredValueSequence[0]
                found["values"][value_of(item)] = float(mv.get("FloatingPointValue", mv.NumericValue))
            elif item.ValueType == "CODE":
                c = item.ConceptCodeSequence[0]
                found["codes"][value_of(item)] = str(c.get("CodeValue") or c.get("LongCodeValue"))
            elif item.ValueType == "TEXT" and value_of(item) == "reason":
                found["texts"].append(str(item.TextValue))
            elif item.ValueType == "TEXT" and value_of(item) in _ALGORITHM:
                found["algorithm"][_ALGORITHM[value_of(item)]] = str(item.TextValue)
            elif item.ValueType == "TEXT" and str(item.TextValue).startswith("frame "):
                found["frame"] = int(str(item.TextValue).split()[1])
        if found["values"]:
            out.append(found)
    return out


#: TID 4019's items (DCM codes) in :func:`read_report`'s ``algorithm``.
_ALGORITHM = {"111001": "name", "111003": "version", "111002": "parameters"}


def _items(seq: Any) -> list[Any]:
    """Every content item under ``seq``, depth first."""
    out = []
    for item in seq:
        out.append(item)
        if "ContentSequence" in item:
            out.extend(_items(item.ContentSequence))
    return out
