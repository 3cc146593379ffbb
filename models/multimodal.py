"""Model inputs made of chunks (Tinker's `ModelInput`): encoded text and images, turned into token ids with
image pad tokens plus pixel values.

Chunks are duck-typed, so the official `tinker` types, their JSON form (dicts) and plain objects all work:
`{"type": "encoded_text", "tokens": [...]}` and `{"type": "image", "data": <bytes or base64>, "format":
"png" | "jpeg", "expected_tokens": int | None}`. As in Tinker, an image chunk becomes only its image pad tokens;
`<|vision_start|>` / `<|vision_end|>` are ordinary text around it (the renderer's job).

Everything is validated before anything is returned: a bad chunk anywhere in a batch raises one `InputError`
(or `ImageError`) naming the sequence and chunk, and no partial result exists.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses

import numpy as np

from models.checks import check_token_ids
from models.image_processing import ImageError, ImageProcessorConfig, decode_image, num_image_tokens, preprocess_image


class InputError(ValueError):
    """A model input the model cannot take: one line naming the sequence, chunk and limit."""


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    input_ids: np.ndarray  # [B, T] right-padded with pad_id
    attention_mask: np.ndarray  # [B, T]
    positions: np.ndarray  # [B, T], or [3, B, T] M-RoPE positions when the model takes images
    pixel_values: np.ndarray | None  # [P, C*T*p*p], images in order of appearance across the batch
    image_grid_thw: tuple[tuple[int, int, int], ...]  # one (t, h, w) per image

    @property
    def lengths(self) -> np.ndarray:
        return self.attention_mask.sum(axis=1)


def _field(chunk, name, default=None):
    return chunk.get(name, default) if isinstance(chunk, dict) else getattr(chunk, name, default)


def _image_bytes(data, where: str) -> bytes:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, str):
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"{where}: image data is a string but not valid base64") from None
    raise InputError(f"{where}: image data must be bytes or a base64 string, found {type(data).__name__}")


def encode_batch(sequences, cfg, *, processor: ImageProcessorConfig | None = None, max_tokens: int | None = None,
                 pad_id: int = 0) -> EncodedBatch:
    """Token ids, masks, positions and pixel values for a batch of chunk lists.

    `cfg` is the model config: a vision-language config (with `vision` and `image_token_id`) takes images;
    any other rejects them. `max_tokens` (default: the model's `max_position_embeddings`) bounds each
    sequence, image tokens included.
    """
    takes_images = hasattr(cfg, "vision") and hasattr(cfg, "image_token_id")
    processor = processor or ImageProcessorConfig()
    limit = max_tokens if max_tokens is not None else cfg.max_position_embeddings
    rows, pixels, grids = [], [], []
    for b, chunks in enumerate(sequences):
        row = []
        for c, chunk in enumerate(chunks):
            where = f"sequence {b} chunk {c}"
            kind = _field(chunk, "type")
            if kind == "encoded_text":
                tokens = [int(t) for t in _field(chunk, "tokens", [])]
                if tokens:
                    check_token_ids(tokens, cfg.vocab_size, where, error=InputError)
                if takes_images and cfg.image_token_id in tokens:
                    raise InputError(f"{where}: text contains the image pad token {cfg.image_token_id}; images must "
                                     "come as image chunks")
                row += tokens
            elif kind == "image":
                if not takes_images:
                    raise InputError(f"{where}: this model ({cfg.model_type}) does not take images")
                try:
                    image = decode_image(_image_bytes(_field(chunk, "data"), where), _field(chunk, "format"))
                except ImageError as e:
                    raise ImageError(f"{where}: {e}") from None
                values, grid = preprocess_image(image, processor)
                n = num_image_tokens(grid, processor.merge_size)
                expected = _field(chunk, "expected_tokens")
                if expected is not None and int(expected) != n:
                    raise InputError(f"{where}: expected_tokens={expected}, but this {image.width}x{image.height} "
                                     f"image becomes {n} tokens (grid {list(grid)}, merge {processor.merge_size})")
                row += [cfg.image_token_id] * n
                pixels.append(values)
                grids.append(tuple(int(v) for v in grid))
            else:
                raise InputError(f"{where}: unsupported chunk type {kind!r}; expected 'encoded_text' or 'image'")
        if len(row) > limit:
            raise InputError(f"sequence {b}: {len(row)} tokens (images included) exceed the model's context of "
                             f"{limit}")
        if not row:
            raise InputError(f"sequence {b}: empty model input")
        rows.append(row)
    T = max(map(len, rows))
    ids = np.full((len(rows), T), pad_id, np.int64)
    mask = np.zeros((len(rows), T), np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    grid_thw = tuple(grids)
    if takes_images:
        from models.qwen3_vl_moe import mrope_positions

        positions = mrope_positions(ids, mask, grid_thw, cfg)
    else:
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return EncodedBatch(ids, mask, positions, np.concatenate(pixels) if pixels else None, grid_thw)
