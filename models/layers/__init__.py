"""Building blocks shared by the model families (norms, rope, attention, MLP, MoE, stacking)."""
