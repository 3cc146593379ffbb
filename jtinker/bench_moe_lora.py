"""`jtinker bench moe-lora [--shapes qwen3-30b-a3b|kimi-k2] [--vs ragged|loop|dense] [--quant int4|fp8] [--json]`: the
Pallas LoRA-on-MoE kernel against the reference (gmm composition on `jax.lax.ragged_dot`, the accelerator
default), forward + backward (dx, dA, dB) of one expert projection in each direction (D->F as gate/up, F->D as
down). With `--quant int4` the expert weights are 4-bit (scale groups of 32, Kimi K2 Thinking's format), with
`--quant fp8` float8 e4m3 with 128x128 block scales (Kimi K2 Instruct's): the kernel dequantizes them tile by
tile, the reference dequantizes the whole stack before its matmuls.

Shapes: Qwen3-30B-A3B experts (D=2048, F=768, E=128, top-8) and a per-device slice of Kimi K2 (D=7168,
F=2048, E=384/8=48 local experts, top-8), with rows routed to random experts and to 4 adapter slots (slot 0 =
base model), rank 32, bf16. TFLOP/s count the useful FLOPs only (routed rows x per-row work), and a plain
bf16 matmul on the same device gives the peak to compare with. On CPU the kernel only runs interpreted, far too
slowly to time: there the timed rows are the two reference paths (loop gmm vs ragged_dot) on small shapes,
and the kernel's error is checked on a small problem in interpret mode. A kernel that fails to lower is
reported (and the reference timed in its place), never a crash.
"""

from __future__ import annotations

import traceback

import numpy as np

from jtinker.bench_common import timed
from models.checks import first_line

SHAPES = {
    "qwen3-30b-a3b": {"D": 2048, "F": 768, "E": 128, "top_k": 8, "tokens": 4096},
    # one device of 8-way expert parallelism: E/8 local experts, and 1/8 of 16384 tokens x top-8 routed rows
    "kimi-k2": {"D": 7168, "F": 2048, "E": 48, "top_k": 8, "tokens": 2048},
    "cpu-small": {"D": 256, "F": 128, "E": 8, "top_k": 2, "tokens": 256},
}
SLOTS, RANK = 4, 32
QUANT = {"bf16": {}, "int4": {"int4_group": 32}, "fp8": {"fp8_block": (128, 128)}}
QUANT_NAMES = {"bf16": "bfloat16", "int4": "int4 (groups of 32)", "fp8": "float8 e4m3 (128x128 blocks)"}


def _sync(tree):
    import jax

    for leaf in jax.tree.leaves(tree):
        leaf.block_until_ready()


def _time(fn, args, steps: int, warmup: int = 2) -> dict:
    """Median and minimum milliseconds of `fn(*args)`, after `warmup` untimed calls (the first compiles)."""
    figures, _ = timed(lambda: _sync(fn(*args)), steps, warmup=warmup - 1)
    return {"ms_median": 1e3 * figures["step_s_median"], "ms_min": 1e3 * figures["step_s_min"]}


def _problem(shape: dict, direction: str, seed: int = 0, quant: str = "bf16"):
    """Routed rows for one projection: random experts (ragged, some groups empty or tiny), random slots."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    E, rows = shape["E"], shape["tokens"] * shape["top_k"]
    popularity = rng.dirichlet(np.full(E, 0.5))  # skewed expert load, as real routers give
    pair_p = (popularity[:, None] * np.array([0.1, 0.5, 0.3, 0.1])[None, :]).reshape(-1)
    pair_sizes = rng.multinomial(rows, pair_p / pair_p.sum()).astype(np.int32)
    D, F = (shape["D"], shape["F"]) if direction == "up" else (shape["F"], shape["D"])
    return random_problem(jax.random.key(seed), pair_sizes, E, D, F, RANK, jnp.bfloat16,
                          **QUANT[quant])


def random_problem(key, pair_sizes, E: int, D: int, F: int, R: int, dtype, extra_rows: int = 0,
                   int4_group: int | None = None, fp8_block: tuple[int, int] | None = None):
    """Random operands for the benchmark (and the kernel tests): (x, w, a, b, scale, expert_sizes, pair_sizes);
    w is an `Int4Weight` with scale groups of `int4_group` rows, or an `Fp8Weight` with scale blocks of
    `fp8_block`, if given."""
    import jax
    import jax.numpy as jnp

    from models.layers.quantized import random_fp8, random_int4

    pair_sizes = np.asarray(pair_sizes, np.int32)
    J, M = pair_sizes.shape[0], int(pair_sizes.sum()) + extra_rows
    X = J // E
    kx, kw, ka, kb, ks = jax.random.split(key, 5)
    x = jax.random.normal(kx, (M, D), jnp.float32).astype(dtype)
    if int4_group:
        w = random_int4(kw, (E, D, F), int4_group, dtype)
    elif fp8_block:
        w = random_fp8(kw, (E, D, F), fp8_block)
    else:
        w = (jax.random.normal(kw, (E, D, F), jnp.float32) / np.sqrt(D)).astype(dtype)
    a = (jax.random.normal(ka, (J, D, R), jnp.float32) / np.sqrt(D)).astype(dtype)
    b = (jax.random.normal(kb, (J, R, F), jnp.float32) / np.sqrt(R)).astype(dtype)
    slot_rows = np.repeat(np.tile(np.arange(X), E), pair_sizes)
    scale = jnp.asarray(np.concatenate([np.where(slot_rows == 0, 0.0, 2.0 + slot_rows), np.zeros(extra_rows)]),
                        jnp.float32) * (1.0 + 0.1 * jax.random.uniform(ks, (M,)))
    expert_sizes = pair_sizes.reshape(E, X).sum(axis=1)
    return x, w, a, b, scale, jnp.asarray(expert_sizes), jnp.asarray(pair_sizes)


def fp32_operands(args):
    """The operands in fp32 for a reference: half-precision arrays widened, and quantized weights dequantized to
    the activations' dtype (as the kernel dequantizes them) and then widened."""
    import jax.numpy as jnp

    from models.layers.quantized import QUANTIZED

    x, w = args[0], args[1]
    if isinstance(w, QUANTIZED):
        w = w.dequantize(x.dtype)
    args = (x, w) + tuple(args[2:])
    return tuple(t.astype(jnp.float32) if t.dtype in (jnp.bfloat16, jnp.float16) else t for t in args)


def _cotangent(args):
    import jax
    import jax.numpy as jnp

    return jax.random.normal(jax.random.key(9), (args[0].shape[0], args[1].shape[2]), jnp.float32)


def _baseline_on_gpu(shape: dict, direction: str, baseline_gmm: str, kernel: str, tiles, steps: int, row: dict,
                     quant: str = "bf16"):
    """The reference at full size if it fits; `ragged_dot`'s GPU lowering is dense ([groups, rows, K]) and runs
    out of memory at real sizes, so then both sides are timed at the largest token count where it runs, and the
    baseline's figure is the kernel's full-size time times their ratio there (reported as such)."""
    tokens = shape["tokens"]
    groups, width = shape["E"] * SLOTS, max(shape["D"], shape["F"])
    while tokens > 64 and groups * tokens * shape["top_k"] * width * 4 > 16 * 2**30:
        tokens //= 2  # the dense lowering's [groups, rows, width] fp32 temporary would not fit: skip the attempt
    if tokens < shape["tokens"]:
        dense_gib = groups * shape["tokens"] * shape["top_k"] * width * 4 / 2**30
        row.setdefault("baseline_failures", []).append({
            "tokens": shape["tokens"],
            "error": f"not attempted: its dense [groups, rows, width] temporary needs {dense_gib:.0f} GiB"})
    while tokens >= 64:
        small = {**shape, "tokens": tokens}
        args_p = _problem(small, direction, quant=quant)
        inputs = (*args_p, _cotangent(args_p))
        try:
            base = _time(_step_fn("reference", gmm_impl=baseline_gmm), inputs, steps)
        except Exception as e:  # noqa: BLE001 - out of memory: try fewer tokens
            row.setdefault("baseline_failures", []).append({"tokens": tokens, "error": f"{type(e).__name__}: "
                                                            f"{first_line(e, '')[:200]}"})
            tokens //= 2
            continue
        name = f"reference ({baseline_gmm})"
        if tokens == shape["tokens"]:
            return {**base, "name": name}
        mine = (_time(_step_fn(kernel, tiles=tiles), inputs, steps) if tiles is not None else
                _time(_step_fn("reference", gmm_impl="loop"), inputs, steps))
        flops = _flops(args_p)
        return {"ms_median": base["ms_median"], "ms_min": base["ms_min"], "flops": flops,
                "tflops": flops / (base["ms_median"] * 1e-3) / 1e12, "name": f"{name} at {tokens} tokens",
                "tokens": tokens, "jtinker_ms_same_size": mine["ms_median"],
                "ratio_same_size": base["ms_median"] / mine["ms_median"]}
    return {"ms_median": float("nan"), "ms_min": float("nan"), "name": f"reference ({baseline_gmm}) did not run"}


def _flops(args) -> float:
    x, w, a = args[0], args[1], args[2]
    M, D, F, R = x.shape[0], w.shape[1], w.shape[2], a.shape[2]
    fwd = 2 * M * (D * F + D * R + R * F)
    bwd = 2 * M * (F * D + 2 * R * F + 2 * R * D)  # dx (base + LoRA), dh, dA, dB
    return float(fwd + bwd)


def _step_fn(impl: str, **kwargs):
    """jit(forward + backward): the loss is sum(y * cotangent); returns y, dx, dA, dB."""
    import jax
    import jax.numpy as jnp

    from models.kernels.lora_moe import lora_gmm

    def loss(x, a, b, w, s, es, ps, ct):
        y = lora_gmm(x, w, a, b, s, es, ps, impl=impl, **kwargs)
        return jnp.sum(y.astype(jnp.float32) * ct), y

    grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)

    def step(x, w, a, b, s, es, ps, ct):
        (_, y), grads = grad(x, a, b, w, s, es, ps, ct)
        return (y,) + grads

    return jax.jit(step)


def _max_errors(got, ref) -> tuple[float, float]:
    abs_err = rel_err = 0.0
    for g, r in zip(got, ref):
        g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
        e = float(np.abs(g - r).max())
        abs_err, rel_err = max(abs_err, e), max(rel_err, e / max(float(np.abs(r).max()), 1e-30))
    return abs_err, rel_err


def _matmul_peak(on_cpu: bool) -> dict:
    import jax
    import jax.numpy as jnp

    n = 1024 if on_cpu else 8192
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a, b: a @ b)
    t = _time(f, (a, a), steps=3 if on_cpu else 20)
    return {"n": n, "tflops": 2 * n**3 / (t["ms_min"] * 1e-3) / 1e12, **t}


def _triton_sweep():
    from models.kernels.lora_moe import Tiles

    return [Tiles(128, 64, 128, 64, num_warps=4, num_stages=3), Tiles(128, 64, 128, 64, num_warps=8, num_stages=3),
            Tiles(64, 64, 128, 64, num_warps=4, num_stages=4), Tiles(128, 64, 256, 64, num_warps=8, num_stages=3)]


def run_bench(args) -> dict:
    import jax
    import jax.numpy as jnp

    from models.kernels import lora_moe as L
    from models.layers.moe_impl import platform_kernel

    if args.vs == "torch":
        raise ValueError("bench moe-lora compares against the reference grouped matmul: --vs ragged|loop|dense")
    platform = jax.default_backend()
    on_cpu = platform == "cpu"
    shapes_name = getattr(args, "shapes", None) or "qwen3-30b-a3b"
    if on_cpu and getattr(args, "shapes", None) is None:
        shapes_name = "cpu-small"
    shape = SHAPES[shapes_name]
    baseline_gmm = args.vs or "ragged"
    steps = args.steps or (3 if on_cpu else 20)
    quant = getattr(args, "quant", None) or "bf16"
    kernel = platform_kernel(platform).value
    device = str(jax.devices()[0].device_kind)
    result: dict = {"benchmark": "moe-lora", "shapes": shapes_name, **shape, "slots": SLOTS, "rank": RANK,
                    "dtype": "bfloat16", "weights": QUANT_NAMES[quant],
                    "platform": platform, "device": device, "steps": steps,
                    "baseline_gmm": baseline_gmm, "kernel": kernel}
    print(f"bench moe-lora: {shapes_name} {shape}, {SLOTS} slots, rank {RANK}, bf16 activations, "
          f"{result['weights']} expert weights, fwd+bwd, on {device}", flush=True)

    rows, totals = [], {"jtinker": [0.0, 0.0], "baseline": [0.0, 0.0]}
    errors, kernel_error, chosen_tiles, failure = [], None, None, None
    for direction in ("up", "down"):
        args_p = _problem(shape, direction, quant=quant)
        inputs = (*args_p, _cotangent(args_p))
        flops = _flops(args_p)
        row = {"direction": direction, "rows": int(args_p[0].shape[0]), "flops": flops}
        if on_cpu:  # the kernel is interpreted on CPU: time the default CPU reference path instead
            row["baseline"] = {**_time(_step_fn("reference", gmm_impl=baseline_gmm), inputs, steps),
                               "name": f"reference ({baseline_gmm})"}
            row["jtinker"] = {**_time(_step_fn("reference", gmm_impl="loop"), inputs, steps),
                              "name": "reference (loop; kernel not timed on CPU)"}
        else:
            mine = None
            for tiles in ([chosen_tiles] if chosen_tiles else (_triton_sweep() if kernel == "triton"
                                                                  else [L.DEFAULT_TILES[kernel]])):
                try:
                    t = _time(_step_fn(kernel, tiles=tiles), inputs, steps)
                    row.setdefault("sweep", []).append({"tiles": str(tiles), **t})
                    if mine is None or t["ms_median"] < mine["ms_median"]:
                        mine, best = t, tiles
                except Exception as e:  # noqa: BLE001 - report a lowering failure, keep benchmarking
                    failure = f"{type(e).__name__}: {e}"[:2000]
                    row.setdefault("sweep", []).append({"tiles": str(tiles), "error": failure[:300]})
                    traceback.print_exc(limit=3)
            if mine is None:
                kernel_error = failure
                row["jtinker"] = {**_time(_step_fn("reference", gmm_impl="loop"), inputs, steps),
                                  "name": "reference (loop; kernel failed)"}
            else:
                chosen_tiles = chosen_tiles or best
                row["jtinker"] = {**mine, "name": f"{kernel} {chosen_tiles}"}
                # error against an fp32 reference on the loop gmm (ragged_dot's dense lowering may not fit)
                got = _step_fn(kernel, tiles=chosen_tiles)(*inputs)
                ref_inputs = fp32_operands(inputs)
                errors.append(_max_errors(got, _step_fn("reference", gmm_impl="loop")(*ref_inputs)))
            row["baseline"] = _baseline_on_gpu(shape, direction, baseline_gmm, kernel, chosen_tiles, steps, row,
                                               quant)
        row["jtinker"]["tflops"] = flops / (row["jtinker"]["ms_median"] * 1e-3) / 1e12
        row["baseline"].setdefault("tflops", flops / (row["baseline"]["ms_median"] * 1e-3) / 1e12)
        for side in ("jtinker", "baseline"):
            totals[side][0] += row[side].get("flops", flops)
            totals[side][1] += row[side]["ms_median"] * 1e-3
        rows.append(row)
    if on_cpu:  # correctness of the kernel itself, interpreted, on a small ragged problem
        # D=128: 16-row nibble planes when the weights are 4-bit, the smallest Triton takes
        small = random_problem(jax.random.key(0), np.array([0, 37, 1, 0, 60, 5, 2, 0], np.int32), 4, 128, 32, 16,
                               jnp.bfloat16, **({"fp8_block": (32, 32)} if quant == "fp8" else QUANT[quant]))
        small_inputs = (*small, _cotangent(small))
        for k in ("mosaic_tpu", "triton"):
            got = _step_fn(k, interpret=True, tiles=L.Tiles(32, 32, 32, 32))(*small_inputs)
            errors.append(_max_errors(got, _step_fn("reference")(*fp32_operands(small_inputs))))
    peak = _matmul_peak(on_cpu)
    jt, bl = (totals[s][0] / totals[s][1] / 1e12 for s in ("jtinker", "baseline"))
    result.update({
        "rows": rows,
        "jtinker": {"tflops": jt, "unit": "TFLOP/s", "impl": rows[0]["jtinker"]["name"],
                    "fraction_of_matmul_peak": jt / peak["tflops"]},
        "baseline": {"tflops": bl, "unit": "TFLOP/s", "impl": rows[0]["baseline"]["name"]},
        "ratio": jt / bl,
        "matmul_peak_bf16": {**peak, "unit": "TFLOP/s"},
        "max_abs_err": max((e[0] for e in errors), default=None),
        "max_rel_err": max((e[1] for e in errors), default=None),
        "kernel_timed": not on_cpu and kernel_error is None,
        "kernel_error": kernel_error,
    })
    _print_table(result)
    return result


def _print_table(result: dict) -> None:
    print(f"{'projection':12s} {'rows':>7s} {'jtinker ms':>11s} {'TFLOP/s':>8s} {'baseline ms':>12s} {'TFLOP/s':>8s}")
    for r in result["rows"]:
        j, b = r["jtinker"], r["baseline"]
        print(f"{r['direction']:12s} {r['rows']:7d} {j['ms_median']:11.3f} {j['tflops']:8.2f} "
              f"{b['ms_median']:12.3f} {b['tflops']:8.2f}  {b['name']}")
        if "ratio_same_size" in b:
            print(f"{'':12s} at {b['tokens']} tokens: kernel {b['jtinker_ms_same_size']:.3f} ms vs baseline "
                  f"{b['ms_median']:.3f} ms = {b['ratio_same_size']:.1f}x")
    print(f"jtinker: {result['jtinker']['impl']}; baseline: {result['baseline']['impl']}")
    print(f"overall {result['jtinker']['tflops']:.2f} vs {result['baseline']['tflops']:.2f} TFLOP/s "
          f"(ratio {result['ratio']:.2f}); bf16 matmul peak measured {result['matmul_peak_bf16']['tflops']:.1f} "
          f"TFLOP/s; max abs err {result['max_abs_err']}")
    if result["kernel_error"]:
        print(f"kernel error: {result['kernel_error'][:500]}")
