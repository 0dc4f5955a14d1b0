"""DICOM in (frames, photometric interpretations, compressed syntaxes) and DICOM out (SEG, Parametric
Map, SR written from a real audit, re-read and validated with dciodvfy), without a server."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medaudit.service.dicom_out import (
    Algorithm,
    FrameAudit,
    Geometry,
    heatmap_of,
    mask_of,
    read_report,
    to_source_grid,
    write_objects,
)
from medaudit.service.dicom_store import InstanceStore, multipart_related, parse_multipart_related
from medaudit.service.dicomweb import parse_frames, wants_dicom
from medaudit.service.errors import InvalidImageError, InvalidParameterError, UnsupportedMediaTypeError
from medaudit.service.inputs import decode_dicom, decode_image, to_model_input
from medaudit.testing import dicom as tdicom


def test_a_multi_frame_instance_gives_the_frames_asked_for() -> None:
    data = tdicom.source("multiframe", 16, 20, frames=3, seed=1)
    raw = pydicom.dcmread(io.BytesIO(data)).pixel_array
    first = decode_image(data)
    assert first.size == (16, 20) and "3 frames: frame 1 decoded" in " ".join(first.notes)
    np.testing.assert_array_equal(first.rgb[..., 0], raw[0])
    ds, frames = decode_dicom(data, frames=[3, 2], max_frames=4)
    np.testing.assert_array_equal(frames[0].rgb[..., 0], raw[2])
    np.testing.assert_array_equal(frames[1].rgb[..., 0], raw[1])
    assert "PixelData" not in ds and ds.NumberOfFrames == 3
    assert len(decode_dicom(data, frames=None, max_frames=3)[1]) == 3
    with pytest.raises(InvalidImageError, match="3 frames, more than the 2"):
        decode_dicom(data, frames=None, max_frames=2)
    with pytest.raises(InvalidImageError, match="frame 4 asked for"):
        decode_image(data, frame=4)


@pytest.mark.parametrize("syntax", ["rle", "jpegls", "jpeg2000"])
@pytest.mark.parametrize("kind", ["ct", "cr", "rgb"])
def test_lossless_compressed_syntaxes_decode_to_the_uncompressed_pixels(kind: str, syntax: str) -> None:
    plain = tdicom.source(kind, 32, 40, seed=2)  # JPEG 2000 needs 32 px for its 6 resolutions
    np.testing.assert_array_equal(decode_image(tdicom.encode(plain, syntax)).rgb, decode_image(plain).rgb)


def test_monochrome1_with_a_voi_lut_is_inverted_after_its_lut() -> None:
    img = decode_image(tdicom.source("cr", 24, 20, seed=3))
    raw = pydicom.dcmread(io.BytesIO(tdicom.source("cr", 24, 20, seed=3))).pixel_array.astype(float)
    assert "DICOM VOI LUT applied" in img.notes and "MONOCHROME1 inverted" in img.notes
    # the linear LUT keeps the order: the inverted image orders pixels the other way round
    assert np.corrcoef(img.rgb[..., 0].ravel().astype(float), raw.ravel())[0, 1] < -0.99


def test_video_and_unknown_syntaxes_are_a_415_naming_the_uid() -> None:
    plain = tdicom.source("ct", 16, 16)
    for uid in (pydicom.uid.MPEG4HP41, "1.2.840.10008.1.2.4.110"):
        with pytest.raises(UnsupportedMediaTypeError, match=uid.replace(".", r"\.")) as ei:
            decode_image(tdicom.with_transfer_syntax(plain, uid))
        assert ei.value.status == 415


@pytest.mark.parametrize("policy", ["resize", "center_crop"])
def test_masks_go_back_onto_the_source_pixels_they_came_from(policy: str) -> None:
    """to_source_grid undoes to_model_input: a square in the source, seen by the model at 12 px and
    mapped back, lands on the square (and nothing lands where a centre crop cut the source off)."""
    geometry = Geometry((12, 12), policy, 0.75)
    source = np.zeros((48, 32), dtype=bool)
    source[12:36, 8:24] = True
    rgb = np.repeat(source[..., None] * np.uint8(255), 3, axis=2)
    seen = to_model_input(rgb, geometry.size, policy, geometry.crop_pct)[..., 0] > 127
    back = to_source_grid(seen, source.shape, geometry)
    assert back.shape == source.shape
    assert (back & source).sum() / (back | source).sum() > 0.8
    # and not shifted: the centres agree to a source pixel
    np.testing.assert_allclose(np.argwhere(back).mean(0), np.argwhere(source).mean(0), atol=1.0)
    if policy == "center_crop":  # 48×32 -> 24×16 -> the middle 12×12: source rows 12..36, cols 4..28
        assert not back[:11].any() and not back[37:].any() and not back[:, :3].any()


@pytest.fixture(scope="module")
def audited(tiny_loaded) -> tuple[bytes, list[dict], Algorithm, Geometry]:
    """A 3-frame source and the tiny model's real audits of frames 1 and 3 (policy opened wide, so
    concepts are present and localized)."""
    from medaudit.service.audit import AuditEngine
    from medaudit.service.flags.policy import evaluate

    engine = AuditEngine(tiny_loaded, fpr=0.99)
    data = tdicom.source("multiframe", 40, 36, frames=3, seed=4)
    _, images = decode_dicom(data, frames=[1, 3], max_frames=3)
    answers = []
    for res in engine.audit(images, raw_heatmap=True):
        answers.append({**res.to_json(), "flag": evaluate(res).to_json()})
    assert any(c["present"] for a in answers for c in a["concepts"])
    algorithm = Algorithm(engine.tag, engine.card.files.get("weights", {}).get("sha256", "0" * 64))
    return data, answers, algorithm, Geometry(engine.size, engine.cfg.resize, engine.cfg.crop_pct)


def _dciodvfy(data: bytes, tmp_path: Path) -> list[str]:
    assert shutil.which("dciodvfy"), "dciodvfy missing: scripts/setup-system.sh installs dicom3tools"
    path = tmp_path / f"{time.monotonic_ns()}.dcm"
    path.write_bytes(data)
    r = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("Error")]


def test_written_objects_round_trip_and_hold_the_audit(audited, tmp_path: Path) -> None:
    import highdicom as hd

    data, answers, algorithm, geometry = audited
    source = pydicom.dcmread(io.BytesIO(data))
    objs = write_objects(source, [FrameAudit(1, answers[0]), FrameAudit(3, answers[1])], algorithm, geometry)
    assert [o.kind for o in objs] == ["SEG", "PM", "SR"]
    read = {o.kind: pydicom.dcmread(io.BytesIO(o.to_bytes())) for o in objs}
    for o in objs:
        assert not _dciodvfy(o.to_bytes(), tmp_path), o.kind
        ds = read[o.kind]
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientName == source.PatientName
        assert (
            ds.SeriesInstanceUID not in (source.SeriesInstanceUID,)
            and ds.SOPInstanceUID == o.sop_instance_uid
        )
        equipment = [e.get("ManufacturerModelName") for e in ds.ContributingEquipmentSequence]
        assert algorithm.tag in equipment, equipment  # after the source's own equipment
    seg = hd.seg.Segmentation.from_dataset(read["SEG"])
    labels = [s.SegmentLabel for s in read["SEG"].SegmentSequence]
    algo = read["SEG"].SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmVersion == algorithm.version
    for frame, answer in ((1, answers[0]), (3, answers[1])):
        for c in answer["concepts"]:
            got = (
                seg.get_pixels_by_source_frame(
                    source.SOPInstanceUID, [frame], segment_numbers=[labels.index(c["concept"]) + 1]
                )[0, :, :, 0]
                if c["concept"] in labels
                else None
            )
            if c["mask_png"] is None:
                assert got is None or not got.any()
                continue
            want = to_source_grid(mask_of(c["mask_png"]), (40, 36), geometry)
            np.testing.assert_array_equal(got.astype(bool), want)
    heat = read["PM"].pixel_array  # float32, one frame per source frame
    frames = [
        int(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for f in read["PM"].PerFrameFunctionalGroupsSequence
    ]
    assert heat.dtype == np.float32 and heat.shape == (3, 40, 36) and frames == [1, 2, 3]
    assert not heat[1].any()  # frame 2 was not audited
    for k, a in ((0, answers[0]), (2, answers[1])):
        np.testing.assert_array_equal(heat[k], to_source_grid(heatmap_of(a), (40, 36), geometry))
    groups = read_report(read["SR"])
    assert [g["frame"] for g in groups] == [1, 3]
    for g, a in zip(groups, answers, strict=True):
        assert g["codes"]["prediction"] == f"class/{a['prediction']['label']}"
        assert {k: v for k, v in g["values"].items() if k.startswith("probability/")} == {
            f"probability/{k}": v for k, v in a["prediction"]["probabilities"].items()
        }
        for c in a["concepts"]:
            for key in ("score", "percentile"):
                assert g["values"][f"{key}/{c['concept']}"] == c[key]
            assert g["values"][f"share/{c['concept']}"] == c["relevance_share"]
            present = g["codes"][f"present/{c['concept']}"]
            assert present == ("52101004" if c["present"] else "272519000")  # SCT Present / Absent
        assert g["codes"]["flagged"] == ("373066001" if a["flag"]["flagged"] else "373067005")
        assert g["texts"] == a["flag"]["reasons"]
        assert g["algorithm"] == {
            "name": f"medaudit {algorithm.tag}",
            "version": algorithm.version,
            "parameters": f"weights_sha256={algorithm.weights_sha256}",
        }


def test_no_present_concept_means_no_segmentation(audited) -> None:
    data, answers, algorithm, geometry = audited
    quiet = {
        **answers[0],
        "concepts": [{**c, "present": False, "mask_png": None} for c in answers[0]["concepts"]],
    }
    objs = write_objects(pydicom.dcmread(io.BytesIO(data)), [FrameAudit(2, quiet)], algorithm, geometry)
    assert [o.kind for o in objs] == ["PM", "SR"]
    withheld = {**quiet, "heatmap": None, "heatmap_png": None}  # a family whose rules are not validated
    objs = write_objects(pydicom.dcmread(io.BytesIO(data)), [FrameAudit(1, withheld)], algorithm, geometry)
    assert [o.kind for o in objs] == ["SR"]


def test_the_store_serves_until_the_ttl_and_refuses_paths(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "s", ttl_s=60)
    store.put("1.2", "1.2.3", "1.2.3.4", b"one")
    store.put("1.2", "1.2.3", "1.2.3.5", b"two")
    assert sorted(store.get("1.2")) == [b"one", b"two"] and store.get("1.2", "1.2.3", "1.2.3.4") == [b"one"]
    old = tmp_path / "s" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    os.utime(old, (old.stat().st_atime, old.stat().st_mtime - 61))  # written 61 s ago
    assert store.get("1.2") == [b"two"] and store.sweep() == 1 and not old.exists()
    assert oct(os.stat(tmp_path / "s" / "1.2" / "1.2.3" / "1.2.3.5.dcm").st_mode & 0o777) == "0o600"
    assert store.get("../..") == [] and store.get("1.2", "..") == []
    with pytest.raises(ValueError, match="not a DICOM UID"):
        store.put("1.2", "../x", "1", b"")


def test_multipart_related_round_trips_and_accept_negotiates() -> None:
    body, ctype = multipart_related([(b"\r\n--a--\r\n", "/x"), (b"second", None)])
    assert [d for _, d in parse_multipart_related(body, ctype)] == [b"\r\n--a--\r\n", b"second"]
    with pytest.raises(ValueError, match="boundary"):
        parse_multipart_related(body, "multipart/related")
    assert wants_dicom({"accept": 'multipart/related; type="application/dicom"'})
    assert wants_dicom({"accept": "application/json, application/dicom;q=0.5"})
    assert not wants_dicom({"accept": "application/json"}) and not wants_dicom({})
    assert parse_frames(None) == [1] and parse_frames("all") is None and parse_frames("3,1,3") == [3, 1]
    with pytest.raises(InvalidParameterError):
        parse_frames("last")


def test_an_unexpected_failure_is_logged_without_its_message(caplog) -> None:
    """A DICOM library's message may quote a patient's name: the log names the type and place."""
    from medaudit.service.dicomweb import _log_failure

    try:
        raise ValueError(f"invalid Patient's Name {tdicom.PATIENT_NAME!r}")
    except ValueError as e:
        _log_failure("request r1", e)
    assert "ValueError at test_dicom_io.py:" in caplog.text and tdicom.PATIENT_NAME not in caplog.text


def test_the_store_sweeps_by_itself(tmp_path: Path) -> None:
    """Expired patient data goes without a request to trigger it."""
    store = InstanceStore(tmp_path / "s", ttl_s=60)
    store.put("1.2", "1.2.3", "1.2.3.4", b"one")
    old = tmp_path / "s" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    os.utime(old, (old.stat().st_atime, old.stat().st_mtime - 61))
    store.start_sweeping(every_s=0.01)
    deadline = time.monotonic() + 10
    while old.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not old.exists()
