"""Parameters of `disentangle-all-layers`, validated before any work.

The embedded default is the CIFAR-10 demo (``tasks/presets.DEMO_MODEL``): the training JPEGs
for detection, the test JPEGs for evaluation, every conv layer. Method defaults come from
``tasks/defaults.py``; ``gamma``, ``rewire_layers`` and ``max_rewired_per_layer`` left unset
come from the model's preset (``tasks/presets.py``). What the paper's default finds is always
reported too (the ``paper_polysemantic`` column of the detection table).

This module imports neither torch nor Prefect (the command line's help and the parameter
check stay instant); the detection parameters' check lives in ``tasks/stage3_detect/params.py``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.models.names import (available_models, close_model_names, is_model_reference,
                                                        is_timm_name, model_reference, names_no_file)
from polysemantic_disentangle.tasks.presets import DEMO_MODEL, preset_for
from polysemantic_disentangle.tasks.run_folder import EVAL_CUBE, TRAIN_CUBE
from polysemantic_disentangle.tasks.stage1_extract.precision import DEFAULT_PRECISION, Precision, check_precision
from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams, SelectionRule



def check_device(device: str) -> str:
    """``device`` when it names one (auto, or cpu, cuda, mps, xpu with an optional :N): checked
    here, without torch, so that a bad name fails before the imports and the run's lock, not
    inside the preflight."""
    if not re.fullmatch(r"auto|(cpu|cuda|mps|xpu)(:\d+)?", device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N (or mps, xpu), got {device!r}")
    return device


def check_model_name(name: str) -> str:
    """``name`` when the registry has it (a reference or a timm name: its canonical form), else a
    ValueError that suggests the close names. A timm name is checked by timm itself (imported
    here): unknown names and a missing timm fail before any work."""
    if is_timm_name(name):
        # timm is imported only for a timm name, and only here
        from polysemantic_disentangle.tasks.models.timm_models import check_timm_name

        return check_timm_name(name)
    if is_model_reference(name):
        return str(model_reference(name))
    names = available_models()
    if name in names:
        return name
    close = close_model_names(name, names)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (`disentangle models` lists them all)")

PRESET_FIELDS = ("gamma", "rewire_layers", "max_rewired_per_layer")
_POSITIVE_COUNTS = ("max_per_class_train", "max_per_class_eval", "max_rewired_per_layer", "rho_max_images",
                    "check_images", "chunk_images", "shard_chunks", "batch_size")
_NON_NEGATIVE_COUNTS = ("featvis_channels", "featvis_steps")  # 0: no feature visualisation
_PRESET = "default: the model's preset (tasks/presets.py)"


class PipelineParams(BaseModel):
    # A misspelt parameter (say, in `prefect deployment run -p`) must fail, not be ignored.
    model_config = ConfigDict(extra="forbid")

    model: str = Field(DEMO_MODEL, description="registry name (`disentangle models` lists them): cifar_resnet20/32/44/56, efficientnet_lite0, a torchvision classifier; or package.module:callable, a callable returning an nn.Module or a ModelSpec (a bare module's class names: append ?classes=<file>, or --classes); or timm/<name>, a timm model (the timm extra; random weights or --weights)")
    weights: str | None = Field(None, description="checkpoint path (state dict, loaded with weights_only=True, or safetensors); default: the model's public weights")
    train_dir: str | None = Field(None, description="ImageFolder used for detection (default for CIFAR models: CIFAR-10 train)")
    eval_dir: str | None = Field(None, description="ImageFolder used for evaluation (default for CIFAR models: CIFAR-10 test)")
    layers: str | list[str] = Field("all", description="conv layers to analyse: 'all', names or glob patterns")
    tau: float = Field(defaults.TAU, description="a channel is important for an image if its relevance is at least tau times the sum of the layer's positive relevance")
    p: float = Field(defaults.P_FRACTION, description="a channel is relevant for a class if important for at least this fraction of the class's images")
    gamma: float | None = Field(None, description=f"ARV cosine threshold of the gamma rule (the paper: {defaults.GAMMA}); {_PRESET}")
    cosine_lower_bound: float = Field(defaults.COSINE_LOWER_BOUND, description="pairs below this ARV cosine are not counted (the published code's bound)")
    rule: SelectionRule = Field(defaults.DETECT_RULE, description="pair selection: gamma: cosine below gamma; lowest-k: the k lowest-cosine pairs per layer; quantile: pairs at or below that quantile of the layer's cosines")
    k: int = Field(defaults.DETECT_K, description="pairs per layer of rule lowest-k")
    quantile: float = Field(defaults.DETECT_QUANTILE, description="cosine quantile of rule quantile")
    max_pairs_per_layer: int = Field(defaults.DETECT_MAX_PAIRS_PER_LAYER, description="detection-table rows kept per layer (counts stay exact)")
    correct_only: bool = Field(False, description="statistics over correctly classified images only")
    rewire_layers: str | list[str] | None = Field(None, description=f"layers whose selected channels are rewired: 'all', 'auto' (every layer where the rule found pairs) or names/globs; {_PRESET}")
    max_rewired_per_layer: int | None = Field(None, description=f"lowest-cosine channels rewired per layer (none: no bound); {_PRESET}")
    seed: int = Field(0, description="seed of randomly initialised weights (recorded in every store)")
    overwrite: bool = Field(False, description="replace stores made from other inputs")
    rho_grid: list[float] = Field(default_factory=lambda: list(defaults.RHO_GRID), description="candidate rho values of the rewiring, in (0, 1]")
    rho_max_images: int = Field(defaults.RHO_MAX_IMAGES_PER_CONCEPT, description="images per concept used to choose rho")
    check_images: int = Field(defaults.EQUIVALENCE_CHECK_IMAGES, description="evaluation images of the check that the rewired network keeps the original logits")
    out_dir: str = Field("runs/default", description="output folder (local path or fsspec URL): report, tables, stores")
    train_store: str | None = Field(None, description=f"Zarr store URL (local path or fsspec URL); default <out_dir>/{TRAIN_CUBE}")
    eval_store: str | None = Field(None, description=f"Zarr store URL of the evaluation cube; default <out_dir>/{EVAL_CUBE}")
    device: str = Field("auto", description="auto (CUDA when present), cpu, cuda, cuda:N")
    precision: Precision = Field(DEFAULT_PRECISION, description="fp32, or bf16 autocast (refused while it changes what detection finds)")
    chunk_images: int = Field(defaults.CHUNK_IMAGES, description="images per Zarr chunk (and per completion marker)")
    shard_chunks: int = Field(defaults.SHARD_CHUNKS, description="chunks per extraction task")
    batch_size: int = Field(defaults.BATCH_SIZE, description="images per forward pass")
    per_image_moments: bool = Field(defaults.PER_IMAGE_MOMENTS, description="detection cube also keeps per-image input moments (ARVs of any image subset)")
    storage_dtype: Literal["float16", "float32"] = Field(defaults.STORAGE_DTYPE, description="dtype of per-image relevance/activations on disk")
    dask_address: str | None = Field(None, description="existing Dask scheduler, e.g. tcp://10.0.0.5:8786: runs the extraction shards and the reductions")
    dask_workers: int | None = Field(None, description="start a local Dask cluster of N worker processes for this run (instead of dask_address)")
    target_mode: Literal["label", "prediction"] = Field("label", description="label: attribute and group by the folder label; prediction: by the model's prediction (any folder names)")
    max_per_class_train: int | None = Field(None, description="use at most N images per class of train_dir (default: all)")
    max_per_class_eval: int | None = Field(None, description="use at most N images per class of eval_dir (default: all)")
    max_image_pixels: int = Field(defaults.MAX_IMAGE_PIXELS, gt=0, description="an image whose header declares more pixels is skipped (with its reason) before it is decoded: a guard against decompression bombs")
    featvis_channels: int = Field(defaults.FEATVIS_CHANNELS, description="rewired channels that get feature visualisations")
    featvis_steps: int = Field(defaults.FEATVIS_STEPS, description="optimisation steps of each feature visualisation")
    explain_quantile: float | None = Field(
        defaults.EXPLAIN_ACTIVE_QUANTILE, gt=0, lt=1,
        description="activation quantile at which explanations binarise a unit; default: about one present "
                    f"class's worth of the evaluation images active, at least {defaults.EXPLAIN_MIN_ACTIVE_IMAGES}")

    @field_validator("model")
    @classmethod
    def _model(cls, v: str) -> str:
        return check_model_name(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("precision")
    @classmethod
    def _precision(cls, v: str) -> str:
        return check_precision(v)

    @field_validator("rho_grid")
    @classmethod
    def _rho_grid(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < r <= 1 for r in v):
            raise ValueError("rho_grid values must lie in (0, 1]")
        return sorted(set(float(r) for r in v))

    @model_validator(mode="before")
    @classmethod
    def _preset(cls, data: object) -> object:
        """Unset model-dependent parameters come from the model's preset."""
        if isinstance(data, dict):
            data = dict(data)
            preset = preset_for(str(data.get("model") or DEMO_MODEL))
            for name in PRESET_FIELDS:
                if data.get(name) is None:
                    data[name] = getattr(preset, name)
                    if name == "rewire_layers":
                        data[name] = preset.rewire_layers_for(data.get("layers", "all"))
        return data

    @model_validator(mode="after")
    def _check(self) -> "PipelineParams":
        self.detection()  # raises ValueError with every problem in tau, p, gamma, ...
        if self.correct_only and self.target_mode == "prediction":
            raise ValueError("correct_only needs dataset labels; it does not apply to target_mode='prediction'")
        # Counts a later stage divides by or loops over: a zero would surface only there, after
        # the extraction (rho_max_images at the rewiring, check_images in its equivalence check).
        problems = []
        for name in _POSITIVE_COUNTS:
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be positive, got {value}")
        for name in _NON_NEGATIVE_COUNTS:
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if problems:
            raise ValueError("; ".join(problems))
        from polysemantic_disentangle.flows.runtime.cluster import validate_cluster_choice

        validate_cluster_choice(self.dask_address, self.dask_workers)
        return self

    def store_layouts(self) -> dict[str, dict[str, Any]]:
        """Layout arguments of the two cubes (``polysemantic_disentangle.storage.cube.CubeLayout.preset``), used by the
        extraction and by the preflight that creates the stores: the detection cube keeps what
        the statistics need, the evaluation cube what evaluation reads."""
        return {"train": {"layout": "detection", "per_image_moments": self.per_image_moments,
                          "storage_dtype": self.storage_dtype},
                "eval": {"layout": "evaluation", "per_image_moments": False,
                         "storage_dtype": self.storage_dtype}}

    def detection(self) -> DetectionParams:
        return DetectionParams(tau=self.tau, p=self.p, gamma=self.gamma,
                               cosine_lower_bound=self.cosine_lower_bound, rule=self.rule, k=self.k,
                               quantile=self.quantile, max_pairs_per_layer=self.max_pairs_per_layer)

    def resolved(self) -> "PipelineParams":
        """Fill data and store defaults; CIFAR data comes from the assets or a checked download."""
        updates = {}
        if self.train_dir is None or self.eval_dir is None:
            if not self.model.startswith("cifar_"):
                raise ValueError(f"train_dir and eval_dir are required for model {self.model!r}")
            from polysemantic_disentangle.tasks.data.cifar10 import cifar10_image_folder

            updates["train_dir"] = self.train_dir or str(cifar10_image_folder("train"))
            updates["eval_dir"] = self.eval_dir or str(cifar10_image_folder("test"))
        for name in ("train_dir", "eval_dir"):
            value = updates.get(name, getattr(self, name))
            if not Path(value).is_dir():
                raise ValueError(f"{name} {value} is not a directory")
        if self.weights is not None and not names_no_file(self.weights):
            from polysemantic_disentangle.tasks.models.safe_load import check_checkpoint_file

            # Before any model is built: a path that is no checkpoint is refused by what it is,
            # never by its contents.
            check_checkpoint_file(self.weights, f"a state dict for {self.model}")
        from polysemantic_disentangle.flows.runtime.outputs import join

        updates["train_store"] = self.train_store or join(self.out_dir, TRAIN_CUBE)
        updates["eval_store"] = self.eval_store or join(self.out_dir, EVAL_CUBE)
        return self.model_copy(update=updates)
