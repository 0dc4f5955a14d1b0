"""Upload decoding: every hostile input ends in a 4xx AuditError, every good one in correct RGB.

The hostile corpus (hand-crafted headers, truncations, seeded byte mutations of valid files, pydicom's
bundled test files) lives in ``tests/hostile_inputs.py``, shared with the HTTP suite in tests/live;
``test_hostile_corpus_size`` names its size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from hostile_inputs import (
    HOSTILE,
    MUTANTS,
    dcm,
    dcm_path,
    ds_bytes,
    gradient,
    png_header,
    save,
    valid_samples,
)
from PIL import Image
from pydicom.pixels import apply_windowing, get_decoder

from medaudit.service.errors import (
    AuditError,
    ImageTooLargeError,
    PayloadTooLargeError,
    UnsupportedMediaTypeError,
)
from medaudit.service.inputs import DecodedImage, Limits, decode_image, detect_format, to_model_input


@pytest.mark.parametrize(
    ("name", "data", "ctype", "limits", "expected"), HOSTILE, ids=[c[0] for c in HOSTILE]
)
def test_hostile_input_is_a_4xx(
    name: str, data: bytes, ctype: str | None, limits: Limits, expected: type[AuditError]
) -> None:
    with pytest.raises(AuditError) as ei:
        decode_image(data, ctype, limits)
    assert type(ei.value) is expected, f"{name}: {type(ei.value).__name__}: {ei.value}"
    assert 400 <= ei.value.status < 500
    body = ei.value.to_json()
    assert body["error"] == expected.code and body["detail"]


@pytest.mark.parametrize(("name", "data"), MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutated_file_decodes_or_is_a_4xx(name: str, data: bytes) -> None:
    try:
        img = decode_image(data)
    except AuditError as e:
        assert 400 <= e.status < 500, f"{name}: {e.status}"
    else:
        assert img.rgb.dtype == np.uint8 and img.rgb.ndim == 3


def test_hostile_corpus_size() -> None:
    """Hostile inputs tried: 90 = 30 crafted (29 where a JPEG-LS decoder is installed) + 60 mutants."""
    n = len(HOSTILE) + len(MUTANTS)
    assert n >= 89, n


# -- limits and errors -----------------------------------------------------------------------------


def test_payload_too_large_names_sizes() -> None:
    with pytest.raises(PayloadTooLargeError) as ei:
        decode_image(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200, limits=Limits(max_bytes=100))
    body = ei.value.to_json()
    assert body["size_bytes"] == 208 and body["max_bytes"] == 100 and ei.value.status == 413


def test_pixel_limit_is_checked_before_decoding() -> None:
    with pytest.raises(ImageTooLargeError) as ei:
        decode_image(png_header(3000, 2000), limits=Limits(max_pixels=5_999_999))
    assert ei.value.to_json()["pixels"] == 6_000_000 and "3000×2000" in str(ei.value)


def test_unsupported_media_type_lists_formats() -> None:
    with pytest.raises(UnsupportedMediaTypeError) as ei:
        decode_image(b"%PDF-1.7 ...", "application/pdf")
    assert "image/png" in ei.value.to_json()["supported"] and "application/pdf" in str(ei.value)


def test_limits_validate() -> None:
    from medaudit.models.errors import ConfigError

    with pytest.raises(ConfigError, match="max_pixels"):
        Limits(max_pixels=0)


# -- formats and modes -----------------------------------------------------------------------------


def test_detect_format() -> None:
    v = valid_samples()
    assert {k: detect_format(b) for k, b in v.items()} == {k: k for k in v}
    assert detect_format(b"") is None and detect_format(b"BM....") is None


def test_rgb_png_is_exact_and_read_only() -> None:
    g = gradient()
    img = decode_image(save(Image.fromarray(g), "PNG"), "image/png")
    assert isinstance(img, DecodedImage) and img.source_format == "png" and img.mode == "RGB"
    np.testing.assert_array_equal(img.rgb, g)
    assert img.original_size == g.shape[:2] and img.notes == ()
    with pytest.raises(ValueError):
        img.rgb[0, 0, 0] = 1


def test_declared_type_mismatch_decodes_by_magic_with_note() -> None:
    g = gradient()
    img = decode_image(save(Image.fromarray(g), "PNG"), "image/jpeg; charset=binary")
    np.testing.assert_array_equal(img.rgb, g)
    assert any("declared content type" in n for n in img.notes)
    assert decode_image(save(Image.fromarray(g), "PNG"), "application/octet-stream").notes == ()


def test_one_pixel_image_is_accepted_and_upscaled() -> None:
    img = decode_image(save(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert img.size == (1, 1) and any("upscaled" in n for n in img.notes)
    x = to_model_input(img, 224)
    assert x.shape == (224, 224, 3) and x.dtype == np.uint8 and (x == [10, 200, 30]).all()


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    a = np.linspace(0, 65535, 64 * 4).reshape(4, 64).astype(np.uint16)
    img = decode_image(save(Image.fromarray(a), "PNG"))
    expected = np.rint(a / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(img.rgb[:, :, 0], expected)
    assert img.rgb[..., 0].max() == 255 and len(np.unique(img.rgb)) > 200
    assert (img.rgb[..., 0] == img.rgb[..., 2]).all()


def test_cmyk_jpeg_converts_to_rgb() -> None:
    im = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    img = decode_image(save(im, "JPEG", quality=95))
    assert img.mode == "CMYK" and any("CMYK" in n for n in img.notes)
    r, g, b = img.rgb.reshape(-1, 3).mean(axis=0)
    assert r > 240 and g < 15 and b < 15


def test_palette_with_transparency_composites_on_black() -> None:
    im = Image.new("P", (4, 2), 1)
    im.putpalette([255, 255, 255, 0, 128, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    img = decode_image(save(im, "PNG", transparency=0))
    assert img.rgb[0, 0].tolist() == [0, 0, 0]
    assert img.rgb[1, 1].tolist() == [0, 128, 255]
    assert any("black" in n for n in img.notes)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_premultiplied_on_black(mode: str) -> None:
    im = Image.new("RGBA", (3, 3), (200, 100, 50, 128)).convert(mode)
    img = decode_image(save(im, "PNG"))
    src = np.asarray(im.convert("RGBA"), dtype=np.float64)[0, 0]
    np.testing.assert_allclose(img.rgb[0, 0], src[:3] * src[3] / 255, atol=0.5)


def test_exif_orientation_is_applied() -> None:
    g = gradient(8, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    img = decode_image(save(Image.fromarray(g), "PNG", exif=exif))
    assert img.original_size == (8, 20) and img.size == (20, 8)
    np.testing.assert_array_equal(img.rgb, np.rot90(g, k=-1))
    assert any("EXIF orientation 6" in n for n in img.notes)


def test_single_frame_gif_and_tiff_decode() -> None:
    g = gradient()
    tif = decode_image(save(Image.fromarray(g), "TIFF"), "image/tiff")
    np.testing.assert_array_equal(tif.rgb, g)
    gif = decode_image(save(Image.new("L", (5, 7), 77), "GIF"), "image/gif")
    assert gif.size == (7, 5) and (gif.rgb == 77).all()


def test_modes_match_the_training_loader(tmp_path: Path) -> None:
    """Served pixels equal trained pixels (models.data.folder.read_rgb) for every non-alpha mode."""
    from medaudit.models.data.folder import read_rgb

    rng = np.random.default_rng(3)
    images = {
        "L": Image.fromarray(rng.integers(0, 256, (9, 11), dtype=np.uint8)),
        "RGB": Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)),
        "I;16": Image.fromarray(rng.integers(0, 65536, (9, 11), dtype=np.uint16)),
        "I-small": Image.fromarray(rng.integers(0, 256, (9, 11)).astype(np.int32)),
        "I-large": Image.fromarray(rng.integers(0, 65536, (9, 11)).astype(np.int32)),
        "F": Image.fromarray(rng.uniform(0, 255, (9, 11)).astype(np.float32)),
        "P": Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).convert("P"),
        "1": Image.fromarray(rng.integers(0, 2, (9, 11)).astype(bool)),
    }
    for name, im in images.items():
        path = tmp_path / f"{name}.tiff"
        im.save(path)
        served = decode_image(path.read_bytes()).rgb
        np.testing.assert_array_equal(served, read_rgb(path), err_msg=name)
        np.testing.assert_array_equal(to_model_input(served, 16), read_rgb(path, 16), err_msg=name)


def test_to_model_input_sizes() -> None:
    g = gradient(30, 40)
    assert to_model_input(g, (20, 10)).shape == (20, 10, 3)
    same = to_model_input(g, (30, 40))
    np.testing.assert_array_equal(same, g)
    assert same.flags.writeable
    with pytest.raises(ValueError):
        to_model_input(g.astype(np.float32), 8)


# -- DICOM -----------------------------------------------------------------------------------------


def _ref_window(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's own windowing, rescaled from its output range to 0..255."""
    out = apply_windowing(ds.pixel_array, ds)
    lo, hi = (
        (0, 2**ds.BitsStored - 1)
        if ds.PixelRepresentation == 0
        else (-(2 ** (ds.BitsStored - 1)), 2 ** (ds.BitsStored - 1) - 1)
    )
    return (out - lo) / (hi - lo) * 255


def test_dicom_window_matches_pydicom() -> None:
    img = decode_image(dcm("MR_small.dcm"), "application/dicom")
    ds = pydicom.dcmread(dcm_path("MR_small.dcm"))
    assert img.source_format == "dicom" and img.mode == "MONOCHROME2/16" and img.size == (64, 64)
    assert np.abs(img.rgb[..., 0].astype(float) - _ref_window(ds)).max() <= 1.0
    assert any("window" in n for n in img.notes)


def test_dicom_rescale_then_window_in_hounsfield_units() -> None:
    ds = pydicom.dcmread(dcm_path("CT_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 40, 400
    img = decode_image(ds_bytes(ds))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.rint(np.clip((hu - 39.5) / 399 + 0.5, 0, 1) * 255)
    np.testing.assert_array_equal(img.rgb[..., 0], expected)
    assert any("rescale" in n for n in img.notes)


def test_dicom_without_window_is_min_max_scaled() -> None:
    img = decode_image(dcm("CT_small.dcm"))
    assert img.rgb.min() == 0 and img.rgb.max() == 255
    assert any("min–max" in n for n in img.notes)


def test_dicom_monochrome1_is_inverted() -> None:
    ds = pydicom.dcmread(dcm_path("MR_small.dcm"))
    mono2 = decode_image(ds_bytes(ds)).rgb.astype(int)
    ds.PhotometricInterpretation = "MONOCHROME1"
    mono1 = decode_image(ds_bytes(ds))
    assert np.abs(mono1.rgb.astype(int) - (255 - mono2)).max() <= 1
    assert any("MONOCHROME1" in n for n in mono1.notes)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"])
def test_dicom_lossless_encodings_decode_identically(name: str) -> None:
    if name == "MR_small_jp2klossless.dcm" and not get_decoder(pydicom.uid.JPEG2000Lossless).is_available:
        pytest.skip("no JPEG 2000 decoder (pillow built without openjpeg)")
    ref = decode_image(dcm("MR_small.dcm")).rgb
    np.testing.assert_array_equal(decode_image(dcm(name)).rgb, ref)


def test_dicom_ybr_is_converted_to_rgb() -> None:
    rgb = decode_image(dcm("SC_rgb_rle.dcm")).rgb.astype(int)
    ybr = decode_image(dcm("SC_ybr_full_422_uncompressed.dcm"))
    assert ybr.mode == "YBR_FULL_422/8" and any("converted to RGB" in n for n in ybr.notes)
    assert np.abs(ybr.rgb.astype(int) - rgb).mean() < 3


def test_dicom_16_bit_rgb_is_scaled() -> None:
    eight = decode_image(dcm("SC_rgb_rle.dcm")).rgb.astype(int)
    sixteen = decode_image(dcm("SC_rgb_rle_16bit.dcm"))
    assert sixteen.mode == "RGB/16"
    assert np.abs(sixteen.rgb.astype(int) - eight).max() <= 1


def test_dicom_palette_and_one_bit() -> None:
    pal = decode_image(dcm("examples_palette.dcm"))
    assert pal.size == (350, 800) and len(np.unique(pal.rgb.reshape(-1, 3), axis=0)) > 10
    bit = decode_image(dcm("liver_1frame.dcm"))
    assert set(np.unique(bit.rgb).tolist()) <= {0, 255}


def test_dicom_decoder_warning_becomes_a_note() -> None:
    # pydicom warns about excess padding; tests run with warnings as errors, the service must not fail.
    img = decode_image(dcm("MR_small_padded.dcm"))
    assert any("decoder warning" in n for n in img.notes)


def test_dicom_jpeg_ls_without_handler_names_the_syntax() -> None:
    if get_decoder(pydicom.uid.JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed")
    with pytest.raises(UnsupportedMediaTypeError, match="JPEG-LS") as ei:
        decode_image(dcm("MR_small_jpeg_ls_lossless.dcm"))
    assert ei.value.status == 415


@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (97, 97), (64, 500)])
@pytest.mark.parametrize(("side", "crop_pct"), [(96, 0.875), (224, 0.95), (64, 1.0)])
def test_center_crop_equals_torchvisions_eval_transform(
    shape: tuple[int, int], side: int, crop_pct: float
) -> None:
    """A model spec's ``resize = "center_crop"``: the pixels torchvision's Resize + CenterCrop give."""
    import math

    from torchvision import transforms

    rgb = np.random.default_rng(sum(shape)).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ref = transforms.Compose(
        [
            transforms.Resize(
                math.floor(side / crop_pct), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(side),
        ]
    )(Image.fromarray(rgb))
    got = to_model_input(rgb, side, "center_crop", crop_pct)
    assert got.shape == (side, side, 3)
    np.testing.assert_array_equal(got, np.asarray(ref))


def test_an_unknown_resize_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="resize policy 'letterbox'"):
        to_model_input(np.zeros((8, 8, 3), np.uint8), 4, "letterbox")
