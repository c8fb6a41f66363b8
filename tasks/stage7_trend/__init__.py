"""Stage 7, trend: what changed in the polysemantic channels across checkpoints."""
