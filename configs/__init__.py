"""Presets and shipped assets (data, not code).

A preset is a JSON file in `configs/presets/`: the Hugging Face `config.json` of the model under `hf_config`
plus jtinker's own fields (`tokenizer`, `description`). Tokenizers built by the project live in
`configs/tokenizers/<name>/` as ordinary Hugging Face tokenizer folders.
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIGS_DIR = Path(__file__).resolve().parent
PRESETS_DIR = CONFIGS_DIR / "presets"
TOKENIZERS_DIR = CONFIGS_DIR / "tokenizers"


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """The preset's JSON as a dict; a clear one-line error names the known presets otherwise."""
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}")
    return json.loads(path.read_text())
