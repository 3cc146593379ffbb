"""The Tinker API's JSON request bodies, as pydantic models: the field names are the SDK's own
(`tinker/types/*_request.py`), and every field is typed and bounded, so a wrong type, a NaN, an infinite or
out-of-range number or an oversized string is a 400 naming the field, before any work starts. The models also
make the OpenAPI document (`/openapi.json`) describe the real bodies. Types are strict (no "7" for 7). Unknown
fields are ignored, as newer SDKs send fields an older server does not know.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, WithJsonSchema

from jtinker import operations
from serving.scheduler import MAX_TEMPERATURE, SEED_RANGE

Id = Annotated[str, StringConstraints(min_length=1, max_length=512)]
Path = Annotated[str, StringConstraints(min_length=1, max_length=4096)]
Name = Annotated[str, StringConstraints(max_length=4096)]
# A checkpoint name, the whole string: one path segment that is not hidden ("trail\n" and "..." are refused).
CheckpointName = Annotated[str, AfterValidator(operations.check_name),
                           WithJsonSchema({"type": "string", "pattern": f"^{operations.NAME.pattern}$"})]
SeqId = Annotated[int, Field(ge=0, lt=1 << 63)]  # 0 or absent: next in the run's order
Seed = Annotated[int, Field(ge=SEED_RANGE[0], lt=SEED_RANGE[1])]
Count = Annotated[int, Field(ge=0, lt=1 << 31)]
TokenId = Annotated[int, Field(ge=0, lt=1 << 31)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Seconds = Annotated[float, Field(allow_inf_nan=False, ge=0, le=100 * 365 * 86400)]
Metadata = dict[str, Any] | None  # size-checked against the server's --max-metadata-kb where it is stored


class Body(BaseModel):
    """Strict: "7" is not an integer and 1.5 not a seed (lax coercion would silently take them)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class CreateSession(Body):
    tags: list[Annotated[str, StringConstraints(max_length=256)]] | None = Field(None, max_length=256)
    user_metadata: Metadata = None
    sdk_version: Name | None = None
    project_id: Name | None = None
    display_name: Name | None = None


class SessionHeartbeat(Body):
    session_id: Id


class LoraConfig(Body):
    rank: int = Field(32, ge=1, le=1 << 16)
    seed: Seed | None = None
    train_attn: bool = True
    train_mlp: bool = True
    train_unembed: bool = True


class OptimizerConfig(Body):
    type: Name = "adamw"


class CreateModel(Body):
    session_id: Id
    model_seq_id: SeqId
    base_model: Path
    user_metadata: Metadata = None
    lora_config: LoraConfig | None = None
    optimizer_config: OptimizerConfig | None = None


class ModelRequest(Body):
    """A request about one training run (get_info, unload_model)."""

    model_id: Id


class RunRequest(ModelRequest):
    """A request on a training run, run in its seq_id order."""

    seq_id: SeqId | None = None


class AdamParams(BaseModel):
    """`tinker.AdamParams`; unknown fields are refused (a misspelt learning rate must not be ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["adam", "adamw"] = "adam"
    learning_rate: Finite = Field(1e-4, ge=0, le=1e3)
    beta1: Finite = Field(0.9, ge=0, lt=1)
    beta2: Finite = Field(0.95, ge=0, lt=1)
    eps: Finite = Field(1e-12, gt=0, le=1)
    weight_decay: Finite = Field(0.0, ge=0, le=1e3)
    grad_clip_norm: Finite = Field(0.0, ge=0)


class OptimStep(RunRequest):
    adam_params: AdamParams | None = None
    optim_params: AdamParams | None = None
    optimizer_params: AdamParams | None = None


class SaveWeights(RunRequest):
    path: CheckpointName | None = None
    ttl_seconds: Seconds | None = None
    overwrite: bool = False
    user_metadata: Metadata = None


class SaveWeightsForSampler(SaveWeights):
    sampling_session_seq_id: SeqId | None = None


class LoadWeights(Body):
    model_id: Id | None = None
    seq_id: SeqId | None = None
    session_id: Id | None = None
    model_seq_id: SeqId | None = None
    base_model: Path | None = None
    user_metadata: Metadata = None
    path: Path
    optimizer: bool = False
    optimizer_config: OptimizerConfig | None = None


class CreateSamplingSession(Body):
    session_id: Id
    sampling_session_seq_id: SeqId
    base_model: Path | None = None
    model_path: Path | None = None


class Chunk(Body):
    """A ModelInput chunk; only `encoded_text` is served by the text models (others get a clear 400)."""

    type: Name = "encoded_text"
    tokens: list[TokenId] = Field(default_factory=list)


class ModelInput(Body):
    chunks: list[Chunk] = Field(default_factory=list)


class SamplingParams(Body):
    max_tokens: Count | None = None
    temperature: Finite = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_k: int = Field(-1, ge=-(1 << 31), lt=1 << 31)
    top_p: Finite = Field(1.0, gt=0, le=1)
    seed: Seed | None = None
    stop: Annotated[str, StringConstraints(max_length=4096)] | list[Annotated[str, StringConstraints(
        max_length=4096)]] | list[TokenId] | None = None


class Sample(Body):
    sampling_session_id: Id | None = None
    seq_id: SeqId | None = None
    num_samples: int = Field(1, ge=1, le=1 << 16)
    prompt: ModelInput
    sampling_params: SamplingParams = Field(default_factory=SamplingParams)
    base_model: Path | None = None
    model_path: Path | None = None
    prompt_logprobs: bool | None = None
    topk_prompt_logprobs: Count = 0
    topk_sample_logprobs: Count = 0
    prompt_alt_tokens_k: Count = 0
    target_prompt_logprobs: Any = None
    prompt_logprobs_last_n: Count | None = None


class RetrieveFuture(Body):
    request_id: Id
    allow_metadata_only: bool = False


class SetTtl(Body):
    ttl_seconds: Seconds | None = None


class WeightsInfo(Body):
    tinker_path: Path


class TensorData(Body):
    data: list[float] | list[int]
    dtype: Literal["float32", "int64"] = "float32"
    shape: list[Annotated[int, Field(ge=0, lt=1 << 31)]] | None = None
    sparse_crow_indices: list[Count] | None = None
    sparse_col_indices: list[Count] | None = None


class Datum(Body):
    model_input: ModelInput
    loss_fn_inputs: dict[Annotated[str, StringConstraints(max_length=64)], TensorData | list[Finite]] = Field(
        default_factory=dict)


class ForwardBackwardInput(Body):
    data: list[Datum]
    loss_fn: Name = "cross_entropy"
    loss_fn_config: dict[Annotated[str, StringConstraints(max_length=64)], Finite] | None = None


class ForwardBackward(RunRequest):
    """The JSON form of forward_backward / forward (the SDK itself sends the protobuf form)."""

    forward_backward_input: ForwardBackwardInput | None = None
    forward_input: ForwardBackwardInput | None = None
    forward_only: bool = False
