"""Qwen3-VL image preprocessing in numpy + Pillow, bit-identical to transformers' `Qwen2VLImageProcessorPil`.

Why not call transformers: its default (torchvision) processor cannot run beside CPU torch 2.13, and importing
transformers costs seconds. Why bit-identical: the vision tower sees exactly these floats, so any drift would
show up as logit differences in the parity tests, and exact equality is cheap to get:

- RGB conversion as the processor's `convert_to_rgb`: anything with alpha (an "A" band or a `transparency` entry)
  is composited onto white, everything else goes through `Image.convert("RGB")`.
- `smart_resize` (Python's banker's `round`) picks a size divisible by `patch * merge`, then Pillow resizes the
  uint8 RGB image with BICUBIC (`reducing_gap=None`), exactly the call transformers makes.
- rescale is `float32(float64(u8) * (1/255))`, normalize is `(x - mean) / std` in float32. Both act on one uint8
  value per channel, so they are done as a 256-entry lookup table built with those same operations.
- patches are emitted merge-block-major, `(gh/m, gw/m, m, m)`, each flattened as `(C, T, P, P)` with the single
  frame repeated `temporal_patch_size` times; the grid is `(1, gh, gw)`.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

__all__ = ["ImageError", "ImageProcessorConfig", "smart_resize", "decode_image", "to_rgb", "preprocess_image",
           "preprocess_images", "num_image_tokens", "SUPPORTED_FORMATS"]

SUPPORTED_FORMATS = ("png", "jpeg")
# Magic numbers: used to name what the bytes are, so a wrong or unsupported format gets a precise message.
_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "png"), (b"\xff\xd8\xff", "jpeg"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
    (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"), (b"\x00\x00\x01\x00", "ico"),
)
_ALIASES = {"jpg": "jpeg", "jpe": "jpeg", "jfif": "jpeg", "tif": "tiff"}
_PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG"}


class ImageError(ValueError):
    """A user-facing image problem (bad bytes, unsupported format, impossible size); the message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Preprocessing values; the defaults are Qwen3-VL's `preprocessor_config.json`."""

    patch_size: int = 16
    merge_size: int = 2
    temporal_patch_size: int = 2
    min_pixels: int = 65536  # HF size["shortest_edge"]
    max_pixels: int = 16777216  # HF size["longest_edge"]
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    resample: int = int(Image.Resampling.BICUBIC)

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this, so the patch grid splits evenly into merge blocks."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        return len(self.image_mean) * self.temporal_patch_size * self.patch_size ** 2

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> "ImageProcessorConfig":
        """From a Hugging Face `preprocessor_config.json` dict.

        Keys absent from `d` take the defaults of transformers' `Qwen2VLImageProcessor` class (patch 14, CLIP mean
        and std, 56*56 .. 28*28*1280 pixels), since that is what transformers itself would use for such a file.
        Top-level `min_pixels`/`max_pixels` override `size`, as in the HF constructor. Switched-off steps
        (`do_resize` etc. false) are refused rather than silently computed differently.
        """
        for flag in ("do_resize", "do_rescale", "do_normalize", "do_convert_rgb"):
            if d.get(flag) is False:
                raise ValueError(f"unsupported preprocessor_config: {flag}=false (only the standard Qwen-VL "
                                 "pipeline is implemented)")
        size = dict(d.get("size") or {})
        min_px = size.get("shortest_edge", size.get("min_pixels", 56 * 56))
        max_px = size.get("longest_edge", size.get("max_pixels", 28 * 28 * 1280))
        if d.get("min_pixels") is not None:
            min_px = d["min_pixels"]
        if d.get("max_pixels") is not None:
            max_px = d["max_pixels"]
        clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

        def triple(v, default):
            v = default if v is None else v
            return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else (float(v),) * 3

        return cls(patch_size=int(d.get("patch_size", 14)), merge_size=int(d.get("merge_size", 2)),
                   temporal_patch_size=int(d.get("temporal_patch_size", 2)), min_pixels=int(min_px),
                   max_pixels=int(max_px), image_mean=triple(d.get("image_mean"), clip_mean),
                   image_std=triple(d.get("image_std"), clip_std),
                   rescale_factor=float(d.get("rescale_factor", 1 / 255)),
                   resample=int(d.get("resample", int(Image.Resampling.BICUBIC))))


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """transformers' `smart_resize`, line for line: sides divisible by `factor`, area within [min, max] pixels,
    aspect ratio kept as far as possible. `round` is Python's (ties to even): 300x400 -> 288x384."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ImageError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _sniff(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for magic, name in _SIGNATURES:
        if data.startswith(magic):
            return name
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """The HF processor's `convert_to_rgb`: transparency is composited onto white; other modes `.convert("RGB")`.

    (transformers' `load_image` instead drops alpha with a bare `.convert("RGB")`; the processor, qwen_vl_utils and
    vLLM all use white, so a transparent pixel means white here.)"""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes, fmt: str | None = None) -> Image.Image:
    """Decode PNG or JPEG bytes to an RGB PIL image (EXIF orientation applied, as transformers' `load_image`
    does; alpha composited onto white, as its processor does).

    `fmt` ("png", "jpeg"/"jpg", or a MIME type like "image/png") is what the caller declared; it must agree with
    the bytes. Every failure is an `ImageError` with a one-line message naming the problem.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageError(f"image payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise ImageError("image payload is empty (0 bytes)")
    supported = ", ".join(SUPPORTED_FORMATS)
    declared = None
    if fmt is not None:
        declared = str(fmt).strip().lower().removeprefix("image/").lstrip(".")
        declared = _ALIASES.get(declared, declared)
        if declared not in SUPPORTED_FORMATS:
            raise ImageError(f"unsupported image format {fmt!r}; supported formats: {supported}")
    actual = _sniff(data)
    if actual is None:
        if declared is not None:  # a declared format whose signature is missing: corrupt or mislabelled bytes
            raise ImageError(f"image bytes could not be decoded as {declared}: the data does not start with a "
                             f"{declared} signature (first bytes {data[:8].hex()})")
        raise ImageError(f"image bytes are not a recognised image format (first bytes {data[:8].hex()}); "
                         f"supported formats: {supported}")
    if actual not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported image format {actual}; supported formats: {supported}")
    if declared is not None and declared != actual:
        raise ImageError(f"declared image format {declared} does not match the bytes, which are {actual}")
    try:
        img = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[actual]])
        img.load()  # Pillow decodes lazily; force it so truncation/corruption surfaces here, not later
        img = ImageOps.exif_transpose(img)
    except Image.UnidentifiedImageError:  # its message is just a BytesIO repr
        raise ImageError(f"image bytes could not be decoded as {actual}: Pillow does not recognise the data as a "
                         f"valid {actual} file") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ImageError(f"image bytes could not be decoded as {actual}: {type(e).__name__}: {e}") from None
    return to_rgb(img)


def _as_rgb_image(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return to_rgb(image)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ImageError(f"image array must be uint8 HxWx3, got {arr.dtype} {tuple(arr.shape)}")
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _lut(cfg: ImageProcessorConfig) -> np.ndarray:
    """[256, C] float32: each uint8 value rescaled and normalised with transformers' exact dtype steps."""
    scaled = (np.arange(256, dtype=np.float64) * cfg.rescale_factor).astype(np.float32)
    mean = np.asarray(cfg.image_mean, np.float32)
    std = np.asarray(cfg.image_std, np.float32)
    return (scaled[:, None] - mean) / std


def preprocess_image(image: Image.Image | np.ndarray,
                     cfg: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (pixel_values float32 [gh*gw, C*T*P*P], grid_thw (1, gh, gw)).

    Accepts a PIL image (any mode) or a uint8 HxWx3 array."""
    img = _as_rgb_image(image)
    w, h = img.size
    if h < 1 or w < 1:
        raise ImageError(f"image has no pixels ({w}x{h})")
    rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    u8 = np.asarray(img.resize((rw, rh), resample=cfg.resample, reducing_gap=None))  # [rh, rw, C]
    x = _lut(cfg)[u8, np.arange(u8.shape[-1])]  # [rh, rw, C] float32
    p, m, t = cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size
    gh, gw = rh // p, rw // p
    x = x.reshape(gh // m, m, p, gw // m, m, p, -1).transpose(0, 3, 1, 4, 6, 2, 5)  # (bh, bw, mh, mw, C, ph, pw)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, p, p))  # one frame repeated to T
    return np.ascontiguousarray(x.reshape(gh * gw, -1), dtype=np.float32), (1, gh, gw)


def preprocess_images(images: Sequence[Image.Image | np.ndarray],
                      cfg: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[np.ndarray, np.ndarray]:
    """Several images -> (pixel_values concatenated along patches, image_grid_thw int64 [num_images, 3]),
    the layout of the HF processor's batch output."""
    outs = [preprocess_image(im, cfg) for im in images]
    if not outs:
        return np.zeros((0, cfg.patch_dim), np.float32), np.zeros((0, 3), np.int64)
    return np.concatenate([pv for pv, _ in outs]), np.array([g for _, g in outs], dtype=np.int64)


def num_image_tokens(grid_thw: Sequence[int], merge_size: int = 2) -> int:
    """LLM placeholder tokens for one image: each merge_size x merge_size block of patches becomes one token."""
    t, h, w = (int(v) for v in grid_thw)
    return t * h * w // merge_size ** 2
