"""`jtinker quickstart`: the main job on the embedded tiny default.

Today: build the tiny preset with multi-adapter LoRA, run a chat prompt through it for the base model and a
fresh adapter, check it against the PyTorch (transformers) baseline in fp32 and bf16, and fine-tune an adapter
on built-in arithmetic conversations (supervised warm-up). RL and serving join as those capabilities land.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def _step(i: int, n: int, text: str) -> None:
    print(f"[{i}/{n}] {text}", flush=True)


def save_random_hf_checkpoint(hf_config: dict, out_dir: Path, seed: int = 0, **save_kwargs) -> Path:
    """A transformers model of this config, randomly initialised with `seed`, written by `save_pretrained`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir


def _supervised_warmup(model, tokenizer, steps: int) -> dict:
    from tqdm import tqdm

    from jtinker.optim import AdamParams
    from jtinker.sft import builtin_arithmetic, conversation_datum
    from jtinker.trainer import Trainer

    trainer = Trainer(model)
    data = [conversation_datum(tokenizer, c) for c in builtin_arithmetic(16)]
    tokens = sum(float(d.loss_fn_inputs["weights"].sum()) for d in data)
    losses = []
    with tqdm(range(steps), desc="      sft", unit="step", leave=False) as bar:
        for _ in bar:
            out = trainer.forward_backward(data, [1] * len(data), "cross_entropy")
            trainer.optim_step(1, AdamParams(learning_rate=1e-2, grad_clip_norm=1.0))
            losses.append(out.loss / tokens)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    print(f"      loss per trained token {losses[0]:.3f} -> {losses[-1]:.3f} in {steps} steps "
          f"({len(data)} conversations, {int(tokens)} trained tokens per step)")
    return {"sft_loss_start": round(losses[0], 4), "sft_loss_end": round(losses[-1], 4), "sft_steps": steps}


def run_quickstart(out_dir: str = "jtinker-quickstart", preset: str = "tiny-qwen3-moe", sft_steps: int = 40) -> dict:
    from configs import load_preset
    from models.config import config_from_hf_dict
    from models.hf_loading import load_hf_model
    from models.lora import LoraConfig, LoRAParam, init_adapter_slot
    from models.tokenizer import load_tokenizer

    start = time.perf_counter()
    total = 4
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = load_preset(preset)
    cfg = config_from_hf_dict(spec["hf_config"], source=f"preset {preset}")

    _step(1, total, f"building preset {preset} ({spec['description']})")
    try:
        import torch  # noqa: F401
        has_torch = True
    except ImportError:
        has_torch = False
    hf_dir = out / f"hf-{preset}"
    if has_torch:
        save_random_hf_checkpoint(spec["hf_config"], hf_dir)
        model = load_hf_model(hf_dir, lora=LoraConfig(num_slots=4, max_rank=8))
    else:
        from models.registry import create_model

        model = create_model(cfg, lora=LoraConfig(num_slots=4, max_rank=8))
    init_adapter_slot(model, 1, rank=8, alpha=16, seed=0)
    base = nnx.state(model, nnx.All(nnx.Param, nnx.Not(LoRAParam)))
    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(base))
    print(f"      {params:,} parameters, {cfg.num_hidden_layers} layers, {cfg.num_experts} experts "
          f"(top-{cfg.num_experts_per_tok}), LoRA slots 1-3 of rank <= 8")

    _step(2, total, "running a chat prompt through the base model (slot 0) and a fresh adapter (slot 1)")
    tokenizer = load_tokenizer(spec["tokenizer"])
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = jnp.asarray([tokenizer.encode(prompt)] * 2, jnp.int32)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, slots: nnx.merge(graphdef, state)(ids, adapter_ids_B=slots))
    t0 = time.perf_counter()
    logits = forward(state, ids, jnp.asarray([0, 1])).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = forward(state, ids, jnp.asarray([0, 1])).block_until_ready()
    run_s = time.perf_counter() - t0
    same = bool(jnp.all(logits[0] == logits[1]))
    print(f"      {ids.shape[1]} prompt tokens; compile {compile_s:.2f} s, forward {run_s * 1e3:.1f} ms; "
          f"fresh adapter reproduces the base exactly: {same}")
    result = {"preset": preset, "parameters": params, "prompt_tokens": int(ids.shape[1]),
              "forward_ms": round(run_s * 1e3, 2), "fresh_adapter_is_noop": same}

    _step(3, total, "agreement with the PyTorch baseline (transformers, same weights, same inputs)")
    if has_torch:
        from jtinker.compare_torch import compare, format_report

        for dtype in ("float32", "bfloat16"):
            report = compare(hf_dir, dtype=dtype)
            print("      " + format_report(report).replace("\n", "\n      "))
            result[f"compare_{dtype}"] = {k: report[k] for k in (
                "max_abs_logit_diff", "mean_abs_logit_diff", "kl", "top1_agreement", "router_agreement", "passed")}
        result["passed"] = same and all(result[f"compare_{d}"]["passed"] for d in ("float32", "bfloat16"))
    else:
        print("      skipped: PyTorch is not installed (pip install -e '.[torch]')")
        result["passed"] = same

    _step(4, total, "supervised warm-up: LoRA on built-in arithmetic conversations (slot 1)")
    result.update(_supervised_warmup(model, tokenizer, steps=sft_steps))
    result["passed"] = result["passed"] and result["sft_loss_end"] < 0.5 * result["sft_loss_start"]
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(f"done in {result['seconds']:.1f} s: {'all checks passed' if result['passed'] else 'CHECKS FAILED'}")
    return result
