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

# Compositional explanations, image level. None: binarise each unit at the quantile
# 1 - 1/n_classes, so that it is active on as many images as a class has on average;
# Mu & Andreas's pixel-level setting is 0.995 (top 0.5 %).
EXPLAIN_ACTIVE_QUANTILE: float | None = None
EXPLAIN_PAPER_QUANTILE: float = 0.995
EXPLAIN_UNIT_CHUNK: int = 256  # units searched together (bounds the candidate arrays' memory)

# Feature visualisation (Lucid / MACO style). CIFAR-size defaults run in seconds on a CPU;
# ImageNet models want FEATVIS_IMAGENET_SIZE and FEATVIS_IMAGENET_STEPS, on a GPU.
FEATVIS_SIZE: int = 32
FEATVIS_STEPS: int = 128
FEATVIS_LR: float = 0.05
FEATVIS_IMAGENET_SIZE: int = 224
FEATVIS_IMAGENET_STEPS: int = 512
FEATVIS_MODE: str = "fourier"  # "fourier": optimise the whole spectrum; "phase": MACO
FEATVIS_DECAY_POWER: float = 1.0  # spectrum scaled by 1 / frequency ** decay_power
FEATVIS_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet statistics,
FEATVIS_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)  # also used by CIFAR ResNets
# Random transforms applied at every feature-visualisation step (robustness, Lucid style).
FEATVIS_JITTER: float = 1.0 / 16.0  # largest shift, as a fraction of the image side
FEATVIS_SCALE: float = 0.1  # scale drawn from [1 - s, 1 + s]
FEATVIS_ROTATE_DEGREES: float = 5.0  # rotation drawn from [-r, r]
FEATVIS_BATCH: int = 4  # transformed copies per step; the objective is averaged over them

# Evaluation (Table 1, scores, figures) and the report
# Images whose original channel's spatial sum |orig| is below this fraction of the channel's
# median |orig| over the evaluation images are left out of the ratio statistics: a ratio x/orig
# with orig near zero is dominated by rounding and would swamp every mean.
EVAL_MIN_ABS_ORIG_FRACTION: float = 0.01
EVAL_SCORE_EPS: float = 1e-6  # denominator guard of the disentanglement score
EVAL_LOGIT_RTOL: float = 1e-4  # same semantics as tasks.rewire.check_equivalence
EVAL_EXEMPLARS: int = 8  # top images per channel in the exemplar grid
EVAL_EXEMPLAR_MIN_SIDE: int = 96  # exemplar images are upsampled (nearest) to at least this
EVAL_FEATVIS_STEPS: int = 64  # enough for a recognisable 32 x 32 visualisation on a CPU
EVAL_FEATVIS_MAX_CHANNELS: int = 8  # the best-scoring channels get feature visualisations
EVAL_DENSITY_POINTS: int = 256  # KDE grid of Figure 2

# Preflight of `disentangle run`: fewer images than this in a class makes p (a fraction of the
# class's images) and the class-mean ARVs too coarse to be statistics; the run warns.
PREFLIGHT_MIN_IMAGES_PER_CLASS: int = 5
PREFLIGHT_TIMING_IMAGES: int = 4  # images of the timed relevance pass behind the time estimate
