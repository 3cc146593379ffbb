"""The same inputs through transformers (PyTorch, CPU) and through jtinker, compared.

Used by `jtinker compare-torch`, by `jtinker quickstart` and by the parity tests, so the tests check exactly
what users run. fp32 passes when the max abs logit difference is within `tolerance`; bf16 passes when
jtinker-bf16's deviation from the fp32 transformers reference is at most twice transformers-bf16's own, both
in mean and in maximum over the tokens whose expert choice neither bf16 run flipped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

FP32_TOLERANCE = 1e-4
BF16_RATIO = 2.0


@dataclasses.dataclass
class Inputs:
    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] 1 = token, 0 = padding
    positions: np.ndarray  # [B, T]


def make_inputs(vocab_size: int, *, batch: int = 3, seq_len: int = 16, seed: int = 0, padding: str = "right") -> Inputs:
    """Deterministic random token ids; every row but the first is padded (left or right) to a shorter length."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq_len), dtype=np.int64)
    lengths = [seq_len] + [max(1, seq_len - 2 - 3 * i) for i in range(batch - 1)]
    mask = np.zeros((batch, seq_len), np.int64)
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, :n] = 1
        else:
            mask[b, seq_len - n:] = 1
    ids = np.where(mask == 1, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return Inputs(ids, mask, positions)


def torch_forward(model_dir: str | Path, dtype: str, inputs: Inputs):
    """transformers' logits [B, T, V] (float64) and top-k experts per MoE layer [L_moe, N, k] (sorted)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)
    model.set_attn_implementation("eager")
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    model.eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(inputs.input_ids), attention_mask=torch.from_numpy(inputs.attention_mask),
                    position_ids=torch.from_numpy(inputs.positions), output_router_logits=True)
    logits = out.logits.to(torch.float64).numpy()
    k = model.config.num_experts_per_tok
    routed = [np.sort(torch.topk(r.float(), k, dim=-1).indices.numpy(), axis=-1) for r in (out.router_logits or ())]
    return logits, (np.stack(routed) if routed else None)


def jtinker_forward(model_dir: str | Path, dtype: str, inputs: Inputs, moe_impl: str = "auto"):
    """jtinker's logits [B, T, V] (float64) and routed experts [L_moe, N, k] (sorted)."""
    from models.hf_loading import load_hf_model

    model = load_hf_model(model_dir, dtype=dtype, moe_impl=moe_impl)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask, positions):
        m = nnx.merge(graphdef, state)
        h, routed = m.hidden_states(ids, attention_mask_BT=mask, positions_BT=positions)
        return m.logits(h).astype(jnp.float32), routed

    with jax.default_matmul_precision("highest"):
        logits, routed = forward(state, jnp.asarray(inputs.input_ids, jnp.int32),
                                 jnp.asarray(inputs.attention_mask, jnp.int32),
                                 jnp.asarray(inputs.positions, jnp.int32))
    routed = None if routed is None else np.sort(np.asarray(routed), axis=-1)
    return np.asarray(logits, np.float64), routed


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def logit_metrics(reference, candidate, valid) -> dict:
    ref, cand = reference[valid], candidate[valid]
    diff = np.abs(ref - cand)
    log_p, log_q = _log_softmax(ref), _log_softmax(cand)
    kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()), "kl": kl,
            "top1_agreement": float(np.mean(ref.argmax(-1) == cand.argmax(-1)))}


def router_agreement(reference, candidate, valid) -> float | None:
    if reference is None or candidate is None:
        return None
    flat_valid = valid.reshape(-1)
    same = np.all(reference[:, flat_valid] == candidate[:, flat_valid], axis=-1)
    return float(np.mean(same))


def routing_flipped(reference, candidate, shape) -> np.ndarray:
    """[B, T] true where any MoE layer chose a different top-k set than the reference."""
    if reference is None or candidate is None:
        return np.zeros(shape, bool)
    return np.any(reference != candidate, axis=(0, 2)).reshape(shape)


def compare(model_dir: str | Path, *, dtype: str = "float32", batch: int = 3, seq_len: int = 16, seed: int = 0,
            padding: str = "right", tolerance: float = FP32_TOLERANCE, moe_impl: str = "auto") -> dict:
    from models.config import load_config

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    start = time.perf_counter()
    cfg = load_config(model_dir)
    inputs = make_inputs(cfg.vocab_size, batch=batch, seq_len=seq_len, seed=seed, padding=padding)
    valid = inputs.attention_mask.astype(bool)
    ref_logits, ref_routed = torch_forward(model_dir, "float32", inputs)
    ours_logits, ours_routed = jtinker_forward(model_dir, dtype, inputs, moe_impl)
    result = {**logit_metrics(ref_logits, ours_logits, valid),
              "router_agreement": router_agreement(ref_routed, ours_routed, valid),
              "dtype": dtype, "mesh": None, "tokens": int(valid.sum())}
    if dtype == "float32":
        result["tolerance"] = tolerance
        result["passed"] = result["max_abs_logit_diff"] <= tolerance
    else:
        torch_bf16_logits, torch_bf16_routed = torch_forward(model_dir, "bfloat16", inputs)
        baseline = logit_metrics(ref_logits, torch_bf16_logits, valid)
        # A router near-tie can flip a token's top-k in bf16 (in either implementation); such a token's logits
        # jump discontinuously, so the maximum is compared on tokens whose routing both kept.
        stable = valid & ~routing_flipped(ref_routed, ours_routed, valid.shape) \
            & ~routing_flipped(ref_routed, torch_bf16_routed, valid.shape)
        ours_stable = logit_metrics(ref_logits, ours_logits, stable)
        torch_stable = logit_metrics(ref_logits, torch_bf16_logits, stable)
        result.update({
            "torch_bf16_max_abs_logit_diff": baseline["max_abs_logit_diff"],
            "torch_bf16_mean_abs_logit_diff": baseline["mean_abs_logit_diff"],
            "torch_bf16_router_agreement": router_agreement(ref_routed, torch_bf16_routed, valid),
            "routing_stable_tokens": int(stable.sum()),
            "stable_max_abs_logit_diff": ours_stable["max_abs_logit_diff"],
            "torch_bf16_stable_max_abs_logit_diff": torch_stable["max_abs_logit_diff"],
            "tolerance": BF16_RATIO * torch_stable["max_abs_logit_diff"],
        })
        result["passed"] = (ours_stable["max_abs_logit_diff"] <= result["tolerance"]
                            and result["mean_abs_logit_diff"] <= BF16_RATIO * baseline["mean_abs_logit_diff"])
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def format_report(result: dict) -> str:
    rows = [("max |logit diff|", result["max_abs_logit_diff"]), ("mean |logit diff|", result["mean_abs_logit_diff"]),
            ("KL(torch || jtinker)", result["kl"]), ("top-1 agreement", result["top1_agreement"]),
            ("router top-k agreement", result["router_agreement"])]
    if result["dtype"] == "bfloat16":
        rows += [("torch bf16 max |diff| vs fp32", result["torch_bf16_max_abs_logit_diff"]),
                 ("torch bf16 mean |diff| vs fp32", result["torch_bf16_mean_abs_logit_diff"]),
                 ("routing-stable tokens", result["routing_stable_tokens"]),
                 ("max |diff| on those: jtinker", result["stable_max_abs_logit_diff"]),
                 ("max |diff| on those: torch bf16", result["torch_bf16_stable_max_abs_logit_diff"])]
    lines = [f"jtinker vs transformers ({result['dtype']}, {result['tokens']} tokens, fp32 transformers reference)"]
    lines += [f"  {name:<32} {value:.3g}" if isinstance(value, float) else f"  {name:<32} {value}"
              for name, value in rows]
    verdict = "PASS" if result["passed"] else "FAIL"
    measured = result.get("stable_max_abs_logit_diff", result["max_abs_logit_diff"])
    lines.append(f"  {verdict}: max |logit diff| {measured:.3g} vs tolerance {result['tolerance']:.3g}")
    return "\n".join(lines)
