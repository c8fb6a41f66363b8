"""Stage 2, reduce: the cube streamed once into per-class statistics and ARVs."""
