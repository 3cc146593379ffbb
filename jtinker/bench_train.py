"""`jtinker bench train --vs torch`: one LoRA training step, jtinker against transformers + PEFT, same process.

Both sides load the same randomly initialised Hugging Face checkpoint of the preset, train a rank-16 (alpha 32)
LoRA on the same targets (q/k/v/o by default, as in reference/cpu-performance.md) with AdamW on the LoRA
parameters only, and take the summed token cross-entropy (Tinker's semantics) of the same batch. A step is
forward + backward + optimizer update; the figure is the median of the timed steps after warm-up, in trained
tokens per second. `--targets all` adds LoRA on the MLP/experts and the unembedding on the jtinker side only
(PEFT cannot express per-expert LoRA on fused expert weights), reported as an extra row, not in the ratio.

For Qwen3-MoE presets it also measures the step's matmul floor: every matmul against a frozen weight (forward and
the backward's input gradient), timed alone through XLA at its exact shape. No implementation that computes the
step with XLA's dots runs faster than their sum, so `baseline step / floor` bounds the reachable ratio.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from jtinker.bench_common import timed

BATCH, SEQ_LEN, RANK, ALPHA, LEARNING_RATE = 8, 256, 16, 32, 1e-4
ATTENTION_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _batch(vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab_size, (BATCH, SEQ_LEN + 1)).astype(np.int32)
    return tokens[:, :-1], tokens[:, 1:]


def bench_jtinker(hf_dir: Path, inputs, targets, *, all_targets: bool, warmup: int, steps: int) -> dict:
    from jtinker.optim import AdamParams
    from jtinker.trainer import Datum, Trainer
    from models.hf_loading import load_hf_model
    from models.lora import LoraConfig, init_adapter_slot

    lora = LoraConfig(num_slots=2, max_rank=RANK, attn=True, mlp=all_targets, unembed=all_targets)
    model = load_hf_model(hf_dir, lora=lora)
    init_adapter_slot(model, 1, rank=RANK, alpha=ALPHA, seed=0)
    trainer = Trainer(model)
    data = [Datum(tokens=inputs[b], loss_fn_inputs={"target_tokens": targets[b],
                                                    "weights": np.ones(SEQ_LEN, np.float32)})
            for b in range(len(inputs))]
    adam = AdamParams(learning_rate=LEARNING_RATE)
    losses = []

    def step():
        losses.append(trainer.forward_backward(data, [1] * len(data), "cross_entropy").loss)
        trainer.optim_step(1, adam)  # returns host floats: the step has finished

    timing, _ = timed(step, steps, warmup=warmup)
    return {**timing, "loss_first": losses[0] / inputs.size, "loss_last": losses[-1] / inputs.size}


def bench_torch(hf_dir: Path, inputs, targets, *, warmup: int, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=ATTENTION_TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE,
                                  weight_decay=0.0)
    ids, labels = torch.from_numpy(inputs).long(), torch.from_numpy(targets).long()
    losses = []

    def step():
        logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                                 reduction="sum")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))

    timing, _ = timed(step, steps, warmup=warmup)
    return {**timing, "loss_first": losses[0] / inputs.size, "loss_last": losses[-1] / inputs.size,
            "torch_threads": torch.get_num_threads()}


def _frozen_matmuls(config: dict, tokens: int, seq_len: int) -> list[tuple[str, int, tuple, tuple]] | None:
    """(name, count, lhs shape, rhs shape) of the step's matmuls against frozen weights, forward and backward
    (dx = dy·Wᵀ), for a Qwen3-MoE config; None for other families. LoRA's rank-r matmuls are left out (small),
    so this is a floor, not an estimate. Attention's score and value matmuls skip the keys after each of the
    4 causal query blocks (as `dot_product_attention` does): 10/16 of the full products, taken as that fraction
    of the full-size matmuls' time."""
    if config.get("model_type") != "qwen3_moe" or config.get("mlp_only_layers") or config.get(
            "decoder_sparse_step", 1) != 1:
        return None
    D, V, L = config["hidden_size"], config["vocab_size"], config["num_hidden_layers"]
    H, G = config["num_attention_heads"], config["num_key_value_heads"]
    K = config.get("head_dim") or D // H
    E, top_k, F = config["num_experts"], config["num_experts_per_tok"], config["moe_intermediate_size"]
    rows = tokens * top_k // E  # per expert, balanced
    dots = []
    for name, width_in, width_out in (("q_proj", D, H * K), ("k_proj", D, G * K), ("v_proj", D, G * K),
                                      ("o_proj", H * K, D), ("router", D, E)):
        dots += [(name, L, (tokens, width_in), (width_in, width_out)),
                 (name + " dx", L, (tokens, width_out), (width_out, width_in))]
    dots += [("experts gate+up", 2 * L, (E, rows, D), (E, D, F)), ("experts gate+up dx", 2 * L, (E, rows, F), (E, F, D)),
             ("experts down", L, (E, rows, F), (E, F, D)), ("experts down dx", L, (E, rows, D), (E, D, F)),
             ("lm_head", 1, (tokens, D), (D, V)), ("lm_head dx", 1, (tokens, V), (V, D))]
    heads = tokens // seq_len * H  # scores: [T, K] x [K, S]; values: [T, S] x [S, K]; backward: two of each
    dots += [("attention scores (10/16)", 3 * L, (heads, seq_len, K), (heads, K, seq_len)),
             ("attention values (10/16)", 3 * L, (heads, seq_len, seq_len), (heads, seq_len, K))]
    return dots


def matmul_floor(config: dict, tokens: int, seq_len: int, repeats: int = 5) -> dict | None:
    """Sum of the minimum times of `_frozen_matmuls` through XLA on this machine (see the module doc)."""
    import jax
    import jax.numpy as jnp

    dots = _frozen_matmuls(config, tokens, seq_len)
    if dots is None:
        return None
    total, parts = 0.0, {}
    matmul = jax.jit(jnp.matmul)
    for name, count, lhs, rhs in dots:
        a = jnp.asarray(np.random.default_rng(0).standard_normal(lhs, np.float32))
        b = jnp.asarray(np.random.default_rng(1).standard_normal(rhs, np.float32))
        timing, _ = timed(lambda a=a, b=b: matmul(a, b).block_until_ready(), repeats, warmup=1)
        seconds = timing["step_s_min"] * count * (10 / 16 if name.startswith("attention") else 1)
        parts[name] = seconds
        total += seconds
    return {"matmul_floor_s": total, "parts_s": parts}


def run_bench(args) -> dict:
    import os

    from configs import load_preset
    from jtinker.compare_torch import save_random_hf_checkpoint

    preset = args.preset or "small-qwen3-moe"
    steps = args.steps or 5
    warmup = 2
    all_targets = getattr(args, "targets", "attn") == "all"
    spec = load_preset(preset)
    tokens = BATCH * SEQ_LEN
    inputs, targets = _batch(spec["hf_config"]["vocab_size"])
    result: dict = {"benchmark": "train", "preset": preset, "batch": BATCH, "seq_len": SEQ_LEN, "lora_rank": RANK,
                    "lora_targets": ATTENTION_TARGETS, "steps": steps, "cpu_count": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_random_hf_checkpoint(spec["hf_config"], Path(tmp) / preset)
        print(f"bench train: {preset}, batch {BATCH} x {SEQ_LEN} tokens, LoRA r{RANK} on {'/'.join(ATTENTION_TARGETS)}, "
              f"AdamW on LoRA only; {warmup} warm-up + {steps} timed steps each", flush=True)
        j = bench_jtinker(hf_dir, inputs, targets, all_targets=False, warmup=warmup, steps=steps)
        result["jtinker"] = {**j, "tokens_per_s": tokens / j["step_s_median"], "unit": "tokens/s"}
        if args.vs == "torch":
            t = bench_torch(hf_dir, inputs, targets, warmup=warmup, steps=steps)
            result["baseline"] = {**t, "name": "transformers + PEFT", "tokens_per_s": tokens / t["step_s_median"],
                                  "unit": "tokens/s"}
            result["ratio"] = result["jtinker"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
            result["first_loss_diff"] = abs(j["loss_first"] - t["loss_first"])
        floor = matmul_floor(spec["hf_config"], tokens, SEQ_LEN)
        if floor is not None:
            result["matmul_floor"] = floor
            if "baseline" in result:
                result["ratio_ceiling"] = result["baseline"]["step_s_median"] / floor["matmul_floor_s"]
        if all_targets:
            a = bench_jtinker(hf_dir, inputs, targets, all_targets=True, warmup=warmup, steps=steps)
            result["jtinker_all_targets"] = {**a, "tokens_per_s": tokens / a["step_s_median"], "unit": "tokens/s"}
    _print_table(result)
    return result


def _print_table(result: dict) -> None:
    rows = [("jtinker", result["jtinker"])]
    if "baseline" in result:
        rows.append((result["baseline"]["name"], result["baseline"]))
    if "jtinker_all_targets" in result:
        rows.append(("jtinker, LoRA on every target", result["jtinker_all_targets"]))
    print(f"{'':32s} {'tokens/s':>9s} {'step s (min/med/max)':>24s} {'first step s':>13s} {'loss/token':>11s}")
    for name, r in rows:
        print(f"{name:32s} {r['tokens_per_s']:9.0f} {r['step_s_min']:7.3f} /{r['step_s_median']:6.3f} /"
              f"{r['step_s_max']:6.3f} {r['first_step_s']:13.2f} {r['loss_first']:11.4f}")
    if "ratio" in result:
        print(f"ratio jtinker / {result['baseline']['name']}: {result['ratio']:.2f}x "
              f"(first-step loss per token differs by {result['first_loss_diff']:.2e})")
    if "matmul_floor" in result:
        line = (f"matmul floor (the step's frozen-weight matmuls alone, each at XLA's rate for its shape): "
                f"{result['matmul_floor']['matmul_floor_s']:.3f} s")
        if "ratio_ceiling" in result:
            line += f"; with nothing else in the step, the ratio would be {result['ratio_ceiling']:.2f}x"
        print(line)
