"""The same inputs through transformers (PyTorch, CPU) and through jtinker, compared.

Used by `jtinker compare-torch`, by `jtinker quickstart` and by the parity tests, so the tests check exactly
what users run. fp32 passes when the max abs logit difference is within `tolerance`; bf16 passes when
jtinker-bf16's deviation from the fp32 transformers reference is at most twice transformers-bf16's own (max and
mean), both bf16 runs replaying the fp32 reference's expert choice so that router near-ties do not decide it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from parallel.mesh import format_mesh

FP32_TOLERANCE = 1e-4
BF16_RATIO = 2.0


def save_random_hf_checkpoint(hf_config: dict, out_dir: Path, seed: int = 0, **save_kwargs) -> Path:
    """A transformers model of this config, randomly initialised with `seed`, written by `save_pretrained`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**hf_config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, **save_kwargs)
    return out_dir



@dataclasses.dataclass
class Inputs:
    input_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] 1 = token, 0 = padding
    positions: np.ndarray  # [B, T], or [3, B, T] M-RoPE positions with images
    pixel_values: np.ndarray | None = None  # [P, C*T*p*p]
    image_grid_thw: tuple | None = None  # ((t, h, w), ...) in order of appearance


# A deterministic set of test images (height, width) of different aspect ratios.
TEST_IMAGE_SIZES = ((300, 200), (180, 320), (256, 256))


def sample_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Smooth colour gradients plus noise, uint8 RGB: deterministic, and unlike a constant image they make
    every patch different."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        h, w = TEST_IMAGE_SIZES[i % len(TEST_IMAGE_SIZES)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([xx / w, yy / h, (xx + yy) / (h + w)], axis=-1) * 200
        images.append(np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8))
    return images


def make_vl_inputs(model_dir, cfg, *, num_images: int, seq_len: int = 16, seed: int = 0) -> Inputs:
    """Two right-padded rows of text around images (`<|vision_start|>`, image pads, `<|vision_end|>`): the
    first image in row 0, the rest in row 1. Pixels come from jtinker's preprocessing, fed to both sides."""
    import json

    from models.image_processing import ImageProcessorConfig, num_image_tokens, preprocess_images
    from models.qwen3_vl_moe import mrope_positions

    preprocessor = Path(model_dir) / "preprocessor_config.json"
    processor = (ImageProcessorConfig.from_hf(json.loads(preprocessor.read_text())) if preprocessor.is_file()
                 else ImageProcessorConfig())
    rng = np.random.default_rng(seed)
    text_vocab = min(cfg.vocab_size, cfg.image_token_id, cfg.vision_start_token_id)
    pixel_values, grids = preprocess_images(sample_images(num_images, seed), processor)
    rows = [[], []]
    for i, grid in enumerate(grids):
        n = num_image_tokens(tuple(grid), processor.merge_size)
        rows[min(i, 1)] += (list(rng.integers(0, text_vocab, 3)) + [cfg.vision_start_token_id]
                            + [cfg.image_token_id] * n + [cfg.vision_end_token_id])
    rows = [row + list(rng.integers(0, text_vocab, seq_len - 3 * b)) for b, row in enumerate(rows)]
    T = max(map(len, rows))
    ids, mask = np.zeros((2, T), np.int64), np.zeros((2, T), np.int64)
    for b, row in enumerate(rows):
        ids[b, :len(row)], mask[b, :len(row)] = row, 1
    grid_thw = tuple(tuple(int(v) for v in g) for g in grids)
    positions = mrope_positions(ids, mask, grid_thw, cfg)
    return Inputs(ids, mask, positions, pixel_values if num_images else None, grid_thw if num_images else None)


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


class TorchRunner:
    """transformers' model of a folder, eager attention and experts (the reference implementations)."""

    def __init__(self, model_dir: str | Path, dtype: str):
        import torch

        self.torch = torch
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        self.model = _load_transformers_model(model_dir, torch_dtype)
        self.model.set_attn_implementation("eager")
        if hasattr(self.model, "set_experts_implementation"):
            self.model.set_experts_implementation("eager")
        self.model.eval()
        decoder = getattr(self.model.model, "language_model", self.model.model)
        self.routers = [layer.mlp.gate for layer in decoder.layers if hasattr(layer.mlp, "experts")]
        self.image_token_id = getattr(self.model.config, "image_token_id", None)
        self._replay, self._chosen = None, []
        for i, router in enumerate(self.routers):
            router.register_forward_hook(self._router_hook(i))

    def run(self, inputs: Inputs, replay_experts=None):
        """Logits [B, T, V] (float64) and the experts each MoE layer chose [L_moe, N, k] (sorted); with
        `replay_experts` every router keeps its scores but uses the given experts."""
        torch = self.torch
        self._replay = None if replay_experts is None else [torch.from_numpy(np.asarray(e)) for e in replay_experts]
        self._chosen = [None] * len(self.routers)
        kwargs = dict(input_ids=torch.from_numpy(inputs.input_ids),
                      attention_mask=torch.from_numpy(inputs.attention_mask))
        if inputs.pixel_values is None:
            kwargs["position_ids"] = torch.from_numpy(inputs.positions)
        else:  # transformers computes its own M-RoPE positions from the token types: an independent check
            kwargs.update(pixel_values=torch.from_numpy(inputs.pixel_values),
                          image_grid_thw=torch.tensor(inputs.image_grid_thw),
                          mm_token_type_ids=torch.from_numpy((inputs.input_ids == self.image_token_id).astype(np.int64)))
        try:
            with torch.no_grad():
                out = self.model(**kwargs)
        finally:
            self._replay = None
        routed = np.stack([np.sort(c, axis=-1) for c in self._chosen]) if self.routers else None
        return out.logits.to(torch.float64).numpy(), routed

    def _router_hook(self, index: int):
        torch = self.torch

        def hook(router, args, output):
            logits, weights, experts = output
            if self._replay is not None:
                experts = self._replay[index]
                if hasattr(router, "e_score_correction_bias"):  # DeepSeek-V3: sigmoid scores, fp32 weights
                    weights = logits.sigmoid().gather(-1, experts)
                    if router.norm_topk_prob:
                        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
                    weights = weights * router.routed_scaling_factor
                else:  # Qwen: softmax in fp32, weights cast to the logits dtype
                    weights = torch.softmax(logits.float(), dim=-1).gather(-1, experts)
                    if getattr(router, "norm_topk_prob", True):  # Qwen3-VL's router always renormalises
                        weights = weights / weights.sum(dim=-1, keepdim=True)
                    weights = weights.to(logits.dtype)
            self._chosen[index] = experts.numpy()
            return logits, weights, experts

        return hook


def _write_dequantized(model_dir, quantization_config, out: Path) -> bool:
    """transformers' FP8 / compressed-tensors loaders need accelerator kernels, so the reference gets a copy of
    the checkpoint dequantized by jtinker (fp32, built in memory: meant for small checkpoints). Both sides then
    run the same weights: this compares the models, not the dequantization, which has its own tests against
    the formats' definitions. False if there is nothing quantized."""
    import json

    from safetensors.numpy import save_file

    from models.quantization import open_checkpoint

    view = open_checkpoint(model_dir, quantization_config)
    if not view.quantized_names():
        return False
    save_file({name: np.ascontiguousarray(view.tensor(name)) for name in view.names()}, out / "model.safetensors")
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config))
    return True


def _load_transformers_model(model_dir, torch_dtype):
    """AutoModelForCausalLM, except for Kimi K2 (`kimi_k2` is remote code): DeepseekV3ForCausalLM on the same
    config, which is the same architecture."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    from models.config import read_hf_config, unwrap_text_config

    raw = unwrap_text_config(read_hf_config(model_dir))
    with tempfile.TemporaryDirectory(prefix="jtinker-dequantized-") as tmp:
        if _write_dequantized(model_dir, raw.get("quantization_config"), Path(tmp)):
            model_dir = tmp
            raw.pop("quantization_config", None)
        if raw.get("model_type") == "kimi_k2":
            fields = {k: v for k, v in raw.items()
                      if k not in ("model_type", "auto_map", "architectures", "quantization_config")}
            return DeepseekV3ForCausalLM.from_pretrained(model_dir, config=DeepseekV3Config(**fields),
                                                         dtype=torch_dtype, local_files_only=True)
        if raw.get("model_type") == "qwen3_vl_moe":
            from transformers import Qwen3VLMoeForConditionalGeneration

            return Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype,
                                                                      local_files_only=True)
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype, local_files_only=True)


class JtinkerRunner:
    """jtinker's model of the same folder, loaded once, forward compiled once per input shape."""

    def __init__(self, model_dir: str | Path, dtype: str, moe_impl: str = "auto", mesh: str | None = None):
        """`mesh` ("data=2,expert=2,tensor=2"): the forward runs sharded on that mesh (weights placed by the
        sharding rules, expert-parallel MoE) over the first devices of this process."""
        from models.hf_loading import load_hf_model
        from parallel import make_mesh, parse_mesh, variable_shardings

        graphdef, self.state = nnx.split(load_hf_model(model_dir, dtype=dtype, moe_impl=moe_impl))
        count = 1
        if mesh:
            sizes = parse_mesh(mesh)
            count = jax.device_count() if -1 in sizes.values() else int(np.prod(list(sizes.values())))
            if jax.device_count() < count:
                raise ValueError(f"--mesh {mesh} needs {count} devices, this process has {jax.device_count()}")
        # one device is a mesh of one: the same placement, and the single-device program
        self.mesh = make_mesh(mesh or None, jax.devices()[:count])
        self.state = jax.device_put(self.state, variable_shardings(self.state, self.mesh))

        def forward(state, ids, mask, positions, replay, pixel_values, image_grid_thw):
            m = nnx.merge(graphdef, state)
            images = {} if pixel_values is None else dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw)
            h, routed = m.hidden_states(ids, attention_mask_BT=mask, positions_BT=positions, replay_experts=replay,
                                        **images)
            return m.logits(h).astype(jnp.float32), routed

        self.forward = jax.jit(forward, static_argnames=("image_grid_thw",))

    def run(self, inputs: Inputs, replay_experts=None):
        """Logits [B, T, V] (float64) and routed experts [L_moe, N, k] (sorted)."""
        replay = None if replay_experts is None else jnp.asarray(replay_experts, jnp.int32)
        pixels = None if inputs.pixel_values is None else jnp.asarray(inputs.pixel_values)
        with jax.default_matmul_precision("highest"), jax.set_mesh(self.mesh):  # traced on the runner's mesh
            logits, routed = self.forward(self.state, jnp.asarray(inputs.input_ids, jnp.int32),
                                          jnp.asarray(inputs.attention_mask, jnp.int32),
                                          jnp.asarray(inputs.positions, jnp.int32), replay, pixels,
                                          image_grid_thw=inputs.image_grid_thw)
        routed = None if routed is None else np.sort(np.asarray(routed), axis=-1)
        return np.asarray(logits, np.float64), routed


def jtinker_forward(model_dir: str | Path, dtype: str, inputs: Inputs, moe_impl: str = "auto"):
    return JtinkerRunner(model_dir, dtype, moe_impl).run(inputs)


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


def compare(model_dir: str | Path, *, dtype: str = "float32", batch: int = 3, seq_len: int = 16, seed: int = 0,
            padding: str = "right", tolerance: float = FP32_TOLERANCE, moe_impl: str = "auto",
            num_images: int = 3, mesh: str | None = None) -> dict:
    """`num_images` applies to vision-language checkpoints (0 compares text alone); `mesh` runs jtinker's side
    sharded on that mesh (see `JtinkerRunner`)."""
    from models.config import load_config

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    start = time.perf_counter()
    cfg = load_config(model_dir)
    if cfg.model_type == "qwen3_vl_moe":
        inputs = make_vl_inputs(model_dir, cfg, num_images=num_images, seq_len=seq_len, seed=seed)
    else:
        inputs = make_inputs(cfg.vocab_size, batch=batch, seq_len=seq_len, seed=seed, padding=padding)
    valid = inputs.attention_mask.astype(bool)
    ref_logits, ref_routed = TorchRunner(model_dir, "float32").run(inputs)
    ours = JtinkerRunner(model_dir, dtype, moe_impl, mesh=mesh)
    ours_logits, ours_routed = ours.run(inputs)
    result = {**logit_metrics(ref_logits, ours_logits, valid),
              "router_agreement": router_agreement(ref_routed, ours_routed, valid),
              "dtype": dtype, "mesh": format_mesh(dict(ours.mesh.shape)) if mesh else None,
              "tokens": int(valid.sum()),
              "images": 0 if inputs.image_grid_thw is None else len(inputs.image_grid_thw)}
    if dtype == "float32":
        result["tolerance"] = tolerance
        result["passed"] = result["max_abs_logit_diff"] <= tolerance
    else:
        # In bf16 a router near-tie (or an exact tie: bf16 logits collide, and torch.topk breaks ties in no fixed
        # order) can flip a token's experts in either implementation, and its logits then jump. So the
        # numerics are compared with the fp32 reference's expert choice replayed in both bf16 runs; the
        # free-running agreement is reported alongside.
        torch_bf16 = TorchRunner(model_dir, "bfloat16")
        _, torch_free_routed = torch_bf16.run(inputs)
        torch_logits, _ = torch_bf16.run(inputs, replay_experts=ref_routed)
        ours_replayed, _ = ours.run(inputs, replay_experts=ref_routed)
        baseline = logit_metrics(ref_logits, torch_logits, valid)
        replayed = logit_metrics(ref_logits, ours_replayed, valid)
        result.update({f"free_{k}": v for k, v in result.items() if k.endswith("logit_diff")})
        result.update(replayed)
        result.update({
            "torch_bf16_max_abs_logit_diff": baseline["max_abs_logit_diff"],
            "torch_bf16_mean_abs_logit_diff": baseline["mean_abs_logit_diff"],
            "torch_bf16_router_agreement": router_agreement(ref_routed, torch_free_routed, valid),
            "tolerance": BF16_RATIO * baseline["max_abs_logit_diff"],
        })
        result["passed"] = (replayed["max_abs_logit_diff"] <= result["tolerance"]
                            and replayed["mean_abs_logit_diff"] <= BF16_RATIO * baseline["mean_abs_logit_diff"])
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def format_report(result: dict) -> str:
    rows = [("max |logit diff|", result["max_abs_logit_diff"]), ("mean |logit diff|", result["mean_abs_logit_diff"]),
            ("KL(torch || jtinker)", result["kl"]), ("top-1 agreement", result["top1_agreement"]),
            ("router top-k agreement", result["router_agreement"])]
    if result["dtype"] == "bfloat16":
        rows[0] = ("max |logit diff| (fp32 routing)", result["max_abs_logit_diff"])
        rows[1] = ("mean |logit diff| (fp32 routing)", result["mean_abs_logit_diff"])
        rows += [("torch bf16 max |diff| (fp32 routing)", result["torch_bf16_max_abs_logit_diff"]),
                 ("torch bf16 mean |diff| (fp32 routing)", result["torch_bf16_mean_abs_logit_diff"]),
                 ("max |diff|, free routing", result["free_max_abs_logit_diff"]),
                 ("torch bf16 router agreement", result["torch_bf16_router_agreement"])]
    mesh = f", jtinker on mesh {result['mesh']}" if result.get("mesh") else ""
    lines = [f"jtinker vs transformers ({result['dtype']}, {result['tokens']} tokens, fp32 transformers reference"
             f"{mesh})"]
    lines += [f"  {name:<32} {value:.3g}" if isinstance(value, float) else f"  {name:<32} {value}"
              for name, value in rows]
    verdict = "PASS" if result["passed"] else "FAIL"
    lines.append(f"  {verdict}: max |logit diff| {result['max_abs_logit_diff']:.3g} vs tolerance "
                 f"{result['tolerance']:.3g}")
    return "\n".join(lines)
