"""One saved adapter as a Hugging Face PEFT LoRA folder (`adapter_config.json`, `adapter_model.safetensors`).

`PeftModel.from_pretrained(transformers_model, folder)` then computes what jtinker computes with the adapter.
Module names come from the loader's weight table (`models.hf_loading.weight_table`), so there is one name table.
The export needs only numpy, safetensors and Orbax (no torch, no peft).

Layouts. jtinker keeps A [in, R], B [R, out] and `scale` = alpha/rank per layer; PEFT keeps torch Linear
layouts, `lora_A.weight` [r, in] and `lora_B.weight` [out, r], with scaling lora_alpha/r. Only the slot's first
`rank` columns of A (rows of B) are written; the rest are zero by construction (and checked). Groups the slot
does not train (scale 0) are left out of the config altogether.

Routed experts. transformers 5 keeps them as fused 3-D parameters, `experts.gate_up_proj` [E, 2F, D] and
`experts.down_proj` [E, D, F]; PEFT 0.21 adapts those through `target_parameters` (its `ParamWrapper`) with one
independent rank-r pair per expert: `lora_A.weight` [E*r, in] is read as [E, r, in] and `lora_B.weight`
[out, r*E] as [out, r, E], delta_e = scaling * B[:, :, e] @ A[e]. That is exactly jtinker's per-expert LoRA.
jtinker's separate gate and up factors become one rank-2r pair on `gate_up_proj`: A = [A_gate; A_up] and a
block-diagonal B, with lora_alpha doubled (rank_pattern / alpha_pattern) so the scaling stays alpha/rank.
PEFT warns that those two pattern keys "did not match any targeted module": its check looks at modules only,
and the patterns are applied to the parameters all the same (the tests load the folder and compare logits).

Dense MLP and shared-expert LoRA (`gate_proj`, `up_proj`, `down_proj` Linear layers) are targeted as parameters
too (`gate_proj.weight`, a 2-D ParamWrapper: the same W + scaling * B @ A). Named in `target_modules` they would
be lost: for qwen3_moe and deepseek_v3 models PEFT 0.21 rewrites those names into the fused expert parameters
(its transformers v4 -> v5 adapter conversion) and drops them as modules.
"""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import numpy as np

PREFIX = "base_model.model."
_EXPERT_LORAS = {"gate_lora": "gate_proj", "up_lora": "up_proj", "down_lora": "down_proj"}
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")  # targeted as `<module>.weight` parameters, see above


class _NoTensors:
    """Stands in for a base checkpoint when building the weight table: only names are needed here, and with no
    tensors present the table lists routed experts one by one, from which the experts module name is read."""

    def __contains__(self, name) -> bool:
        return False


def resolve_checkpoint(checkpoint: str, state_dir=None) -> Path:
    """A `tinker://RUN/weights/NAME` (or `sampler_weights`) path under `state_dir`, a saved checkpoint folder
    (`meta.json` + `state/`), or that folder's `state/` itself -> the checkpoint folder."""
    if str(checkpoint).startswith("tinker://"):
        from jtinker.client import ServiceClient

        return ServiceClient(state_dir=state_dir).resolve(checkpoint)
    folder = Path(checkpoint)
    if folder.name == "state" and (folder.parent / "meta.json").is_file():
        folder = folder.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint at {checkpoint!r} (expected tinker://RUN/weights/NAME or a folder)")
    if not (folder / "state").is_dir() or not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"{checkpoint!r} is not a jtinker checkpoint folder (it needs meta.json and state/)")
    return folder


def _base_config(base_model: str):
    from models.config import load_config
    from models.registry import preset_config

    return load_config(base_model) if Path(base_model).is_dir() else preset_config(base_model)


def _parse_key(key: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in key.split("/"))


def _layer_names(source, layers: int) -> list[str]:
    """The checkpoint tensor name each layer of a (possibly stacked) table entry starts with."""
    from models.hf_loading import Stacked

    if layers == 0:
        return [next(source.leaves()).name]
    if not isinstance(source, Stacked) or len(source.parts) != layers:
        raise ValueError(f"internal: weight table entry does not have {layers} layers")
    return [next(part.leaves()).name for part in source.parts]


def _check_rank(name: str, a: np.ndarray, b: np.ndarray, rank: int) -> None:
    if rank > a.shape[-1]:
        raise ValueError(f"checkpoint rank {rank} exceeds the stored LoRA width {a.shape[-1]} at {name}")
    if np.any(a[..., rank:]) or np.any(b[..., rank:, :]):
        raise ValueError(f"LoRA factors of {name} are non-zero beyond the adapter's rank {rank}")


def _nice_alpha(scale: float, r: int) -> float | int:
    """lora_alpha = scale * r, written as a round number when PEFT's alpha / r still gives the same fp32 scale."""
    alpha = float(scale) * r
    for digits in (0, 3, 6):
        candidate = round(alpha, digits)
        if np.float32(candidate / r) == np.float32(scale):
            return int(candidate) if candidate == int(candidate) else candidate
    return alpha


def _entries(table, lora: dict, scales: dict, rank: int):
    """(kind, transformers name, r, scale, lora_A [E*r or r, in], lora_B [out, r*E or r]) for each exported
    Linear module (kind 'module') or parameter (kind 'parameter': fused experts, dense MLP / shared-expert
    weights); layers with scale 0 (a group the slot does not train) are skipped."""
    out, experts = [], collections.defaultdict(dict)
    for key in sorted(k for k in lora if k.endswith("/lora_a")):
        module = _parse_key(key)[:-1]
        base = "/".join(map(str, module))
        a, b = np.asarray(lora[key], np.float32), np.asarray(lora[base + "/lora_b"], np.float32)
        scale = np.asarray(scales[base + "/lora_scale"], np.float32)
        _check_rank(base, a, b, rank)
        layers = scale.shape[0] if scale.ndim else 0
        if not layers:  # one layer: give it the layer axis the stacked ones have
            a, b, scale = a[None], b[None], scale[None]
        if module[-1] == "lora":  # a Linear layer's LoRA
            names = [n.removesuffix(".weight") for n in _layer_names(table[module[:-1] + ("kernel",)], layers)]
        elif module[-1] == "lm_head_lora":  # tied embeddings: transformers still has an lm_head Linear
            names = ["lm_head"]
        elif module[-1] in _EXPERT_LORAS:
            source = table[module[:-1] + (_EXPERT_LORAS[module[-1]],)]
            names = [re.match(r"(.*\.experts)\.", n).group(1) for n in _layer_names(source, layers)]
            for name, a_l, b_l, s_l in zip(names, a, b, scale):
                experts[name][module[-1]] = (a_l[..., :rank], b_l[..., :rank, :], float(s_l))
            continue
        else:
            raise ValueError(f"no PEFT name for the LoRA at {base}")
        kind = "parameter" if names[0].rpartition(".")[2] in _MLP_LINEARS else "module"
        for name, a_l, b_l, s_l in zip(names, a, b, scale):
            if s_l != 0:
                name = f"{name}.weight" if kind == "parameter" else name
                out.append((kind, name, rank, float(s_l), a_l[:, :rank].T, b_l[:rank].T))
    for name, parts in experts.items():
        out += _expert_entries(name, parts, rank)
    return out


def _expert_entries(name: str, parts: dict, rank: int) -> list:
    """PEFT ParamWrapper factors for one experts module: gate_up_proj at rank 2r (A stacked, B block-diagonal,
    a differing up scale folded into B) and down_proj at rank r, experts interleaved as PEFT reads them."""
    (ag, bg, sg), (au, bu, su), (ad, bd, sd) = (parts[k] for k in ("gate_lora", "up_lora", "down_lora"))
    E, F = bg.shape[0], bg.shape[-1]
    out = []
    if sg != 0 or su != 0:
        scale = sg if sg != 0 else su
        a = np.concatenate([np.swapaxes(ag, 1, 2), np.swapaxes(au, 1, 2)], axis=1)  # [E, 2r, D]
        b = np.zeros((E, 2 * F, 2 * rank), np.float32)  # per expert [out, 2r]
        b[:, :F, :rank] = np.swapaxes(bg, 1, 2) * (sg / scale)
        b[:, F:, rank:] = np.swapaxes(bu, 1, 2) * (su / scale)
        out.append(("parameter", f"{name}.gate_up_proj", 2 * rank, scale, a.reshape(E * 2 * rank, -1),
                    b.transpose(1, 2, 0).reshape(2 * F, -1)))
    if sd != 0:
        out.append(("parameter", f"{name}.down_proj", rank, sd, np.swapaxes(ad, 1, 2).reshape(E * rank, -1),
                    np.swapaxes(bd, 1, 2).transpose(1, 2, 0).reshape(bd.shape[-1], -1)))
    return out


def _tensor_keys(entries) -> dict:
    """PEFT's state-dict keys. Two ParamWrappers on one experts module nest, the first parameter in
    registration order (gate_up_proj) innermost, so its keys carry an extra `base_layer.`."""
    wrapped = collections.Counter(name.rpartition(".")[0] for kind, name, *_ in entries if kind == "parameter")
    keys = {}
    for kind, name, *_ in entries:
        module, _, param = name.rpartition(".")
        if kind == "module":
            keys[name] = PREFIX + name
        else:
            keys[name] = PREFIX + module + (".base_layer" if param == "gate_up_proj" and wrapped[module] == 2 else "")
    return keys


def _short(kind: str, name: str) -> str:
    """The suffix that targets and patterns use: `q_proj` for modules, `experts.gate_up_proj` or
    `gate_proj.weight` for parameters (PEFT matches a name that ends with `.suffix`)."""
    return ".".join(name.split(".")[-1 if kind == "module" else -2:])


def _targets(kind: str, exported: set[str], universe: set[str]) -> list[str] | None:
    """Short suffixes where a suffix selects exactly the exported names among all the model's names of that
    kind, full names otherwise; None for none."""
    if not exported:
        return None
    by_suffix = collections.defaultdict(set)
    for name in universe | exported:
        by_suffix[_short(kind, name)].add(name)
    out = []
    for suffix, names in sorted(by_suffix.items()):
        chosen = names & exported
        out += [suffix] if chosen == names else sorted(chosen)
    return out


def _universe(table) -> dict[str, set[str]]:
    """What the transformers model can be adapted on, by kind: its Linear modules, and the parameters this
    export targets (fused expert tensors, dense MLP / shared-expert Linear weights)."""
    out = {"module": {"lm_head"}, "parameter": set()}
    for path, source in table.items():
        for leaf in source.leaves():
            name = leaf.name.removesuffix(".weight")
            if path[-1] == "kernel" and name.rpartition(".")[2] in _MLP_LINEARS:
                out["parameter"].add(f"{name}.weight")
            elif path[-1] == "kernel":
                out["module"].add(name)
            elif path[-2:-1] == ("experts",):
                experts = re.match(r"(.*\.experts)\.", leaf.name).group(1)
                out["parameter"] |= {f"{experts}.gate_up_proj", f"{experts}.down_proj"}
    return out


def _patterns(entries, rank: int):
    """lora_alpha (the most common at the adapter's rank) and rank_pattern / alpha_pattern for the rest, keyed
    by a short name where every exported name with that suffix agrees, by the escaped full name otherwise."""
    shape = {(kind, name): (r, _nice_alpha(scale, r)) for kind, name, r, scale, _, _ in entries}
    alphas = collections.Counter(a for r, a in shape.values() if r == rank).most_common(1)
    alpha = alphas[0][0] if alphas else _nice_alpha(entries[0][3], rank)
    by_short = collections.defaultdict(set)
    for (kind, name), value in shape.items():
        by_short[_short(kind, name)].add(value)
    rank_pattern, alpha_pattern = {}, {}
    for (kind, name), (r, a) in sorted(shape.items()):
        short = _short(kind, name)
        key = short if len(by_short[short]) == 1 else re.escape(name)
        if r != rank:
            rank_pattern[key] = r
        if a != alpha:
            alpha_pattern[key] = a
    return alpha, rank_pattern, alpha_pattern


def export_peft(checkpoint: str, out_dir, *, state_dir=None, base_model: str | None = None,
                base_model_name_or_path: str | None = None) -> dict:
    """Write `out_dir/adapter_config.json` and `out_dir/adapter_model.safetensors` for one saved adapter.

    `base_model` overrides the checkpoint's own (a preset name or a Hugging Face folder: it gives the
    architecture and names); `base_model_name_or_path` is what the config records (default: the folder's
    absolute path, or the preset name). Returns a summary of what was written."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    from models.hf_loading import weight_table
    from models.registry import create_abstract_model

    folder = resolve_checkpoint(checkpoint, state_dir)
    meta = json.loads((folder / "meta.json").read_text())
    base_model = base_model or meta["base_model"]
    rank = int(meta["rank"])
    cfg = _base_config(base_model)
    table = weight_table(_NoTensors(), cfg, create_abstract_model(cfg).segment_layout)
    state = ocp.StandardCheckpointer().restore((folder / "state").resolve())
    entries = _entries(table, state["lora"], state["scale"], rank)
    if not entries:
        raise ValueError(f"{checkpoint}: the adapter trains nothing (every LoRA scale is 0)")
    alpha, rank_pattern, alpha_pattern = _patterns(entries, rank)
    universe = _universe(table)
    exported = {kind: {name for k, name, *_ in entries if k == kind} for kind in universe}
    if base_model_name_or_path is None:
        base_model_name_or_path = str(Path(base_model).resolve()) if Path(base_model).is_dir() else base_model
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": _targets("module", exported["module"], universe["module"]),
        "target_parameters": _targets("parameter", exported["parameter"], universe["parameter"]),
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    keys = _tensor_keys(entries)
    tensors = {}
    for _, name, _, _, a, b in entries:
        tensors[f"{keys[name]}.lora_A.weight"] = np.ascontiguousarray(a, np.float32)
        tensors[f"{keys[name]}.lora_B.weight"] = np.ascontiguousarray(b, np.float32)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"out_dir": str(out), "base_model": base_model, "rank": rank, "lora_alpha": alpha,
            "modules": len(exported["module"]), "parameters": len(exported["parameter"]), "tensors": len(tensors)}
