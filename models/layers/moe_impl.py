"""How routed experts multiply, decided once when the model is built.

`MoeImpl` names every implementation: a grouped matmul of `models.layers.grouped_matmul` under the reference
LoRA composition ("loop", "ragged", "dense", "blocked"), or a fused LoRA-on-MoE kernel of
`models.kernels.lora_moe` ("triton", "mosaic_tpu"). The model records its choice in its config
(`config.moe_impl`), which `jtinker model-info` prints. Requests may also say "auto" (the fastest that takes this
model's shapes on this platform), "pallas" (this platform's kernel; on CPU the TPU kernel, interpreted) or
"reference" (the composition on the platform's grouped matmul). No environment variable and no probe is
consulted: the same request on the same platform and shapes always builds the same program.
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp

from models.kernels.lora_moe import unsupported_reason
from models.layers.quantized import ExpertQuant
from models.lora import LoraConfig


class MoeImpl(str, enum.Enum):
    LOOP = "loop"
    RAGGED = "ragged"
    DENSE = "dense"
    BLOCKED = "blocked"
    TRITON = "triton"
    MOSAIC_TPU = "mosaic_tpu"

    def __str__(self) -> str:
        return self.value

    @property
    def kernel(self) -> str:
        """The `lora_gmm(impl=...)` of LoRA projections: the kernel, or "reference"."""
        return self.value if self in (MoeImpl.TRITON, MoeImpl.MOSAIC_TPU) else "reference"


REQUESTS = ("auto", "pallas", "reference") + tuple(m.value for m in MoeImpl)


def platform_gmm(quantized: bool, backend: str) -> MoeImpl:
    """The grouped matmul a platform runs best: the loop on CPU and for quantized weights (it dequantizes one
    expert at a time), `ragged_dot` on accelerators."""
    return MoeImpl.LOOP if quantized or backend == "cpu" else MoeImpl.RAGGED


def platform_kernel(backend: str) -> MoeImpl:
    """The kernel of a platform; on CPU the TPU kernel, which runs under TPU interpret mode."""
    return MoeImpl.TRITON if backend == "gpu" else MoeImpl.MOSAIC_TPU


def resolve_moe_impl(requested: str | MoeImpl, *, num_experts: int, hidden_size: int, expert_size: int, dtype,
                     quant: ExpertQuant | None, lora: LoraConfig | None, backend: str | None = None,
                     device_count: int | None = None) -> MoeImpl:
    """The implementation a model of these shapes runs. "auto" takes the platform's kernel on a single-device
    GPU or TPU when the model has expert LoRA and the kernel tiles all three projections (a `pallas_call`
    cannot be partitioned by XLA across devices), else the platform's grouped matmul; on CPU always the loop
    (interpret mode is for tests). An explicit kernel that cannot take the shapes is a ValueError saying why.
    A model without expert LoRA never calls a kernel (its experts are plain grouped matmuls)."""
    value = requested.value if isinstance(requested, MoeImpl) else str(requested).strip().lower()
    if value not in REQUESTS:
        raise ValueError(f"unknown MoE implementation {requested!r}; expected one of {', '.join(REQUESTS)}")
    backend = backend or jax.default_backend()
    device_count = jax.device_count() if device_count is None else device_count
    expert_lora = lora is not None and lora.mlp
    shapes = (num_experts, hidden_size, expert_size, lora.num_slots if expert_lora else None,
              lora.max_rank if expert_lora else None, dtype, quant)
    if value == "reference":
        return platform_gmm(quant is not None, backend)
    if value not in ("auto", "pallas"):
        impl = MoeImpl(value)
        if impl.kernel != "reference":
            _check_kernel(impl, *shapes)
        return impl
    kernel = platform_kernel(backend)
    if value == "pallas":
        _check_kernel(kernel, *shapes)
        return kernel
    if backend == "cpu" or device_count != 1 or not expert_lora or _kernel_refusal(kernel, *shapes) is not None:
        return platform_gmm(quant is not None, backend)
    return kernel


def _check_kernel(kernel: MoeImpl, *shapes):
    reason = None if shapes[3] is None else _kernel_refusal(kernel, *shapes)  # no expert LoRA: no kernel call
    if reason is not None:
        raise ValueError(f"MoE implementation {kernel.value!r} cannot run this model's experts: {reason}")


def _kernel_refusal(kernel: MoeImpl, E: int, D: int, F: int, X: int, R: int, dtype, quant) -> str | None:
    """Why the kernel cannot take the gate/up ([E, D, F]) or down ([E, F, D]) projection, from shapes alone."""
    dtype = jnp.dtype(dtype)
    for din, dout in ((D, F), (F, D)):
        x = jax.ShapeDtypeStruct((1, din), dtype)
        if quant is None:
            w = jax.ShapeDtypeStruct((E, din, dout), dtype)
        else:
            values, scale = jax.eval_shape(lambda: quant.init(jax.random.key(0), (E, din, dout), dtype, 0.02))
            w = quant.weight(values, scale)
        a = jax.ShapeDtypeStruct((E * X, din, R), dtype)
        b = jax.ShapeDtypeStruct((E * X, R, dout), dtype)
        reason = unsupported_reason(x, w, a, b, kernel.value)
        if reason is not None:
            return reason
    return None
