"""The `jtinker` command line. With `--json`, the last line printed is one JSON object (DESIGN.md)."""

from __future__ import annotations

import argparse
import json
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
    result = compare(args.hf_dir, dtype=args.dtype, batch=args.batch, seq_len=args.seq_len, seed=args.seed,
                     tolerance=args.tolerance if args.tolerance is not None else FP32_TOLERANCE,
                     moe_impl=args.moe_impl, num_images=args.images)
    print(format_report(result))
    if args.json:
        _emit_json(result)
    return 0 if result["passed"] else 1


def cmd_quickstart(args) -> int:
    from jtinker.quickstart import run_quickstart

    result = run_quickstart(out_dir=args.out_dir, preset=args.preset)
    if args.json:
        _emit_json(result)
    return 0 if result.get("passed", True) else 1


def cmd_model_info(args) -> int:
    from models.lora import LoraConfig
    from models.registry import create_abstract_model, parameter_counts, preset_config

    lora = LoraConfig(num_slots=2, max_rank=args.lora_rank, attn=not args.no_attn, mlp=not args.no_mlp,
                      unembed=not args.no_unembed)
    cfg = preset_config(args.model)
    counts = parameter_counts(create_abstract_model(cfg, lora=lora))
    result = {"model": args.model, "model_type": cfg.model_type, "lora_rank": args.lora_rank,
              "parameters": counts["total"], "active_parameters": counts["active"],
              "routed_expert_parameters": counts["routed_experts"], "lora_parameters": counts["lora_per_adapter"]}
    print(f"{args.model} ({cfg.model_type}): {counts['total'] / 1e9:.2f}B parameters, "
          f"{counts['active'] / 1e9:.2f}B active per token, {counts['routed_experts'] / 1e9:.2f}B in routed experts")
    print(f"LoRA rank {args.lora_rank} (attn={lora.attn}, mlp={lora.mlp}, unembed={lora.unembed}): "
          f"{counts['lora_per_adapter'] / 1e6:.1f}M parameters per adapter")
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
    c.add_argument("--moe-impl", choices=["auto", "loop", "ragged", "dense", "pallas"], default="auto")
    c.add_argument("--images", type=int, default=3,
                   help="vision-language checkpoints: how many of the deterministic test images to include")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_compare_torch)

    m = sub.add_parser("model-info", help="parameter and LoRA counts of a preset, from shapes only (no weights)")
    m.add_argument("model", metavar="PRESET")
    m.add_argument("--lora-rank", type=int, default=32)
    m.add_argument("--no-attn", action="store_true", help="no LoRA on attention")
    m.add_argument("--no-mlp", action="store_true", help="no LoRA on dense MLP, shared and routed experts")
    m.add_argument("--no-unembed", action="store_true", help="no LoRA on the unembedding")
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
    b.add_argument("--targets", choices=["attn", "all"], default="attn",
                   help="train: LoRA targets; 'all' adds a jtinker-only row with MLP/expert/unembedding LoRA")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

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
    args = build_parser().parse_args(argv)
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
