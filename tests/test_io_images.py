"""Reading scans (PNG/JPEG/TIFF, DICOM, NIfTI) and preparing them to a model's spec: pixel values, notes, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medlens
from helpers import make_dicom, make_nifti
from medlens.errors import InputError
from medlens.io import limits, load_input, prepare, read_image
from medlens.io.preparation import box_resize, box_weights
from medlens.core.input_spec import InputSpec


# --------------------------------------------------------------------------------------------- fixtures


def gray8(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (h, w)).astype(np.uint8)


# --------------------------------------------------------------------------------------------- raster


def test_png_8bit_gray_values_and_minmax(tmp_path):
    arr = gray8()
    Image.fromarray(arr).save(tmp_path / "a.png")
    scan = read_image(tmp_path / "a.png")
    assert scan.kind == "png" and scan.layout == "gray" and scan.nominal_range == (0.0, 255.0)
    np.testing.assert_array_equal(scan.pixels, arr.astype(np.float32))
    x = medlens.load_input(tmp_path / "a.png")
    assert x.shape == (1, 1, 12, 10) and x.dtype == torch.float32
    expected = (arr - arr.min()) / (arr.max() - arr.min())
    np.testing.assert_allclose(x[0, 0].numpy(), expected, atol=1e-6)


def test_png_16bit_values_and_uint8_scale(tmp_path):
    arr = np.random.RandomState(1).randint(0, 65536, (9, 7)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a16.png")
    scan = read_image(tmp_path / "a16.png")
    np.testing.assert_array_equal(scan.pixels, arr.astype(np.float32))
    assert scan.nominal_range == (0.0, 65535.0)
    prepared = prepare(scan, InputSpec(scale="uint8"))
    np.testing.assert_allclose(prepared.tensor[0, 0].numpy(), arr / 65535.0, atol=1e-6)


def test_tiff_16bit_gray(tmp_path):
    arr = np.random.RandomState(2).randint(0, 65536, (8, 6)).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.tif")
    scan = read_image(tmp_path / "a.tif")
    assert scan.kind == "tiff"
    np.testing.assert_array_equal(scan.pixels, arr.astype(np.float32))


def test_rgb_to_gray_for_one_channel_model_and_kept_for_three(tmp_path):
    rgb = np.random.RandomState(3).randint(0, 256, (8, 9, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    scan = read_image(tmp_path / "c.png")
    assert scan.layout == "color" and scan.pixels.shape == (8, 9, 3)
    gray = prepare(scan, InputSpec(channels=1, scale="uint8"))
    luma = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0
    np.testing.assert_allclose(gray.tensor[0, 0].numpy(), luma, atol=1e-5)
    assert any("grayscale" in n for n in gray.notes)
    spec3 = InputSpec(channels=3, scale="uint8", mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    color = prepare(scan, spec3)
    for c in range(3):
        expected = (rgb[..., c] / 255.0 - spec3.mean[c]) / spec3.std[c]
        np.testing.assert_allclose(color.tensor[0, c].numpy(), expected, atol=1e-5)


def test_rgba_drops_alpha(tmp_path):
    rgba = np.random.RandomState(4).randint(0, 256, (6, 5, 4)).astype(np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "d.png")
    scan = read_image(tmp_path / "d.png")
    np.testing.assert_array_equal(scan.pixels, rgba[..., :3].astype(np.float32))
    assert "alpha channel dropped" in scan.notes


def test_gray_repeated_to_three_channels_with_note(tmp_path):
    arr = gray8(seed=5)
    Image.fromarray(arr).save(tmp_path / "g.png")

    class Spec3(torch.nn.Module):
        input_spec = InputSpec(channels=3, scale="uint8", mean=(0.5,), std=(0.25,))

    x, notes = medlens.load_input(tmp_path / "g.png", Spec3(), return_notes=True)
    assert x.shape == (1, 3, 12, 10)
    expected = (arr / 255.0 - 0.5) / 0.25
    for c in range(3):
        np.testing.assert_allclose(x[0, c].numpy(), expected, atol=1e-5)
    assert any("repeated to 3 channels" in n for n in notes)


def test_resize_to_spec_size_and_display_aligned(tmp_path):
    arr = np.full((20, 30), 77, dtype=np.uint8)
    arr[:, 15:] = 200
    Image.fromarray(arr).save(tmp_path / "r.png")
    prepared = prepare(read_image(tmp_path / "r.png"), InputSpec(size=(10, 10), scale="uint8"))
    assert prepared.tensor.shape == (1, 1, 10, 10) and prepared.display.shape == (10, 10)
    # left half stays at 77/255, right half at 200/255 (antialiased resize preserves flat regions)
    np.testing.assert_allclose(prepared.tensor[0, 0, :, :4].numpy(), 77 / 255, atol=1e-5)
    np.testing.assert_allclose(prepared.tensor[0, 0, :, 6:].numpy(), 200 / 255, atol=1e-5)
    assert any("aspect ratio changed" in n for n in prepared.notes)


@pytest.mark.parametrize("n_in, n_out", [((512, 515), (160, 161)), ((100, 37), (37, 100)), ((9, 9), (9, 9)), ((10, 23), (23, 10))])
def test_area_resample_equals_pillows_box_filter(n_in, n_out):
    # Pillow's BOX filter is the reference (the bundled brain model was trained on Pillow BOX-resized slices);
    # float images ("F" mode) so that Pillow does not round in between its two passes.
    arr = np.random.default_rng(0).uniform(0, 255, n_in).astype(np.float32)
    expected = np.asarray(Image.fromarray(arr, mode="F").resize(n_out[::-1], Image.BOX))
    got = box_resize(torch.from_numpy(arr)[None, None], n_out)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-3)
    weights = box_weights(n_in[0], n_out[0])
    assert torch.allclose(weights.sum(dim=1), torch.ones(n_out[0], dtype=weights.dtype))


def test_area_resample_in_3d_is_the_block_mean_for_whole_factors():
    vol = torch.arange(4 * 6 * 8, dtype=torch.float32).view(1, 1, 4, 6, 8)
    expected = vol.view(1, 1, 2, 2, 3, 2, 4, 2).mean(dim=(3, 5, 7))
    assert torch.allclose(box_resize(vol, (2, 3, 4)), expected)


def test_spec_resample_area_reproduces_the_brain_models_training_input(tmp_path):
    # what `medlens explain` and `medlens evaluate` feed the bundled brain model is what it was trained on:
    # Pillow BOX resize, then per-image min-max, then (x - mean) / std (up to the 8-bit rounding of training)
    from medlens.data.figshare import read_image as read_slice
    from medlens.training.train import brain_prepare

    rng = np.random.default_rng(1)
    arr = (rng.uniform(0, 1, (512, 512)) ** 2 * 255).astype(np.uint8)
    arr[:40] = 0
    Image.fromarray(arr).save(tmp_path / "slice.png")
    model = medlens.load_model("brain-tumor-mri")
    assert model.input_spec.resample == "area"
    x_io = load_input(tmp_path / "slice.png", model)
    slice_u8 = read_slice(tmp_path / "slice.png", 160)  # Pillow rounds to 8 bits after each of its two passes
    x_train = brain_prepare(slice_u8[None].float())
    assert x_io.shape == x_train.shape == (1, 1, 160, 160)
    step = 1 / float(slice_u8.max() - slice_u8.min()) / model.input_spec.std[0]  # one 8-bit level, normalised
    assert float((x_io - x_train).abs().max()) <= 1.01 * step
    bilinear = prepare(read_image(tmp_path / "slice.png"), InputSpec(size=(160, 160), mean=(0.15,), std=(0.2,))).tensor
    assert float((bilinear - x_train).abs().max()) > 5 * step  # the other filter would not have matched


def test_unknown_resample_mode_is_refused():
    with pytest.raises(InputError, match="resample"):
        InputSpec(resample="lanczos")
    with pytest.raises(InputError, match="resample"):
        InputSpec.from_dict({"size": [8, 8], "resample": "cubic"})


def test_jpeg_is_read_close_to_original(tmp_path):
    arr = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (16, 1))
    Image.fromarray(arr).save(tmp_path / "j.jpg", quality=95)
    scan = read_image(tmp_path / "j.jpg")
    assert scan.kind == "jpeg"
    assert np.abs(scan.pixels - arr).max() < 12


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_tiff_is_refused(tmp_path, bad):
    arr = np.ones((6, 6), dtype=np.float32)
    arr[2, 3] = bad
    Image.fromarray(arr, mode="F").save(tmp_path / "bad.tif")
    with pytest.raises(InputError, match=r"bad\.tif.*NaN or infinite"):
        read_image(tmp_path / "bad.tif")


def test_float_tiff_values(tmp_path):
    arr = np.random.RandomState(6).randn(5, 4).astype(np.float32) * 100
    Image.fromarray(arr, mode="F").save(tmp_path / "f.tif")
    scan = read_image(tmp_path / "f.tif")
    np.testing.assert_array_equal(scan.pixels, arr)
    assert scan.nominal_range is None
    prepared = prepare(scan, InputSpec(scale="uint8"))  # no nominal range: min-max with a note
    assert any("min-max" in n for n in prepared.notes)
    assert float(prepared.tensor.min()) == 0.0 and float(prepared.tensor.max()) == 1.0


# --------------------------------------------------------------------------------------------- DICOM


def test_dicom_rescale_slope_intercept(tmp_path):
    raw = np.array([[0, 100], [1000, 2000]], dtype=np.uint16)
    path = make_dicom(tmp_path / "ct.dcm", raw, RescaleSlope=2, RescaleIntercept=-1024)
    scan = read_image(path, window=False)
    np.testing.assert_allclose(scan.pixels, raw * 2.0 - 1024.0)
    assert scan.spacing == (0.5, 0.7)
    assert any("slope 2" in n for n in scan.notes)


def test_dicom_window_from_file(tmp_path):
    hu = np.array([[-1000, -160, 40], [240, 500, 39]], dtype=np.int16)
    path = make_dicom(tmp_path / "w.dcm", hu, WindowCenter=40, WindowWidth=400)
    scan = read_image(path)
    # DICOM PS3.3 C.11.2.1.2 linear window, scaled to [0, 1]
    expected = np.clip((hu.astype(np.float64) - (40 - 0.5)) / (400 - 1) + 0.5, 0, 1)
    np.testing.assert_allclose(scan.pixels, expected, atol=1e-6)
    assert scan.pixels[0, 0] == 0.0 and scan.pixels[1, 0] == 1.0 and scan.nominal_range == (0.0, 1.0)
    # the same window given explicitly, and no window at all
    np.testing.assert_allclose(read_image(path, window=(40, 400)).pixels, expected, atol=1e-6)
    np.testing.assert_array_equal(read_image(path, window=False).pixels, hu.astype(np.float32))


def test_dicom_rescale_then_window_multivalued(tmp_path):
    raw = np.array([[0, 1024, 1064, 2000]], dtype=np.uint16)
    from pydicom.multival import MultiValue
    from pydicom.valuerep import DSfloat

    path = make_dicom(tmp_path / "rw.dcm", raw, RescaleSlope=1, RescaleIntercept=-1024,
                      WindowCenter=MultiValue(DSfloat, [40, 400]), WindowWidth=MultiValue(DSfloat, [80, 2000]))
    scan = read_image(path)
    hu = raw.astype(np.float64) - 1024
    expected = np.clip((hu - 39.5) / 79 + 0.5, 0, 1)  # the first window is used
    np.testing.assert_allclose(scan.pixels, expected, atol=1e-6)


def test_dicom_monochrome1_inverted(tmp_path):
    raw = np.array([[0, 250], [500, 1000]], dtype=np.uint16)
    path = make_dicom(tmp_path / "m1.dcm", raw, PhotometricInterpretation="MONOCHROME1", BitsStored=12, HighBit=11)
    scan = read_image(path)
    np.testing.assert_allclose(scan.pixels, 4095.0 - raw)  # inverted within the stored range 0..2^12-1
    assert scan.nominal_range == (0.0, 4095.0)
    ct = make_dicom(tmp_path / "m1ct.dcm", raw, PhotometricInterpretation="MONOCHROME1", RescaleIntercept=-1024)
    np.testing.assert_allclose(read_image(ct).pixels, (-1024.0 + 1000.0 - 1024.0) - (raw - 1024.0))  # min + max - x
    assert any("MONOCHROME1" in n for n in scan.notes)
    windowed = make_dicom(tmp_path / "m1w.dcm", raw, PhotometricInterpretation="MONOCHROME1", WindowCenter=500, WindowWidth=1001)
    expected = 1.0 - np.clip((raw - 499.5) / 1000 + 0.5, 0, 1)
    np.testing.assert_allclose(read_image(windowed).pixels, expected, atol=1e-6)


def test_dicom_voi_lut_sequence(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    raw = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 8]
    item.LUTData = np.array([0, 10, 200, 255], dtype="<u2").tobytes()
    path = make_dicom(tmp_path / "lut.dcm", raw, VOILUTSequence=Sequence([item]))
    np.testing.assert_allclose(read_image(path).pixels, np.array([[0, 10, 200, 255]]) / 255.0, atol=1e-6)


def test_dicom_multiframe_volume_or_frame(tmp_path):
    frames = np.arange(3 * 4 * 5, dtype=np.uint16).reshape(3, 4, 5)
    path = make_dicom(tmp_path / "mf.dcm", frames)
    volume = read_image(path)
    assert volume.layout == "volume"
    np.testing.assert_array_equal(volume.pixels, frames.astype(np.float32))
    one = read_image(path, frame=2)
    assert one.layout == "gray"
    np.testing.assert_array_equal(one.pixels, frames[2].astype(np.float32))
    with pytest.raises(InputError, match="frame 5 does not exist"):
        read_image(path, frame=5)
    # a 2-D model given the multi-frame file gets the middle frame, with a note
    x, notes = medlens.load_input(path, return_notes=True)
    assert x.shape == (1, 1, 4, 5)
    assert any("middle slice 1" in n for n in notes)


def test_dicom_without_extension_is_detected(tmp_path):
    arr = np.arange(6, dtype=np.uint16).reshape(2, 3)
    make_dicom(tmp_path / "IM0001", arr)
    assert read_image(tmp_path / "IM0001").kind == "dicom"


def test_corrupt_and_truncated_dicom(tmp_path):
    corrupt = tmp_path / "corrupt.dcm"
    corrupt.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage-not-dicom" * 3)
    with pytest.raises(InputError, match=r"corrupt\.dcm"):
        read_image(corrupt)
    good = make_dicom(tmp_path / "good.dcm", np.zeros((32, 32), dtype=np.uint16))
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"truncated\.dcm"):
        read_image(truncated)


# --------------------------------------------------------------------------------------------- NIfTI


def test_nifti_volume_orientation_and_scaling(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)  # (x, y, z)
    path = make_nifti(tmp_path / "v.nii.gz", data, slope=2.0, inter=1.0, affine=np.diag([1.0, 2.0, 3.0, 1.0]))
    scan = read_image(path)
    assert scan.kind == "nifti" and scan.layout == "volume"
    expected = (data.astype(np.float32) * 2 + 1).transpose(2, 1, 0)[:, ::-1, :]  # (z, y, x), anterior up
    np.testing.assert_array_equal(scan.pixels, expected)
    assert scan.spacing == (3.0, 2.0, 1.0)


def test_nifti_slice_for_2d_model_and_volume_for_3d_model(tmp_path, tiny3d):
    data = np.random.RandomState(7).rand(6, 6, 5).astype(np.float32)
    path = make_nifti(tmp_path / "v.nii", data)
    volume = read_image(path).pixels
    x, notes = medlens.load_input(path, return_notes=True)  # 2-D default: middle slice
    assert x.shape == (1, 1, 6, 6)
    mid = volume[2]
    np.testing.assert_allclose(x[0, 0].numpy(), (mid - mid.min()) / (mid.max() - mid.min()), atol=1e-6)
    assert any("middle slice 2" in n for n in notes)
    x1 = medlens.load_input(path, slice_index=4)
    s4 = volume[4]
    np.testing.assert_allclose(x1[0, 0].numpy(), (s4 - s4.min()) / (s4.max() - s4.min()), atol=1e-6)
    with pytest.raises(InputError, match="slice 9 does not exist"):
        medlens.load_input(path, slice_index=9)
    v = medlens.load_input(path, tiny3d)  # a Conv3d model: the whole volume
    assert v.shape == (1, 1, 5, 6, 6)
    np.testing.assert_allclose(v[0, 0].numpy(), (volume - volume.min()) / (volume.max() - volume.min()), atol=1e-6)


def test_3d_model_refuses_2d_image(tmp_path):
    Image.fromarray(gray8()).save(tmp_path / "a.png")
    with pytest.raises(InputError, match="3-D volumes"):
        medlens.load_input(tmp_path / "a.png", spec=InputSpec(size=(4, 8, 8)))


# --------------------------------------------------------------------------------------------- limits and errors


def test_too_large_image_downsampled_with_note(tmp_path):
    arr = np.zeros((8, limits.MAX_SIDE_2D + 4), dtype=np.uint8)
    arr[:, : arr.shape[1] // 2] = 200
    Image.fromarray(arr).save(tmp_path / "wide.png")
    scan = read_image(tmp_path / "wide.png")
    assert scan.pixels.shape == (8, limits.MAX_SIDE_2D)
    assert any("downsampled" in n and str(limits.MAX_SIDE_2D) in n for n in scan.notes)
    assert scan.pixels[:, :100].min() == 200 and scan.pixels[:, -100:].max() == 0


def test_too_large_image_refused_naming_the_limit(tmp_path):
    Image.fromarray(np.zeros((4, limits.HARD_SIDE_2D + 1), dtype=np.uint8)).save(tmp_path / "huge.png")
    with pytest.raises(InputError, match=rf"huge\.png.*{limits.HARD_SIDE_2D}"):
        read_image(tmp_path / "huge.png")


def test_too_large_volume_downsampled(tmp_path):
    data = np.ones((limits.MAX_SIDE_3D + 8, 4, 4), dtype=np.float32)
    scan = read_image(make_nifti(tmp_path / "big.nii", data))
    assert max(scan.pixels.shape) == limits.MAX_SIDE_3D
    assert any("downsampled" in n for n in scan.notes)


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("missing.png", None, "no such file"),
        ("empty.png", b"", "empty"),
        ("notes.txt", b"hello", "unsupported file type '.txt'"),
        ("broken.png", b"\x89PNG\r\n\x1a\nthis is not really a png", "not a readable PNG"),
        ("broken.nii", b"not a nifti header at all" * 20, "not a valid NIfTI"),
    ],
)
def test_bad_files_name_the_file(tmp_path, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError, match=pattern) as info:
        medlens.load_input(path)
    assert name in str(info.value)


def test_folder_without_dicom_series(tmp_path):
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="is a folder without DICOM images"):
        read_image(tmp_path)


def test_dicom_series_folder_is_a_volume_sorted_by_position(tmp_path):
    from pydicom.uid import generate_uid

    series = generate_uid()
    z_positions = [30.0, 10.0, 40.0, 20.0]  # file order differs from anatomical order
    for n, z in enumerate(z_positions):
        raw = np.full((3, 4), int(z), dtype=np.uint16)
        make_dicom(tmp_path / f"IM{n:04d}.dcm", raw, SeriesInstanceUID=series, InstanceNumber=n + 1,
                   ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[0, 0, z],
                   RescaleSlope=1, RescaleIntercept=-5, WindowCenter=25, WindowWidth=100)
    (tmp_path / "notes.txt").write_text("other files are skipped")
    scan = read_image(tmp_path)
    assert scan.layout == "volume" and scan.pixels.shape == (4, 3, 4)
    hu = np.array([10.0, 20.0, 30.0, 40.0]) - 5  # sorted by position, rescaled
    expected = np.clip((hu - 24.5) / 99 + 0.5, 0, 1)  # one window for the whole series
    np.testing.assert_allclose(scan.pixels[:, 0, 0], expected, atol=1e-6)
    assert scan.spacing == (10.0, 0.5, 0.7)
    make_dicom(tmp_path / "other.dcm", np.zeros((3, 4), dtype=np.uint16), SeriesInstanceUID=generate_uid())
    with pytest.raises(InputError, match="holds 2 DICOM series"):
        read_image(tmp_path)


def test_pixel_count_limit_names_the_limit(tmp_path, monkeypatch):
    Image.fromarray(gray8(20, 20)).save(tmp_path / "many.png")
    monkeypatch.setenv("MEDLENS_HARD_PIXELS_2D", "100")
    with pytest.raises(InputError, match=r"many\.png.*400 pixels.*limit of 100"):
        read_image(tmp_path / "many.png")


def test_enhanced_multiframe_dicom_functional_groups(tmp_path):
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    transform, voi, group = Dataset(), Dataset(), Dataset()
    transform.RescaleSlope, transform.RescaleIntercept = 1, -1024
    voi.WindowCenter, voi.WindowWidth = 40, 400
    group.PixelValueTransformationSequence = Sequence([transform])
    group.FrameVOILUTSequence = Sequence([voi])
    frames = np.array([[[0, 1024]], [[1064, 2000]]], dtype=np.uint16)  # 2 frames of 1 x 2
    path = make_dicom(tmp_path / "enhanced.dcm", frames, SharedFunctionalGroupsSequence=Sequence([group]))
    hu = frames.astype(np.float64) - 1024
    expected = np.clip((hu - 39.5) / 399 + 0.5, 0, 1)
    np.testing.assert_allclose(read_image(path).pixels, expected, atol=1e-6)
    np.testing.assert_allclose(read_image(path, window=False).pixels, hu)


def test_nifti_reorientation_is_independent_of_storage_order(tmp_path):
    ras = np.random.RandomState(8).rand(5, 4, 3).astype(np.float32)
    a = read_image(make_nifti(tmp_path / "ras.nii", ras))
    # the same anatomy stored with x running right-to-left and z flipped (an LPI-like order)
    flipped_affine = np.diag([-1.0, 1.0, -1.0, 1.0])
    flipped_affine[0, 3], flipped_affine[2, 3] = 4.0, 2.0
    b = read_image(make_nifti(tmp_path / "flipped.nii", ras[::-1, :, ::-1].copy(), affine=flipped_affine))
    np.testing.assert_array_equal(a.pixels, b.pixels)


def test_tiff_16bit_rgb_pages_and_miniswhite(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rgb = np.random.RandomState(9).randint(0, 65536, (6, 5, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb)
    scan = read_image(tmp_path / "rgb16.tif")
    assert scan.layout == "color" and scan.nominal_range == (0.0, 65535.0)
    np.testing.assert_array_equal(scan.pixels, rgb.astype(np.float32))  # full 16-bit precision kept

    pages = [Image.fromarray(np.full((4, 4), 10 * i, dtype=np.uint8)) for i in range(3)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    assert read_image(tmp_path / "pages.tif", frame=2).pixels.max() == 20.0
    first = read_image(tmp_path / "pages.tif")
    assert first.pixels.max() == 0.0 and any("3 frames" in n for n in first.notes)

    white = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    tifffile.imwrite(tmp_path / "white.tif", white, photometric="miniswhite")
    np.testing.assert_array_equal(read_image(tmp_path / "white.tif").pixels, 255.0 - white)


def test_corrupt_tiff(tmp_path):
    Image.fromarray(gray8(64, 64)).save(tmp_path / "ok.tif")
    data = (tmp_path / "ok.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[:200])
    with pytest.raises(InputError, match=r"cut\.tif"):
        read_image(tmp_path / "cut.tif")


def test_volume_resized_to_3d_spec_by_block_means(tmp_path):
    data = np.random.RandomState(10).rand(8, 8, 6).astype(np.float32)  # (x, y, z) -> volume (6, 8, 8)
    scan = read_image(make_nifti(tmp_path / "v.nii", data))
    prepared = prepare(scan, InputSpec(size=(3, 4, 4), scale="none"))
    v = scan.pixels
    blocks = v.reshape(3, 2, 4, 2, 4, 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(prepared.tensor[0, 0].numpy(), blocks, atol=1e-6)
    assert prepared.display.shape == (3, 4, 4)


def test_reading_leaves_global_state_alone(tmp_path):
    Image.fromarray(gray8()).save(tmp_path / "a.png")
    before = (Image.MAX_IMAGE_PIXELS, list(__import__("warnings").filters))
    read_image(tmp_path / "a.png")
    assert (Image.MAX_IMAGE_PIXELS, list(__import__("warnings").filters)) == before


def test_a_single_slice_nifti_is_a_2d_image_with_2d_limits(tmp_path):
    rng = np.random.RandomState(5)
    data = rng.rand(64, 48).astype(np.float32)
    flat = read_image(make_nifti(tmp_path / "flat.nii.gz", data[:, :, None]))
    plain = read_image(make_nifti(tmp_path / "plain.nii.gz", data))
    assert flat.layout == "gray" and flat.pixels.shape == (48, 64)
    np.testing.assert_array_equal(flat.pixels, plain.pixels)
    assert "NIfTI with a single axial slice: read as a 2-D image" in flat.notes
    coronal_affine = np.array([[1.0, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]])  # j and k swapped
    coronal = read_image(make_nifti(tmp_path / "cor.nii.gz", data[:, :, None], affine=coronal_affine))
    assert coronal.layout == "gray" and coronal.pixels.shape == (48, 64)
    assert "NIfTI with a single coronal slice: read as a 2-D image" in coronal.notes
    wide = read_image(make_nifti(tmp_path / "wide.nii.gz", np.zeros((3000, 40, 1), dtype=np.float32)))
    assert wide.pixels.shape == (40, 3000)  # a 2-D side limit, not the 3-D one (2048) a volume gets


def test_frame_on_a_3d_nifti_and_an_invalid_dicom_window_are_said(tmp_path):
    vol = make_nifti(tmp_path / "vol.nii.gz", np.random.RandomState(1).rand(8, 8, 4).astype(np.float32))
    with pytest.raises(InputError, match="--frame picks a volume of a 4-D NIfTI"):
        read_image(vol, frame=2)
    dcm = make_dicom(tmp_path / "w0.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8), WindowCenter=30, WindowWidth=0)
    assert any("width 0) was not used" in n for n in read_image(dcm).notes)


def test_a_dicom_without_pixels_is_called_truncated_or_a_report(tmp_path):
    full = make_dicom(tmp_path / "ct.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8))
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(full.read_bytes()[:400])
    with pytest.raises(InputError, match="probably truncated"):
        read_image(cut)
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR: a report, no image
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    report = Dataset()
    report.file_meta = meta
    report.SOPClassUID = meta.MediaStorageSOPClassUID
    report.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    report.Modality = "SR"
    report.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    with pytest.raises(InputError, match="may be a report"):
        read_image(tmp_path / "sr.dcm")


def _without_preamble(path: Path) -> Path:
    """Rewrite a DICOM file as old ACR-NEMA-style exports hold it: no preamble, no DICM, no file meta, implicit VR."""
    import pydicom

    ds = pydicom.dcmread(str(path))
    ds.preamble = None
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.save_as(path, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert path.read_bytes()[128:132] != b"DICM"
    return path


def test_dicom_without_preamble_file_and_series(tmp_path):
    from pydicom.uid import generate_uid

    rng = np.random.RandomState(3)
    slices = [rng.randint(0, 3000, (6, 5)).astype(np.uint16) for _ in range(2)]
    single = _without_preamble(make_dicom(tmp_path / "acr.dcm", slices[0], WindowCenter=1500, WindowWidth=3000))
    scan = read_image(single, window=False)
    np.testing.assert_array_equal(scan.pixels, slices[0].astype(np.float32))
    assert any("ACR-NEMA" in n and "Implicit VR Little Endian" in n for n in scan.notes)
    series = tmp_path / "series"
    series.mkdir()
    uid = generate_uid()
    for i, arr in enumerate(slices):
        _without_preamble(make_dicom(series / f"s{i}", arr, SeriesInstanceUID=uid, InstanceNumber=i + 1,
                                     ImageOrientationPatient=[1, 0, 0, 0, 1, 0], ImagePositionPatient=[0, 0, i]))
    volume = read_image(series, window=False)
    assert volume.layout == "volume" and volume.pixels.shape == (2, 6, 5)
    np.testing.assert_array_equal(volume.pixels, np.stack(slices).astype(np.float32))
