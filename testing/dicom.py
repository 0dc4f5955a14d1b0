"""Small, valid DICOM sources for tests and benchmarks: every photometric interpretation and frame
layout the service decodes, in the transfer syntaxes pydicom can write here, each carrying (made-up)
patient identifiers so that PHI tests have something to look for.

``source("ct")`` is a 16-bit MONOCHROME2 CT with rescale and a window, ``"cr"`` a MONOCHROME1 CR
with a VOI LUT, ``"rgb"`` an RGB secondary capture, ``"ybr"`` a YBR_FULL secondary capture,
``"multiframe"`` a multi-frame 8-bit grey secondary capture. ``encode(data, syntax)`` recompresses
one (RLE, JPEG-LS, JPEG 2000: the encoders pydicom has with the installed plugins).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

#: The identifiers every source carries (PHI tests look for them in logs, metrics and Redis).
PATIENT_NAME = "Testpatient^Phiona"
PATIENT_ID = "PHI-PID-7731"
PATIENT_BIRTH_DATE = "19610203"
ACCESSION_NUMBER = "PHI-ACC-5512"
IDENTIFIERS = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH_DATE, ACCESSION_NUMBER)

KINDS = ("ct", "cr", "rgb", "ybr", "multiframe")


@dataclass(frozen=True)
class Patient:
    """Who the source belongs to (defaults: the made-up identifiers above)."""

    name: str = PATIENT_NAME
    id: str = PATIENT_ID
    birth_date: str = PATIENT_BIRTH_DATE
    accession: str = ACCESSION_NUMBER


def source(
    kind: str = "ct",
    rows: int = 32,
    cols: int = 32,
    *,
    frames: int = 3,
    seed: int = 0,
    patient: Patient | None = None,
    study_uid: str | None = None,
    pixels: np.ndarray | None = None,
) -> bytes:
    """A Part-10 file (explicit VR little endian) of ``kind`` (one of :data:`KINDS`); ``pixels``
    (rows×cols×3 uint8, for ``rgb``) replaces the random ones."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ComputedRadiographyImageStorage,
        CTImageStorage,
        ExplicitVRLittleEndian,
        MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    if kind not in KINDS:
        raise ValueError(f"kind {kind!r}; valid: {', '.join(KINDS)}")
    p = patient or Patient()
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sop_class = {
        "ct": CTImageStorage,
        "cr": ComputedRadiographyImageStorage,
        "multiframe": MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    }.get(kind, SecondaryCaptureImageStorage)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = p.name, p.id, p.birth_date, "F"
    ds.AccessionNumber = p.accession
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.ReferringPhysicianName = "20250102", "101500", "1", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = generate_uid(), 1, 1
    ds.Manufacturer = "medaudit-testing"
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.ContentDate, ds.ContentTime = "20250102", "101500"
    ds.Rows, ds.Columns = rows, cols
    if kind in ("ct", "cr"):
        ds.Modality = kind.upper()
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2" if kind == "ct" else "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        arr = rng.integers(0, 4096, (rows, cols), dtype=np.uint16)
        if kind == "ct":
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = generate_uid(), ""
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = 40, 400
            ds.KVP, ds.AcquisitionNumber, ds.PatientPosition = "", 1, "HFS"
        else:
            ds.ImageType = ["ORIGINAL", "PRIMARY"]
            lut = Dataset()
            lut.LUTDescriptor = [4096, 0, 16]
            lut.add_new(0x00283006, "US", np.linspace(0, 65535, 4096).astype(np.uint16).tolist())  # LUTData
            lut.LUTExplanation = "linear"
            ds.VOILUTSequence = [lut]
    elif kind in ("rgb", "ybr"):
        ds.Modality, ds.ConversionType = "OT", "WSD"
        ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
        ds.PhotometricInterpretation = "RGB" if kind == "rgb" else "YBR_FULL"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        arr = rng.integers(0, 256, (rows, cols, 3), dtype=np.uint8) if pixels is None else pixels
    else:
        ds.Modality, ds.ConversionType = "OT", "WSD"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
        ds.FrameTime = 100.0
        arr = rng.integers(0, 256, (frames, rows, cols), dtype=np.uint8)
    ds.PixelData = arr.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def encode(data: bytes, syntax: str) -> bytes:
    """``data`` (a Part-10 file) recompressed to the transfer syntax named ``syntax``:
    ``rle``, ``jpegls`` (lossless) or ``jpeg2000`` (lossless)."""
    import pydicom
    from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

    uid = {"rle": RLELossless, "jpegls": JPEGLSLossless, "jpeg2000": JPEG2000Lossless}[syntax]
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.compress(uid)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """``data`` relabelled as ``uid`` (its pixels encapsulated as they are): a file whose syntax
    the service must refuse by name, such as MPEG-4 video."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = encapsulate([bytes(ds.PixelData)])
    ds["PixelData"].VR = "OB"
    known = pydicom.uid.UID(uid).is_transfer_syntax
    # pydicom writes no transfer syntax it does not know: an unknown one replaces, in the bytes, a
    # known one of the same padded length
    stand_in = pydicom.uid.MPEG4HP41
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(uid) if known else stand_in
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    if known:
        return buf.getvalue()
    padded = (uid + "\0" * (len(uid) % 2)).encode()
    old = (stand_in + "\0" * (len(stand_in) % 2)).encode()
    if len(padded) != len(old):
        raise ValueError(f"an unknown transfer syntax UID must be {len(old)} bytes padded, got {uid!r}")
    return buf.getvalue().replace(old, padded, 1)
