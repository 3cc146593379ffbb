"""`jtinker bench sample --vs torch`: greedy sampling through jtinker's engine and scheduler against
transformers' batched `generate`, same weights, same prompts, same process.

Both sides load the same randomly initialised Hugging Face checkpoint of the preset in fp32 and generate exactly
`NEW_TOKENS` tokens per prompt (no stop tokens). Two scenarios:
- `concurrent`: `CONCURRENT` requests of `PROMPT_LEN` random tokens submitted at once (jtinker: one decode slot
  each, continuous batching; transformers: one batched `generate`), as in reference/cpu-performance.md;
- `single`: one request at a time (latency-bound serving), on `tiny-qwen3-moe` by default.
The figure is new tokens per second over the median of the timed repetitions after a warm-up run (which, for
jtinker, compiles). `--preset` picks the model of the concurrent scenario and skips the single one.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from jtinker.bench_common import timed

CONCURRENT, PROMPT_LEN, NEW_TOKENS = 32, 32, 64
SINGLE_PRESET, SINGLE_REQUESTS = "tiny-qwen3-moe", 4


def _prompts(vocab_size: int, count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab_size, (count, PROMPT_LEN)).astype(np.int64)


def bench_jtinker(hf_dir: Path, prompts: np.ndarray, *, one_at_a_time: bool, steps: int) -> dict:
    from models.hf_loading import load_hf_model
    from serving.engine import Engine
    from serving.scheduler import Request, SamplingParams, Scheduler

    model = load_hf_model(hf_dir, dtype="float32")
    slots = 1 if one_at_a_time else len(prompts)
    engine = Engine(model, num_slots=slots, max_len=128, max_prefill_batch=slots, num_top_logprobs=0)
    scheduler = Scheduler(engine, chunk=NEW_TOKENS)
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0)

    def run():
        if one_at_a_time:
            outputs = []
            for p in prompts:
                future = scheduler.submit(Request(p.tolist(), params))
                scheduler.run_until_idle()
                outputs.append(future.result().samples[0].tokens)
            return outputs
        futures = [scheduler.submit(Request(p.tolist(), params)) for p in prompts]
        scheduler.run_until_idle()
        return [f.result().samples[0].tokens for f in futures]

    timing, outputs = timed(run, steps, label="run")
    return {**timing, "compiles": dict(engine.compiles), "outputs": outputs}


def bench_torch(hf_dir: Path, prompts: np.ndarray, *, one_at_a_time: bool, steps: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0,
              "eos_token_id": None}

    def generate(ids):
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        return out[:, ids.shape[1]:].tolist()

    def run():
        if one_at_a_time:
            return [generate(torch.from_numpy(p[None]))[0] for p in prompts]
        return generate(torch.from_numpy(prompts))

    timing, outputs = timed(run, steps, label="run")
    return {**timing, "torch_threads": torch.get_num_threads(), "outputs": outputs}


def _scenario(name: str, preset: str, count: int, one_at_a_time: bool, vs: str | None, steps: int) -> dict:
    from configs import load_preset
    from jtinker.compare_torch import save_random_hf_checkpoint

    spec = load_preset(preset)
    prompts = _prompts(spec["hf_config"]["vocab_size"], count)
    tokens = count * NEW_TOKENS
    result: dict = {"preset": preset, "requests": count, "prompt_len": PROMPT_LEN, "new_tokens": NEW_TOKENS,
                    "one_at_a_time": one_at_a_time}
    print(f"bench sample [{name}]: {preset}, {count} requests of {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens each "
          f"(greedy, fp32){', one at a time' if one_at_a_time else ', all at once'}; 1 warm-up + {steps} timed runs",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = save_random_hf_checkpoint(spec["hf_config"], Path(tmp) / preset)
        if vs == "torch":  # transformers first, so nothing of JAX's runtime is around while it runs
            t = bench_torch(hf_dir, prompts, one_at_a_time=one_at_a_time, steps=steps)
            theirs = t.pop("outputs")
        j = bench_jtinker(hf_dir, prompts, one_at_a_time=one_at_a_time, steps=steps)
        ours = j.pop("outputs")
        result["jtinker"] = {**j, "tokens_per_s": tokens / j["run_s_median"], "unit": "tokens/s"}
        if vs == "torch":
            result["baseline"] = {**t, "name": "transformers generate", "tokens_per_s": tokens / t["run_s_median"],
                                  "unit": "tokens/s"}
            result["ratio"] = result["jtinker"]["tokens_per_s"] / result["baseline"]["tokens_per_s"]
            # fp32 greedy on both sides: the same tokens until a near-tie flips one (then the rest diverges)
            result["identical_sequences"] = sum(a == b for a, b in zip(ours, theirs)) / count
    return result


def run_bench(args) -> dict:
    steps = args.steps or 3
    scenarios = {"concurrent": _scenario("concurrent", args.preset or "small-qwen3-moe", CONCURRENT, False,
                                         args.vs, steps)}
    if args.preset is None:
        scenarios["single"] = _scenario("single", SINGLE_PRESET, SINGLE_REQUESTS, True, args.vs, steps)
    main = scenarios["concurrent"]
    result = {"benchmark": "sample", "preset": main["preset"], "jtinker": main["jtinker"], "cpu_count": os.cpu_count(),
              "scenarios": scenarios}
    if "baseline" in main:
        result["baseline"], result["ratio"] = main["baseline"], main["ratio"]
    _print_table(scenarios)
    return result


def _print_table(scenarios: dict) -> None:
    print(f"{'scenario':11s} {'preset':18s} {'':22s} {'tokens/s':>9s} {'run s (min/med/max)':>23s} {'first s':>8s}")
    for name, s in scenarios.items():
        rows = [("jtinker engine", s["jtinker"])] + ([(s["baseline"]["name"], s["baseline"])] if "baseline" in s
                                                     else [])
        for label, r in rows:
            print(f"{name:11s} {s['preset']:18s} {label:22s} {r['tokens_per_s']:9.0f} {r['run_s_min']:7.3f} /"
                  f"{r['run_s_median']:6.3f} /{r['run_s_max']:6.3f} {r['first_run_s']:8.2f}")
        if "ratio" in s:
            print(f"{'':11s} {'':18s} ratio jtinker / transformers: {s['ratio']:.2f}x; identical greedy sequences: "
                  f"{s['identical_sequences']:.0%}; jtinker compiles: {s['jtinker']['compiles']}")
