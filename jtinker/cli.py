"""The `jtinker` command line. With `--json`, the last line printed is one JSON object (DESIGN.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


def _emit_json(result: dict) -> None:
    print(json.dumps(result, sort_keys=True))


def cmd_compare_torch(args) -> int:
    from pathlib import Path

    from jtinker.compare_torch import FP32_TOLERANCE, compare, format_report

    if not Path(args.hf_dir).is_dir():
        raise CliError(f"compare-torch: {args.hf_dir!r} is not a folder (expected a Hugging Face model folder)")
    if args.mesh:
        import math
        import os

        from parallel.mesh import parse_mesh

        sizes = parse_mesh(args.mesh)
        if -1 not in sizes.values() and "jax" not in sys.modules:  # CPU hosts get that many virtual devices
            count = math.prod(sizes.values())
            flags = os.environ.get("XLA_FLAGS", "")
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}"
    result = compare(args.hf_dir, dtype=args.dtype, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                     tolerance=args.tolerance if args.tolerance is not None else FP32_TOLERANCE,
                     moe_impl=args.moe_impl, num_images=args.images, mesh=args.mesh)
    print(format_report(result))
    if args.json:
        _emit_json(result)
    return 0 if result["passed"] else 1


def _virtual_cpu_devices(count: int, argv: list[str]) -> None:
    """Make this process a CPU host with `count` virtual devices (the plan's virtual mesh). XLA reads the flag
    when JAX starts its backend, so it is set first thing; a process whose backend already started re-executes
    itself with it."""
    import os
    import re

    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    flags = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            import jax

            if jax.default_backend() == "cpu" and jax.device_count() >= count:
                return
            env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
            sys.stdout.flush()
            os.execvpe(sys.executable, [sys.executable, "-m", "jtinker", *argv], env)
    os.environ["XLA_FLAGS"] = flags
    os.environ["JAX_PLATFORMS"] = "cpu"


def cmd_plan(args) -> int:
    from jtinker.plan import MAX_PLAN_DEVICES, format_plan, run_plan
    from parallel.planner import parse_bytes

    if args.devices < 1:
        raise CliError("plan: --devices must be at least 1")
    _virtual_cpu_devices(max(args.devices, MAX_PLAN_DEVICES if not args.no_search else args.devices), args.argv)
    result = run_plan(args.model, devices=args.devices, device_memory=parse_bytes(args.device_memory),
                      mesh=args.mesh, batch=args.batch, seq_len=args.seq_len, lora_rank=args.lora_rank,
                      quant=args.quant, decode=not args.no_decode, decode_batch=args.decode_batch,
                      search=not args.no_search)
    print(format_plan(result))
    if args.json:
        _emit_json(result)
    return 0


def _command(name: str):
    """A command implemented above this layer (the quickstart runs RL, which sits on `jtinker`): packages declare
    it under the `jtinker.commands` entry point group, so the CLI finds it without importing upward."""
    from importlib.metadata import entry_points

    found = entry_points(group="jtinker.commands", name=name)
    if not found:
        raise CliError(f"no '{name}' command is installed (reinstall jtinker: pip install -e .)")
    return next(iter(found)).load()


def cmd_quickstart(args) -> int:
    result = _command("quickstart")(out_dir=args.out_dir, preset=args.preset)
    if args.json:
        _emit_json(result)
    return 0 if result.get("passed", True) else 1


QUANT_CHOICES = ["auto", "bf16", "fp8", "int4"]
MOE_IMPLS = ["auto", "pallas", "reference", "loop", "ragged", "dense", "blocked", "triton", "mosaic_tpu"]
MOE_IMPL_HELP = ("how routed experts multiply, decided when the model is built: auto = the platform's LoRA-on-MoE "
                 "kernel where it takes the shapes on one GPU/TPU, else its grouped matmul (CPU: loop)")
QUANT_HELP = ("routed experts on the device: auto = as the preset's checkpoint stores them (Kimi K2 Thinking: "
              "4-bit, Kimi K2 Instruct and DeepSeek-V3: FP8, the rest bf16), int4 / fp8 = that format, bf16 = plain")


def cmd_model_info(args) -> int:
    import jax

    from jtinker.plan import with_quant
    from models.lora import LoraConfig
    from models.registry import create_abstract_model, parameter_counts, preset_config

    lora = LoraConfig(num_slots=2, max_rank=args.lora_rank, attn=not args.no_attn, mlp=not args.no_mlp,
                      unembed=not args.no_unembed)
    cfg = with_quant(preset_config(args.model), args.quant)
    model = create_abstract_model(cfg, lora=lora, moe_impl=args.moe_impl)
    counts = parameter_counts(model)
    moe_impl = getattr(model.config, "text", model.config).moe_impl  # as resolved for this platform
    result = {"model": args.model, "model_type": cfg.model_type, "lora_rank": args.lora_rank, "moe_impl": moe_impl,
              "parameters": counts["total"], "active_parameters": counts["active"],
              "routed_expert_parameters": counts["routed_experts"], "lora_parameters": counts["lora_per_adapter"],
              "weight_bytes": counts["weight_bytes"]}
    quant = getattr(cfg, "expert_quant", None)
    print(f"{args.model} ({cfg.model_type}): {counts['total'] / 1e9:.2f}B parameters, "
          f"{counts['active'] / 1e9:.2f}B active per token, {counts['routed_experts'] / 1e9:.2f}B in routed experts"
          f"{f' ({quant})' if quant else ''}; weights {counts['weight_bytes'] / 1e9:.1f} GB")
    print(f"LoRA rank {args.lora_rank} (attn={lora.attn}, mlp={lora.mlp}, unembed={lora.unembed}): "
          f"{counts['lora_per_adapter'] / 1e6:.1f}M parameters per adapter")
    print(f"routed experts multiply with: {moe_impl} (--moe-impl {args.moe_impl}, on {jax.default_backend()})")
    if args.json:
        _emit_json(result)
    return 0


def cmd_export_peft(args) -> int:
    from jtinker.export_peft import export_peft

    result = export_peft(args.checkpoint, args.out_dir, state_dir=args.state_dir, base_model=args.base_model,
                         base_model_name_or_path=args.base_model_name_or_path)
    print(f"wrote a PEFT LoRA adapter (rank {result['rank']}, lora_alpha {result['lora_alpha']}, "
          f"{result['modules']} modules, {result['parameters']} parameters) to {result['out_dir']}")
    if args.json:
        _emit_json(result)
    return 0


def cmd_serve(args) -> int:
    from jtinker.server.app import serve
    from serving.http_limits import Limits

    if args.slots < 2:
        raise CliError("serve: --slots must be >= 2 (slot 0 is the base model)")
    for flag in ("max_body_mb", "max_metadata_kb", "max_prompt_chars", "stall_seconds"):
        if not getattr(args, flag) > 0:
            raise CliError(f"serve: --{flag.replace('_', '-')} must be > 0")
    limits = Limits(max_body_bytes=int(args.max_body_mb * (1 << 20)),
                    max_metadata_bytes=int(args.max_metadata_kb * (1 << 10)), max_prompt_chars=args.max_prompt_chars)
    serve(args.model, host=args.host, port=args.port, api_keys=args.api_key, state_dir=args.state_dir,
          num_slots=args.slots, max_rank=args.max_lora_rank, poll_seconds=args.poll_seconds,
          session_timeout=args.session_timeout, fwdbwd_max_chunk_len=args.fwdbwd_max_chunk_len, limits=limits,
          stall_seconds=args.stall_seconds)
    # Stopped (SIGINT/SIGTERM): everything durable is committed. Exit now rather than wait for worker threads
    # still inside a device call, so a stop takes seconds even when an engine is stalled.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


BENCHES = {"train": "jtinker.bench_train", "sample": "jtinker.bench_sample", "moe-lora": "jtinker.bench_moe_lora"}


def cmd_bench(args) -> int:
    """Each benchmark module has `run_bench(args) -> dict` with `jtinker`, `baseline` and `ratio` keys; it prints
    its own side-by-side table."""
    import importlib

    if args.vs not in (None, "torch") and args.what != "moe-lora":
        raise CliError(f"bench {args.what}: --vs must be 'torch'")
    result = importlib.import_module(BENCHES[args.what]).run_bench(args)
    if args.json:
        _emit_json(result)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jtinker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quickstart", help="the main job on the embedded tiny default")
    q.add_argument("--preset", default="tiny-qwen3-moe")
    q.add_argument("--out-dir", default="jtinker-quickstart", help="where checkpoints and reports go")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_quickstart)

    c = sub.add_parser("compare-torch", help="logits of transformers (PyTorch) and jtinker on the same inputs")
    c.add_argument("hf_dir", metavar="HF_DIR")
    c.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    c.add_argument("--batch", type=int, default=3)
    c.add_argument("--seq-len", type=int, default=16)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--tolerance", type=float, default=None,
                   help="fp32 max |logit diff| allowed (default 1e-4); bf16 uses 2x transformers' own bf16 error")
    c.add_argument("--moe-impl", choices=MOE_IMPLS, default="auto", help=MOE_IMPL_HELP)
    c.add_argument("--images", type=int, default=3,
                   help="vision-language checkpoints: how many of the deterministic test images to include")
    c.add_argument("--mesh", default=None, help="run jtinker sharded on this mesh, e.g. data=2,expert=2,tensor=2 "
                   "(on a CPU host that many virtual devices)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare_torch)

    p = sub.add_parser("plan", help="compile the LoRA RL step (and decode step) for a virtual mesh: per-device "
                       "memory, whether it fits, the smallest device count, the largest micro-batch")
    p.add_argument("--model", required=True, metavar="PRESET")
    p.add_argument("--devices", type=int, required=True, help="N devices in the mesh")
    p.add_argument("--device-memory", default="80GB", help="memory per device, e.g. 80GB, 141GB, 96GiB")
    p.add_argument("--mesh", default=None, help="e.g. expert=16,fsdp=4 (default: expert as large as the experts "
                   "allow, fsdp the rest)")
    p.add_argument("--batch", type=int, default=1, help="sequences per batch shard (micro-batch)")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    p.add_argument("--decode-batch", type=int, default=None, help="sequences in the decode step (default 4 per "
                   "batch shard)")
    p.add_argument("--no-decode", action="store_true", help="plan the training step only")
    p.add_argument("--no-search", action="store_true", help="no smallest-N / largest micro-batch searches")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    m = sub.add_parser("model-info", help="parameter and LoRA counts of a preset, from shapes only (no weights)")
    m.add_argument("model", metavar="PRESET")
    m.add_argument("--lora-rank", type=int, default=32)
    m.add_argument("--no-attn", action="store_true", help="no LoRA on attention")
    m.add_argument("--no-mlp", action="store_true", help="no LoRA on dense MLP, shared and routed experts")
    m.add_argument("--no-unembed", action="store_true", help="no LoRA on the unembedding")
    m.add_argument("--quant", choices=QUANT_CHOICES, default="auto", help=QUANT_HELP)
    m.add_argument("--moe-impl", choices=MOE_IMPLS, default="auto", help=MOE_IMPL_HELP)
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_model_info)

    b = sub.add_parser("bench", help="side-by-side benchmarks: jtinker against a baseline in one process")
    b.add_argument("what", choices=sorted(BENCHES))
    b.add_argument("--vs", default=None, help="baseline: 'torch' (transformers) for train and sample; for moe-lora "
                   "the reference grouped matmul (default)")
    b.add_argument("--preset", default=None, help="model preset (default: the benchmark's own)")
    b.add_argument("--steps", type=int, default=None, help="timed repetitions (default: the benchmark's own)")
    b.add_argument("--shapes", choices=["qwen3-30b-a3b", "kimi-k2"], default=None,
                   help="moe-lora: expert shapes (default qwen3-30b-a3b; small shapes on CPU)")
    b.add_argument("--quant", choices=["bf16", "int4", "fp8"], default=None,
                   help="moe-lora: expert weights 4-bit (groups of 32) or FP8 (128x128 blocks), dequantized inside "
                   "the kernel; the baseline dequantizes them first (default bf16)")
    b.add_argument("--targets", choices=["attn", "all"], default="attn",
                   help="train: LoRA targets; 'all' adds a jtinker-only row with MLP/expert/unembedding LoRA")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    s = sub.add_parser("serve", help="the Tinker REST API (official tinker SDK, tinker-cookbook) on this machine")
    s.add_argument("--model", action="append", required=True, metavar="SPEC",
                   help="a preset name or a local Hugging Face folder; repeat for several base models")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accepted X-API-Key (repeatable; each key is its own tenant). None: no auth, one tenant")
    s.add_argument("--state-dir", default="jtinker-state", help="checkpoints and the SQLite state (durable)")
    s.add_argument("--slots", type=int, default=33,
                   help="adapter slots per base model, incl. slot 0 (the base): live training runs plus cached "
                   "sampler adapters")
    s.add_argument("--max-lora-rank", type=int, default=32)
    s.add_argument("--poll-seconds", type=float, default=25.0, help="how long retrieve_future holds a request")
    s.add_argument("--session-timeout", type=float, default=180.0,
                   help="seconds without heartbeats after which a session's training runs are unloaded")
    s.add_argument("--fwdbwd-max-chunk-len", type=int, default=1024,
                   help="datums per forward_backward request the SDK sends (it splits larger calls into chunks)")
    s.add_argument("--max-body-mb", type=float, default=64.0,
                   help="largest request body, raw and again after zstd decompression (413 beyond)")
    s.add_argument("--max-metadata-kb", type=float, default=64.0,
                   help="largest user_metadata or tags stored with a session, run or checkpoint (413 beyond)")
    s.add_argument("--max-prompt-chars", type=int, default=1 << 20,
                   help="longest OpenAI-route prompt or chat, in characters, checked before tokenizing (413 beyond)")
    s.add_argument("--stall-seconds", type=float, default=600.0,
                   help="an engine or sampler busy with one step for longer is reported unhealthy (/api/v1/healthz "
                   "503) and what waits on it fails")
    s.set_defaults(func=cmd_serve)

    e = sub.add_parser("export-peft", help="a saved adapter as a Hugging Face PEFT LoRA folder")
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="tinker://RUN/weights/NAME or a checkpoint folder")
    e.add_argument("out_dir", metavar="OUT_DIR")
    e.add_argument("--state-dir", default=None, help="where tinker:// paths live (default $JTINKER_STATE_DIR or "
                   "./jtinker-state)")
    e.add_argument("--base-model", default=None, help="preset or HF folder (default: the checkpoint's own)")
    e.add_argument("--base-model-name-or-path", default=None,
                   help="what adapter_config.json records as the base model (e.g. a Hugging Face Hub id)")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export_peft)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except CliError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as e:
        # Config/checkpoint/tokenizer errors are one line by construction: show them without a traceback.
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
