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
# A split whose score is more than half one image's term dividing by less than this (the other
# concepts' positive mass is ~0 there, so the guard above, not the split, decides the ratio) is
# not eligible: one such image made a split that separates nothing score 8,093 on a real
# ResNet-20 channel.
RHO_SCORE_MIN_DENOMINATOR: float = 100 * RHO_SCORE_EPS
# Images per concept used to choose rho (the paper uses all; capped to keep CPU runs short).
RHO_MAX_IMAGES_PER_CONCEPT: int = 256

# Compositional explanations (Mu & Andreas 2020)
EXPLAIN_BEAM_WIDTH: int = 5
EXPLAIN_MAX_FORMULA_LENGTH: int = 3

# Extraction
CHUNK_IMAGES: int = 512  # images per Zarr chunk (and per completion marker)
SHARD_CHUNKS: int = 8  # chunks per Prefect shard task: thousands of images per task
BATCH_SIZE: int = 128  # a divisor of CHUNK_IMAGES keeps every batch of a chunk full
# batch_size=None: the largest divisor of CHUNK_IMAGES (<= BATCH_SIZE) whose estimated peak,
# factor x the float32 outputs of every leaf module, fits this budget and half the free memory.
AUTO_BATCH_BUDGET_BYTES: int = 3 * 2**30  # keeps extraction under 4 GB with the model and buffers
AUTO_BATCH_MEMORY_FACTOR: float = 2.0  # measured peak / estimate, see benchmarks/bench_memory.py
DECODE_WORKERS: int = 2  # threads decoding each batch's images (PIL releases the GIL)
# An image whose header declares more pixels is skipped before its pixels are decoded: a small
# file can declare gigapixels (a decompression bomb). PIL's own default, stated here so that the
# limit is a choice of the run (--max-image-pixels), not an accident of PIL's global setting.
MAX_IMAGE_PIXELS: int = 89_478_485
# Per-image channel arrays (relevance, activations) on disk; sums stay float32. float16 left
# ResNet-20/CIFAR-10 detection unchanged (benchmarks/bench_cube_size.py --dtype-effect).
STORAGE_DTYPE: str = "float16"
# Detection cube: relevance per image, moments as per-chunk class sums. True also keeps the
# per-image moments (ARVs of arbitrary image subsets, at several times the bytes).
PER_IMAGE_MOMENTS: bool = False

# Compositional explanations, image level. None: binarise each unit at the quantile that makes
# it active on as many images as one class PRESENT in the explained images has on average, and
# on at least EXPLAIN_MIN_ACTIVE_IMAGES (polysemantic_disentangle.tasks.stage5_evaluate.explain.present_quantile); the model's class
# count would leave one active image per unit on an ImageNet subset. Mu & Andreas's
# pixel-level setting is 0.995 (top 0.5 %).
EXPLAIN_ACTIVE_QUANTILE: float | None = None
EXPLAIN_MIN_ACTIVE_IMAGES: int = 5
# Concepts with fewer images than this among the explained ones are left out of formulas: with
# one image per class, "A OR B OR C" of the classes of a unit's top images always wins.
EXPLAIN_MIN_CONCEPT_IMAGES: int = 2
# A unit active on fewer images than this has an IoU that rests on a handful of images (one
# active image gives IoU 1/class size for its class): the report warns.
EXPLAIN_FEW_ACTIVE_IMAGES: int = 5
# Per-layer explanation tables: the report shows this many rows per layer (best IoU first);
# every row is in explanations.csv and summary.json.
EXPLAIN_REPORT_ROWS: int = 12
EXPLAIN_PAPER_QUANTILE: float = 0.995
EXPLAIN_UNIT_CHUNK: int = 256  # units searched together (bounds the candidate arrays' memory)

# Feature visualisation (Lucid / MACO style). CIFAR-size defaults run in seconds on a CPU;
# ImageNet models want FEATVIS_IMAGENET_SIZE and up to FEATVIS_IMAGENET_STEPS, on a GPU.
FEATVIS_SIZE: int = 32
FEATVIS_STEPS: int = 128  # the most steps; an image whose objective has converged stops earlier
FEATVIS_LR: float = 0.05
FEATVIS_IMAGENET_SIZE: int = 224
FEATVIS_IMAGENET_STEPS: int = 512
FEATVIS_MODE: str = "fourier"  # "fourier": optimise the whole spectrum; "phase": MACO
FEATVIS_DECAY_POWER: float = 1.0  # spectrum scaled by 1 / frequency ** decay_power
# Random transforms applied at every feature-visualisation step (robustness, Lucid style).
FEATVIS_JITTER: float = 1.0 / 16.0  # largest shift, as a fraction of the image side
FEATVIS_SCALE: float = 0.1  # scale drawn from [1 - s, 1 + s]
FEATVIS_ROTATE_DEGREES: float = 5.0  # rotation drawn from [-r, r]
FEATVIS_BATCH: int = 4  # transformed copies per step; the objective is averaged over them
# An image stops when the mean of its objective over the last FEATVIS_CONVERGENCE_WINDOW steps
# exceeds the mean of the window before by less than FEATVIS_CONVERGENCE_TOL of its magnitude
# (featvis.converged), at most FEATVIS_STEPS. Measured on the 18 pictures of a CIFAR-10 ResNet-20
# run (6 rewired channels of layer3.2: original, d1, d2; benchmarks/bench_featvis.py): the
# objectives rise fast for about 90 steps, then by 1-4 % per 16 steps, and are still rising at
# 512 (128 steps reach 84 % of the 512-step value). With 16 and 5 % the images stop at the end of
# the fast phase, after 72-116 steps (median 84), at 91 % (88-95 %) of the 128-step objective:
# 70 % of the steps. A criterion of 1 % runs almost every image to 128.
FEATVIS_CONVERGENCE_WINDOW: int = 16
FEATVIS_CONVERGENCE_TOL: float = 0.05
# Images optimised together are cut into passes whose estimated autograd memory (the leaf
# outputs up to the deepest target, x AUTO_BATCH_MEMORY_FACTOR, x FEATVIS_BATCH copies) fits this.
FEATVIS_MEMORY_BUDGET_BYTES: int = 2**30

# Evaluation (Table 1, scores, figures) and the report
# Images whose original channel's spatial sum |orig| is below this fraction of the channel's
# median |orig| over the evaluation images are left out of the ratio statistics: a ratio x/orig
# with orig near zero is dominated by rounding and would swamp every mean.
EVAL_MIN_ABS_ORIG_FRACTION: float = 0.01
EVAL_SCORE_EPS: float = 1e-6  # denominator guard of the disentanglement score
EVAL_LOGIT_RTOL: float = 1e-4  # same semantics as polysemantic_disentangle.tasks.stage4_rewire.rewire.check_equivalence
EVAL_EXEMPLARS: int = 8  # top images per channel in the exemplar grid
# Exemplar thumbnails have this side: small images (CIFAR 32 x 32) are enlarged by an integer
# factor (pixel replication, stays sharp), larger ones (ImageNet 224) reduced; a 224-pixel
# grid of 24 photos is about 2 MB of PNG, a 64-pixel one about 0.2 MB.
EVAL_EXEMPLAR_SIDE: int = 64
EVAL_FEATVIS_SIDE: int = 128  # feature visualisations in the report grid
# the best-scoring rewired channels get feature visualisations (at most FEATVIS_STEPS steps each)
FEATVIS_CHANNELS: int = 6
EVAL_DENSITY_POINTS: int = 256  # KDE grid of Figure 2
# Figure 3 draws at most this many candidate pairs (an even sample; its Spearman uses them all).
FIGURE3_MAX_DRAWN: int = 20_000
# Statistics resting on fewer images than this say so (n beside them, a warning).
EVAL_FEW_IMAGES: int = 5
# Table 1's per-image ratios x/orig explode where the original pre-BN activation crosses zero
# on the concept images: a concept is flagged when at least this share of its images has
# orig <= 0, or when the own ratio's spread exceeds EVAL_RATIO_SPREAD_LIMIT times
# max(1, |median|). Flagged concepts are read through the positive-mass shares
# sum_i pos(d)_i / sum_i pos(orig)_i, which divide by no per-image value.
EVAL_SIGN_CROSSING_FRACTION: float = 0.1
EVAL_RATIO_SPREAD_LIMIT: float = 5.0

# Detection diagnostics: images read from the cube (whole chunks, spread over it) to count
# important channels per image at tau and at the smaller taus below; no model pass.
DETECT_DIAGNOSTIC_IMAGES: int = 20_000
DETECT_DIAGNOSTIC_TAUS: tuple[float, ...] = (0.01, 0.003)
# A layer whose median image has fewer important channels than this at tau "has (almost) no
# important channels": the report shows what the smaller taus give.
DETECT_FEW_IMPORTANT: float = 1.0
# Fewer images per class than this: p is coarse (with one image it is 0 or 1) and ARVs are
# means of a few images; detection says so.
DETECT_FEW_IMAGES_PER_CLASS: int = 10

# Size limits of what is written for a browser and for the orchestrator.
# Prefect 3.8.8 drops any event whose JSON exceeds PREFECT_EVENTS_MAXIMUM_SIZE_BYTES, default
# 1,500,000 bytes (prefect/server/events/messaging.py, "Refusing to publish event of size");
# an artifact's data travels in such an event, so each artifact stays under 1 MB, leaving room
# for the envelope and JSON escaping.
PREFECT_EVENT_MAX_BYTES: int = 1_500_000
ARTIFACT_MAX_BYTES: int = 1_000_000
# report.html embeds figures for the best REPORT_EMBED_CHANNELS channels; the others' figures
# are PNG files beside it, linked. The page is kept under REPORT_MAX_BYTES.
REPORT_EMBED_CHANNELS: int = 12
REPORT_MAX_BYTES: int = 8_000_000

# Preflight of `disentangle run`: fewer images than this in a class makes p (a fraction of the
# class's images) and the class-mean ARVs too coarse to be statistics; the run warns.
PREFLIGHT_MIN_IMAGES_PER_CLASS: int = 5
PREFLIGHT_TIMING_IMAGES: int = 4  # images of the timed relevance pass behind the time estimate

# Detection's selection rule and table size (Hesse et al.'s rule is "gamma"; the others are
# this project's: "lowest-k" keeps each layer's DETECT_K lowest-cosine pairs, "quantile" the
# pairs at or below DETECT_QUANTILE of the layer's candidate-pair cosines).
DETECT_RULE: str = "gamma"
DETECT_K: int = 3
DETECT_QUANTILE: float = 0.1
# Pairs kept as table rows per layer (the selected ones first); counts stay exact.
DETECT_MAX_PAIRS_PER_LAYER: int = 2000

# `disentangle run`: evaluation images of the rewired network's logit-equivalence check.
EQUIVALENCE_CHECK_IMAGES: int = 1024
