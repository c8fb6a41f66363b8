"""The method's defaults, in one place.

Values follow Hesse et al. (2025) and Mu & Andreas (2020) unless a comment says otherwise.
Every stage reads its defaults from here; flows and the CLI only override them.
"""

from __future__ import annotations

# Detection (Hesse et al., section 3)
TAU: float = 0.03  # channel important for an image if R >= tau * sum_c max(R, 0)
P_FRACTION: float = 0.75  # channel relevant for a class if important for >= p of its images
GAMMA: float = 0.5  # ARV cosine below gamma -> polysemantic pair
COSINE_LOWER_BOUND: float = 0.0  # the published code also requires cos >= 0

# Rewiring: rho chosen from 0.05, 0.10, ..., 1.00
RHO_GRID: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 21))
RHO_SCORE_EPS: float = 1e-5  # denominator guard in the paper's rho score
# Images per concept used to choose rho (the paper uses all; capped to keep CPU runs short).
RHO_MAX_IMAGES_PER_CONCEPT: int = 256

# Compositional explanations (Mu & Andreas 2020)
EXPLAIN_BEAM_WIDTH: int = 5
EXPLAIN_MAX_FORMULA_LENGTH: int = 3
EXPLAIN_OPERATORS: tuple[str, ...] = ("OR", "AND", "AND NOT")

# Extraction
CHUNK_IMAGES: int = 512  # images per Zarr chunk (and per completion marker)
SHARD_CHUNKS: int = 8  # chunks per Prefect shard task: thousands of images per task
BATCH_SIZE: int = 128  # must divide CHUNK_IMAGES so batches never straddle chunks
