"""The SDK's wire formats: its protobuf messages (`tinker.proto.tinker_public_pb2`, used as-is so the encoding
is the SDK's own) and the JSON forms of the same requests and results.

Requests become the trainer's `Datum`s; results are encoded once, as protobuf for ForwardBackwardOutput and
SampleResponse (the SDK rejects JSON for those), and converted to JSON only for a caller that asks for JSON.
"""

from __future__ import annotations

import base64

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from jtinker.trainer import Datum
from serving.http_limits import parse_json

PROTO = "application/x-protobuf"
JSON = "application/json"

_PB_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}
_JSON_DTYPES = {"float32": np.float32, "int64": np.int64}


class WireError(ValueError):
    """A request the server cannot read: one line, reported as a user error."""


# ------------------------------------------------------------------------------------------------------- inputs


MAX_TENSOR_ELEMENTS = 1 << 27  # one loss input; far beyond any context length


def _dense(values: np.ndarray, shape, crow=None, col=None) -> np.ndarray:
    """A dense array from dense or CSR data, every size and index checked (a WireError, never an IndexError or
    a huge allocation)."""
    shape = [int(n) for n in shape] if shape else None
    if shape is not None and (any(n < 0 for n in shape) or int(np.prod(shape, dtype=object)) > MAX_TENSOR_ELEMENTS):
        raise WireError(f"tensor shape {shape} is negative or over {MAX_TENSOR_ELEMENTS:,} elements")
    if crow is None:
        if shape is not None and int(np.prod(shape)) != values.size:
            raise WireError(f"tensor shape {shape} does not match its {values.size} values")
        return values.reshape(shape) if shape else values
    if not shape or len(shape) != 2:
        raise WireError(f"a sparse tensor needs a 2-D shape, got {shape}")
    crow, col = np.asarray(crow, np.int64), np.asarray(col, np.int64)
    if len(crow) != shape[0] + 1 or len(col) != len(values) or (len(crow) and (crow[0] != 0 or crow[-1] != len(values)
                                                                                 or np.any(np.diff(crow) < 0))):
        raise WireError(f"sparse tensor indices do not fit its shape {shape} and {len(values)} values")
    if len(col) and (col.min() < 0 or col.max() >= shape[1]):
        raise WireError(f"a sparse column index is outside [0, {shape[1]})")
    out = np.zeros(shape, values.dtype)
    rows = np.repeat(np.arange(shape[0]), np.diff(crow))
    out[rows, col] = values
    return out


def _proto_tensor(tensor: pb.Tensor) -> np.ndarray:
    dtype = _PB_DTYPES.get(tensor.dtype)
    if dtype is None:
        raise WireError(f"unsupported tensor dtype {tensor.dtype} (expected float32, int64 or int32)")
    shape = list(tensor.shape)
    if tensor.HasField("sparse_csr"):
        csr = tensor.sparse_csr
        return _dense(np.frombuffer(csr.values, dtype), shape, np.frombuffer(csr.crow_indices, np.int64),
                      np.frombuffer(csr.col_indices, np.int64))
    return _dense(np.frombuffer(tensor.dense, dtype).copy(), shape)


def _json_tensor(value) -> np.ndarray:
    if isinstance(value, list):
        return np.asarray(value)
    if not isinstance(value, dict) or "data" not in value:
        raise WireError("a loss_fn_inputs value must be a TensorData object {data, dtype, shape} or a list")
    dtype = _JSON_DTYPES.get(value.get("dtype", "float32"))
    if dtype is None:
        raise WireError(f"unsupported tensor dtype {value.get('dtype')!r} (expected float32 or int64)")
    return _dense(np.asarray(value["data"], dtype), value.get("shape"), value.get("sparse_crow_indices"),
                  value.get("sparse_col_indices"))


def _proto_tokens(chunks) -> np.ndarray:
    parts = []
    for chunk in chunks:
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise WireError(f"model_input chunk {kind!r} is not supported by this server's text models; send "
                            "encoded_text chunks")
        parts.append(np.frombuffer(chunk.encoded_text.tokens, np.int32))
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0,), np.int64)


def json_tokens(model_input: dict) -> list[int]:
    """A JSON `ModelInput` ({"chunks": [...]}) -> its token ids, chunks concatenated."""
    tokens: list[int] = []
    for chunk in (model_input or {}).get("chunks", []):
        kind = chunk.get("type", "encoded_text")
        if kind != "encoded_text":
            raise WireError(f"model_input chunk {kind!r} is not supported by this server's text models; send "
                            "encoded_text chunks")
        tokens.extend(int(t) for t in chunk.get("tokens", []))
    return tokens


def parse_forward_backward(body: bytes, content_type: str) -> dict:
    """A forward_backward request (protobuf or JSON) -> {model_id, seq_id, data: [Datum], loss_fn,
    loss_fn_config, forward_only}."""
    if PROTO in content_type:
        msg = pb.ForwardBackwardRequest()
        try:
            msg.ParseFromString(body)
        except Exception as error:  # noqa: BLE001
            raise WireError(f"could not parse the ForwardBackwardRequest protobuf: {error}") from error
        config = {k: v.number if v.WhichOneof("value") == "number" else v.text
                  for k, v in msg.loss_fn_config_v2.items()} or dict(msg.loss_fn_config)
        try:
            data = [Datum(_proto_tokens(d.model_input), {k: _proto_tensor(t) for k, t in d.loss_fn_inputs.items()})
                    for d in msg.data]
        except WireError:
            raise
        except Exception as error:  # noqa: BLE001 - e.g. a buffer whose size is not a multiple of its dtype's
            raise WireError(f"malformed ForwardBackwardRequest tensor: {error}") from error
        return dict(model_id=msg.model_id, seq_id=msg.seq_id, data=data, loss_fn=msg.loss_fn,
                    loss_fn_config=config or None, forward_only=msg.forward_only)
    try:
        request = parse_json(body)
        fb = request.get("forward_backward_input") or request.get("forward_input") or {}
        data = [Datum(np.asarray(json_tokens(d["model_input"]), np.int64),
                      {k: _json_tensor(v) for k, v in d.get("loss_fn_inputs", {}).items()}) for d in fb["data"]]
    except WireError:
        raise
    except Exception as error:  # noqa: BLE001
        raise WireError(f"malformed forward_backward JSON: {type(error).__name__}: {error}") from error
    return dict(model_id=request.get("model_id"), seq_id=request.get("seq_id"), data=data, loss_fn=fb.get("loss_fn"),
                loss_fn_config=fb.get("loss_fn_config"), forward_only=bool(request.get("forward_only", False)))


def loss_config_floats(config: dict | None) -> dict | None:
    """The trainer's loss configs are numbers; a text value is a user error."""
    if not config:
        return None
    out = {}
    for key, value in config.items():
        try:
            out[key] = float(value)
        except (TypeError, ValueError) as error:
            raise WireError(f"loss_fn_config[{key!r}] must be a number, got {value!r}"[:200]) from error
        if not np.isfinite(out[key]):
            raise WireError(f"loss_fn_config[{key!r}] must be finite, got {value!r}")
    return out


# ------------------------------------------------------------------------------------------------------ results


def _batched(arrays: list[np.ndarray], dtype) -> pb.BatchedTensor:
    arrays = [np.ascontiguousarray(a, dtype) for a in arrays]
    offsets = np.zeros(len(arrays) + 1, np.int64)
    offsets[1:] = np.cumsum([a.nbytes for a in arrays])
    trailing = list(arrays[0].shape[1:]) if arrays else []
    return pb.BatchedTensor(data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(),
                            dtype=pb.DTYPE_FLOAT32, trailing_shape=trailing)


def forward_backward_output(logprobs: list[np.ndarray], elementwise_loss: list[np.ndarray], metrics: dict) -> bytes:
    """ForwardBackwardOutput protobuf: one ArrayRecord with per-datum `logprobs` and `elementwise_loss`."""
    record = pb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(logprobs))
    record.fields["logprobs"].CopyFrom(_batched(logprobs, np.float32))
    record.fields["elementwise_loss"].CopyFrom(_batched(elementwise_loss, np.float32))
    msg = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record],
                                   metrics={k: float(v) for k, v in metrics.items()})
    return msg.SerializeToString()


def sample_response(samples, prompt_logprobs: list | None) -> bytes:
    """SampleResponse protobuf from `operations.sample`'s output; log-probs are always sent (RL needs them)."""
    msg = pb.SampleResponse()
    for tokens, logprobs, reason in samples:
        msg.sequences.add(stop_reason=pb.STOP_REASON_STOP if reason == "stop" else pb.STOP_REASON_LENGTH,
                          tokens=np.asarray(tokens, np.int32).tobytes(),
                          logprobs=np.asarray(logprobs, np.float32).tobytes())
    if prompt_logprobs is not None:
        msg.prompt_logprobs = np.asarray([np.nan if v is None else v for v in prompt_logprobs], np.float32).tobytes()
    return msg.SerializeToString()


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _finite_list(values: np.ndarray) -> list:
    """JSON has no NaN or infinity: those become null (the protobuf form keeps them)."""
    if np.all(np.isfinite(values)):
        return values.tolist()
    return [_finite(v) for v in values]


def proto_to_json(kind: str, body: bytes) -> dict:
    """A stored protobuf result as the SDK's JSON shape, for callers that do not accept protobuf."""
    if kind in ("forward_backward", "forward"):
        msg = pb.ForwardBackwardOutput()
        msg.ParseFromString(body)
        outputs: list[dict] = []
        for record in msg.loss_fn_outputs:
            for name, bt in record.fields.items():
                offsets = np.frombuffer(bt.offsets, np.int64)
                data = np.frombuffer(bt.data, np.float32)
                for i in range(len(offsets) - 1):
                    while len(outputs) <= i:
                        outputs.append({})
                    values = data[offsets[i] // 4:offsets[i + 1] // 4]
                    shape = [len(values) // max(1, int(np.prod(bt.trailing_shape))), *bt.trailing_shape]
                    outputs[i][name] = {"data": _finite_list(values), "dtype": "float32", "shape": shape}
        return {"loss_fn_output_type": msg.loss_fn_output_type, "loss_fn_outputs": outputs,
                "metrics": {k: _finite(v) for k, v in msg.metrics.items()}}
    msg = pb.SampleResponse()
    msg.ParseFromString(body)
    sequences = [{"stop_reason": "stop" if s.stop_reason == pb.STOP_REASON_STOP else "length",
                  "tokens": np.frombuffer(s.tokens, np.int32).tolist(),
                  "logprobs": _finite_list(np.frombuffer(s.logprobs, np.float32))} for s in msg.sequences]
    prompt = None
    if msg.prompt_logprobs:
        prompt = _finite_list(np.frombuffer(msg.prompt_logprobs, np.float32))
    return {"type": "sample", "sequences": sequences, "prompt_logprobs": prompt}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
