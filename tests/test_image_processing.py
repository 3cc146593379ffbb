"""models.image_processing against transformers' Qwen2VLImageProcessorPil running live (offline, Qwen3-VL values).

Equality is exact (np.array_equal on float32 pixel_values), not a tolerance: both sides make the same Pillow call
and the same float64 -> float32 arithmetic, so any difference is a bug.
"""

import io

import numpy as np
import pytest
from PIL import Image

from models.image_processing import (ImageError, ImageProcessorConfig, decode_image, num_image_tokens,
                                     preprocess_image, preprocess_images, smart_resize)

QWEN3_VL = {"patch_size": 16, "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "size": {"shortest_edge": 65536, "longest_edge": 16777216},
            "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor"}


def _hf_cls():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil


def make_hf(min_pixels=65536, max_pixels=16777216):
    return _hf_cls()(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                     size={"shortest_edge": min_pixels, "longest_edge": max_pixels})


@pytest.fixture(scope="module")
def hf():
    return make_hf()


def rand_rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def assert_same(hf_proc, hf_input, ours_pv, ours_grid):
    out = hf_proc(hf_input)
    ref_pv, ref_grid = np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])
    assert ours_pv.dtype == np.float32 and ours_pv.shape == ref_pv.shape
    assert np.array_equal(ours_pv, ref_pv), f"max abs diff {np.abs(ours_pv - ref_pv).max()}"
    assert np.array_equal(np.atleast_2d(ours_grid), ref_grid)


@pytest.mark.parametrize("h,w,grid", [(300, 400, (1, 18, 24)),  # banker's rounding: 9.375->9, 12.5->12
                                      (37, 53, (1, 14, 20)),  # upscaled past min_pixels
                                      (1000, 200, (1, 62, 12)),  # extreme aspect ratio
                                      (513, 511, (1, 32, 32)),  # odd sides
                                      (1100, 1500, (1, 68, 94))])  # larger, no max_pixels clamp
def test_rgb_matches_transformers(hf, h, w, grid):
    a = rand_rgb(h, w, seed=h * w)
    pv, g = preprocess_image(a)
    assert g == grid and pv.shape == (grid[1] * grid[2], 3 * 2 * 16 * 16)
    assert_same(hf, Image.fromarray(a), pv, g)
    pv_pil, g_pil = preprocess_image(Image.fromarray(a))  # PIL input takes the same path as the array
    assert g_pil == g and np.array_equal(pv_pil, pv)


@pytest.mark.parametrize("h,w,lo,hi,resized", [(700, 900, 65536, 200_000, (384, 480)),  # (704, 896) unclamped
                                                  (1200, 1600, 4096, 40_000, (160, 224))])  # >2x: Pillow's reduce
def test_downscale_branch_matches_transformers(h, w, lo, hi, resized):
    # A real max_pixels clamp (4096^2) would need ~400 MB of patches; lower it in both processors instead.
    cfg = ImageProcessorConfig(min_pixels=lo, max_pixels=hi)
    a = rand_rgb(h, w, seed=3)
    assert smart_resize(h, w, 32, lo, hi) == resized
    pv, g = preprocess_image(a, cfg)
    assert g == (1, resized[0] // 16, resized[1] // 16)
    assert_same(make_hf(min_pixels=lo, max_pixels=hi), Image.fromarray(a), pv, g)


def test_smooth_image_matches_transformers(hf):
    # Random noise saturates bicubic overshoot; a smooth gradient exercises the in-range interpolation path.
    y, x = np.mgrid[0:241, 0:367]
    a = np.stack([(x * 255 // 366), (y * 255 // 240), ((x + y) % 256)], -1).astype(np.uint8)
    pv, g = preprocess_image(a)
    assert_same(hf, Image.fromarray(a), pv, g)


def _modes():
    rng = np.random.default_rng(7)
    gray = Image.fromarray(rng.integers(0, 256, (90, 130), dtype=np.uint8), mode="L")
    rgba_arr = rng.integers(0, 256, (120, 85, 4), dtype=np.uint8)
    rgba_arr[:10, :, 3], rgba_arr[10:20, :, 3] = 0, 255  # fully transparent and fully opaque rows
    rgba = Image.fromarray(rgba_arr, mode="RGBA")
    la = Image.fromarray(rng.integers(0, 256, (64, 200, 2), dtype=np.uint8), mode="LA")
    pal = Image.fromarray(rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)).quantize(16)
    pal.info["transparency"] = 3  # palette entry 3 is transparent (tRNS chunk)
    return {"L": gray, "RGBA": rgba, "LA": la, "P+transparency": pal}


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P+transparency"])
def test_png_bytes_in_other_modes_match_transformers(hf, mode):
    data = encode(_modes()[mode], "PNG")
    original = Image.open(io.BytesIO(data))
    original.load()
    decoded = decode_image(data, "png")
    assert decoded.mode == "RGB" and decoded.size == original.size
    pv, g = preprocess_image(decoded)
    assert_same(hf, original, pv, g)  # HF's own conversion of the undecoded mode
    pv2, g2 = preprocess_image(Image.open(io.BytesIO(data)))  # our conversion of a non-RGB PIL image
    assert g2 == g and np.array_equal(pv2, pv)


def test_transparency_becomes_white():
    arr = np.zeros((40, 40, 4), np.uint8)
    arr[..., 0] = 200  # red under a fully transparent alpha must not leak through
    rgb = np.asarray(decode_image(encode(Image.fromarray(arr, mode="RGBA"), "PNG")))
    assert (rgb == 255).all()


def test_jpeg_bytes_and_exif_orientation(hf):
    a = rand_rgb(60, 100, seed=11)
    data = encode(Image.fromarray(a), "JPEG", quality=90)
    dec = decode_image(data, "image/jpeg")
    assert dec.size == (100, 60)
    assert np.array_equal(np.asarray(dec), np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    pv, g = preprocess_image(dec)
    assert_same(hf, Image.open(io.BytesIO(data)), pv, g)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display", as phone cameras write it
    rotated = decode_image(encode(Image.fromarray(a), "JPEG", exif=exif.tobytes()), "jpg")
    assert rotated.size == (60, 100)  # transposed, as transformers' load_image does


def test_batch_matches_transformers(hf):
    imgs = [rand_rgb(300, 400, 1), rand_rgb(37, 53, 2), rand_rgb(200, 1000, 3)]
    pv, grids = preprocess_images(imgs)
    assert grids.dtype == np.int64 and grids.shape == (3, 3)
    assert_same(hf, [Image.fromarray(a) for a in imgs], pv, grids)
    assert pv.shape[0] == sum(int(np.prod(g)) for g in grids)
    empty_pv, empty_grids = preprocess_images([])
    assert empty_pv.shape == (0, 1536) and empty_grids.shape == (0, 3)


def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
    sides = sorted(set(range(1, 700, 13)) | {16, 48, 80, 112, 144, 4000, 5000, 9000})  # k*32+16 are ties
    for factor, lo, hi in [(32, 65536, 16777216), (28, 3136, 12845056), (32, 65536, 200_000)]:
        for h in sides:
            for w in sides:
                if max(h, w) / min(h, w) > 200:
                    continue
                assert smart_resize(h, w, factor, lo, hi) == hf_smart_resize(h, w, factor, lo, hi), (h, w, factor)
    assert smart_resize(300, 400) == (288, 384)
    with pytest.raises(ImageError, match="aspect ratio"):
        smart_resize(1, 201)


def test_num_image_tokens_matches_transformers(hf):
    assert num_image_tokens((1, 18, 24), 2) == 108
    for h, w in [(300, 400), (37, 53), (1000, 200)]:
        _, g = preprocess_image(rand_rgb(h, w))
        assert num_image_tokens(g, 2) == hf.get_number_of_image_patches(h, w) // 4


def test_config_from_hf():
    assert ImageProcessorConfig.from_hf(QWEN3_VL) == ImageProcessorConfig()
    assert ImageProcessorConfig().factor == 32 and ImageProcessorConfig().patch_dim == 1536
    # Qwen2-VL style: top-level min/max_pixels override size, exactly as the HF constructor does.
    d = {"min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "size": {"shortest_edge": 1,
                                                                                "longest_edge": 2}}
    ours, ref = ImageProcessorConfig.from_hf(d), _hf_cls()(**d)
    assert (ours.min_pixels, ours.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
    # Absent keys take the HF class defaults (Qwen2-VL's), as transformers would.
    ours, ref = ImageProcessorConfig.from_hf({}), _hf_cls()()
    assert ours.patch_size == ref.patch_size == 14
    assert np.allclose(ours.image_mean, ref.image_mean) and np.allclose(ours.image_std, ref.image_std)
    assert (ours.min_pixels, ours.max_pixels) == (ref.size.shortest_edge, ref.size.longest_edge)
    with pytest.raises(ValueError, match="do_normalize"):
        ImageProcessorConfig.from_hf({**QWEN3_VL, "do_normalize": False})


def _png():
    return encode(Image.fromarray(rand_rgb(64, 80)), "PNG")


def _jpeg():
    return encode(Image.fromarray(rand_rgb(64, 80)), "JPEG")


@pytest.mark.parametrize("make,fmt,pattern", [
    (lambda: b"", None, r"empty"),
    (lambda: _png()[: len(_png()) // 2], None, r"could not be decoded as png: .*truncated"),
    (lambda: _png()[: len(_png()) // 2], "png", r"could not be decoded as png"),
    (lambda: _jpeg()[: len(_jpeg()) // 2], "jpeg", r"could not be decoded as jpeg: .*truncated"),
    (lambda: _png()[:8] + b"\x00" * 64, None, r"could not be decoded as png"),
    (lambda: _png()[:8], None, r"could not be decoded as png: Pillow does not recognise"),
    (lambda: encode(Image.fromarray(rand_rgb(8, 8)), "GIF"), None, r"unsupported image format gif; .*png, jpeg"),
    (lambda: encode(Image.fromarray(rand_rgb(8, 8)), "BMP"), None, r"unsupported image format bmp; .*png, jpeg"),
    (lambda: b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 24, None, r"unsupported image format webp"),
    (lambda: _png(), "gif", r"unsupported image format 'gif'; supported formats: png, jpeg"),
    (lambda: _jpeg(), "png", r"declared image format png does not match the bytes, which are jpeg"),
    (lambda: _png(), "jpg", r"declared image format jpeg does not match the bytes, which are png"),
    (lambda: b"hello, not an image", None, r"not a recognised image format.*supported formats: png, jpeg"),
    (lambda: b"hello, not an image", "png", r"could not be decoded as png: .*signature"),
])
def test_decode_errors_are_one_line(make, fmt, pattern):
    with pytest.raises(ImageError, match=pattern) as exc:
        decode_image(make(), fmt)
    assert "\n" not in str(exc.value) and "BytesIO" not in str(exc.value)


def test_bad_inputs_raise_image_error():
    with pytest.raises(ImageError, match="uint8 HxWx3"):
        preprocess_image(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ImageError, match="uint8 HxWx3"):
        preprocess_image(np.zeros((32, 32), np.uint8))
    with pytest.raises(ImageError, match="aspect ratio"):
        preprocess_image(np.zeros((2, 500, 3), np.uint8))
    with pytest.raises(ImageError, match="must be bytes"):
        decode_image("not bytes")  # type: ignore[arg-type]
