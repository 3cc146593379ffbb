"""Chunked model inputs (Tinker's ModelInput): text and png/jpeg image chunks -> token ids + pixel values."""

import base64
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from jtinker.compare_torch import sample_images
from models.image_processing import ImageError, preprocess_images
from models.multimodal import InputError, encode_batch
from models.qwen3_vl_moe import mrope_positions
from models.registry import create_model, preset_config

CFG = preset_config("tiny-qwen3-vl-moe")
START, END, PAD = CFG.vision_start_token_id, CFG.vision_end_token_id, CFG.image_token_id


def _encode(array, fmt):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format={"png": "PNG", "jpeg": "JPEG"}[fmt])
    return buffer.getvalue()


IMAGES = sample_images(3)  # 300x200, 180x320, 256x256
PNG = [_encode(a, "png") for a in IMAGES]


def text(*tokens):
    return {"type": "encoded_text", "tokens": list(tokens)}


def image(data, fmt="png", expected_tokens=None):
    return {"type": "image", "data": data, "format": fmt, "expected_tokens": expected_tokens}


def test_text_and_images_become_pad_tokens_and_pixels_in_order():
    batch = encode_batch([[text(5, 6, START), image(PNG[0]), text(END, 7)],
                          [text(8, START), image(base64.b64encode(PNG[1]).decode()), text(END, START),
                           image(PNG[2]), text(END)]], CFG)
    pixels, grids = preprocess_images(IMAGES)  # png is lossless: the same pixels as the arrays
    assert np.array_equal(batch.pixel_values, pixels)
    assert batch.image_grid_thw == tuple(tuple(int(v) for v in g) for g in grids)
    counts = [t * h * w // 4 for t, h, w in batch.image_grid_thw]
    row0 = [5, 6, START] + [PAD] * counts[0] + [END, 7]
    row1 = [8, START] + [PAD] * counts[1] + [END, START] + [PAD] * counts[2] + [END]
    assert batch.input_ids[0, :len(row0)].tolist() == row0 and batch.lengths.tolist() == [len(row0), len(row1)]
    assert batch.input_ids[1].tolist() == row1
    assert np.array_equal(batch.positions, mrope_positions(batch.input_ids, batch.attention_mask,
                                                           batch.image_grid_thw, CFG))
    # and the model runs on it
    graphdef, state = nnx.split(create_model(CFG, dtype="float32"))
    logits = jax.jit(lambda s, pix: nnx.merge(graphdef, s)(
        jnp.asarray(batch.input_ids), attention_mask_BT=jnp.asarray(batch.attention_mask),
        positions_BT=jnp.asarray(batch.positions), pixel_values=pix, image_grid_thw=batch.image_grid_thw))(
        state, jnp.asarray(batch.pixel_values))
    assert logits.shape == batch.input_ids.shape + (CFG.vocab_size,) and bool(jnp.all(jnp.isfinite(logits)))


def test_expected_tokens_is_checked_and_jpeg_works():
    n = encode_batch([[image(PNG[0])]], CFG).lengths[0]
    jpeg = _encode(IMAGES[0], "jpeg")
    assert encode_batch([[image(jpeg, "jpeg", expected_tokens=int(n))]], CFG).lengths[0] == n
    with pytest.raises(InputError) as e:
        encode_batch([[text(1)], [text(2), image(PNG[0], expected_tokens=int(n) + 1)]], CFG)
    message = str(e.value)
    assert "\n" not in message and "sequence 1 chunk 1" in message and f"becomes {n} tokens" in message


@pytest.mark.parametrize("chunk,error,fragment", [
    (image(PNG[0][:200]), ImageError, "could not be decoded as png"),
    (image(b"GIF89a" + b"\x00" * 40, "png"), ImageError, "gif"),
    (image(PNG[0], "jpeg"), ImageError, "does not match"),
    (image("not base64!!"), InputError, "not valid base64"),
    ({"type": "dmel", "dmel": "AAAA"}, InputError, "unsupported chunk type 'dmel'"),
    (text(PAD), InputError, "image pad token"),
    (text(CFG.vocab_size), InputError, "outside the vocabulary"),
], ids=["corrupt", "unsupported_format", "wrong_format", "bad_base64", "audio", "pad_in_text", "oov"])
def test_bad_chunks_fail_in_one_line(chunk, error, fragment):
    with pytest.raises(error) as e:
        encode_batch([[text(1, 2)], [text(3), chunk]], CFG)
    assert "\n" not in str(e.value) and fragment in str(e.value) and "sequence 1 chunk 1" in str(e.value)


def test_an_image_too_large_for_the_context_is_rejected():
    n = int(encode_batch([[image(PNG[2])]], CFG).lengths[0])
    assert encode_batch([[text(1), image(PNG[2])]], CFG, max_tokens=n + 1).lengths[0] == n + 1
    with pytest.raises(InputError, match=rf"sequence 0: {n + 2} tokens \(images included\) exceed the model's context "
                                         rf"of {n + 1}"):
        encode_batch([[text(1, 2), image(PNG[2])]], CFG, max_tokens=n + 1)


def test_text_models_reject_images():
    with pytest.raises(InputError, match="does not take images"):
        encode_batch([[text(1), image(PNG[0])]], preset_config("tiny-qwen3-moe"))
    batch = encode_batch([[text(1, 2, 3)], [text(4)]], preset_config("tiny-qwen3-moe"))
    assert batch.pixel_values is None and batch.positions.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_image_pad_tokens_must_match_the_grids():
    batch = encode_batch([[text(1), image(PNG[0]), text(2)]], CFG)
    truncated_ids = batch.input_ids.copy()
    truncated_ids[0, 3] = 9  # one image pad token lost
    with pytest.raises(ValueError) as e:
        mrope_positions(truncated_ids, batch.attention_mask, batch.image_grid_thw, CFG)
    assert "\n" not in str(e.value) and "image pad tokens" in str(e.value)
