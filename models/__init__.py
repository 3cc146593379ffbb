"""Model layer: Flax NNX model families, multi-adapter LoRA, Hugging Face loading, tokenizers. Imports
`parallel` and below only."""
