"""How polysemanticity changes from one checkpoint to the next: a comparison of analysed runs.

Pure functions over what `disentangle-all-layers` wrote into each run directory
(``detection.json``, ``summary.json``, ``checkpoint.json`` and, where a number is not in those
files, the evaluation cube); nothing here runs a model.

A comparison needs two or more runs of one architecture (same model, same conv layers with the
same channel counts). The runs are ordered by the checkpoint's training ``step`` (or ``epoch``)
when every checkpoint carries one, else by the checkpoint files' modification times, else as
given. It reports, per layer and checkpoint, the detection counts, the candidate-pair ARV
cosine quartiles and the mean disentanglement score of the rewired channels; per channel
(layer, channel index) its relevant classes, whether it is polysemantic under the run's rule and
for which pair, and its lowest cosine; the channels that became polysemantic, stopped being so
or changed their pair between consecutive checkpoints; and each checkpoint's top-1 accuracy on
the evaluation images.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from polysemantic_disentangle.tasks.run_folder import RunFolder, TrendFolder
from polysemantic_disentangle.tasks.stage3_detect.records import DetectionResult, PairRow
from polysemantic_disentangle.tasks.stage5_evaluate.records import Evaluation

TREND_FORMAT = "disentangle-trend/1"
# Keys of a saved training checkpoint that give its position in training.
STEP_KEYS = ("step", "global_step")
EPOCH_KEYS = ("epoch",)
# Run parameters that change what detection finds; runs that differ in them are compared with a
# warning naming them.
COMPARED_PARAMS = ("tau", "p", "gamma", "cosine_lower_bound", "rule", "k", "quantile",
                   "max_pairs_per_layer", "correct_only", "target_mode", "train_dir", "eval_dir",
                   "max_per_class_train", "max_per_class_eval", "rewire_layers", "max_rewired_per_layer")


class ArchitectureMismatch(ValueError):
    """The runs are not of one architecture; their channels cannot be matched."""


class IncompleteRun(ValueError):
    """A run directory lacks the files of a finished analysis."""


# ---------------------------------------------------------------------------------------------
# the checkpoint record (written at analysis time)


@dataclass
class CheckpointInfo:
    """What a comparison needs to know of the checkpoint a run analysed."""

    path: str | None = None
    sha256: str | None = None
    step: int | None = None
    epoch: float | None = None
    mtime: float | None = None
    size: int | None = None
    model: str | None = None
    # every conv of the model as [name, weight shape]: two runs match only on all of them,
    # not just on the analysed layers (ResNet-20 and ResNet-56 share their first layer names)
    architecture: list[list[Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CheckpointInfo":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _number(value: Any) -> float | None:
    try:
        import torch

        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def training_position(path: str | Path) -> tuple[int | None, float | None]:
    """(step, epoch) saved in a checkpoint dict, None where absent. Loaded with
    ``weights_only=True`` (memory-mapped where the file format allows), so only tensors and
    plain containers are read."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:  # the legacy (pre-zip) format cannot be memory-mapped
        if "mmap" not in str(exc):
            raise
        obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        return None, None
    step = next((_number(obj[k]) for k in STEP_KEYS if _number(obj.get(k)) is not None), None)
    epoch = next((_number(obj[k]) for k in EPOCH_KEYS if _number(obj.get(k)) is not None), None)
    return (int(step) if step is not None else None), epoch


def conv_architecture(model: Any) -> list[list[Any]]:
    """[name, weight shape, groups] of every conv of ``model``, in module order."""
    from torch import nn

    return [[name, list(m.weight.shape), int(m.groups)] for name, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd)]


def checkpoint_info(model_name: str, weights: str | None, model: Any) -> CheckpointInfo:
    """The record of the checkpoint a run analyses (``model``: the loaded network)."""
    info = CheckpointInfo(model=model_name, architecture=conv_architecture(model))
    if weights and Path(weights).is_file():
        from polysemantic_disentangle.tasks.data.assets import sha256_file

        st = Path(weights).stat()
        info.path, info.mtime, info.size = str(Path(weights).resolve()), st.st_mtime, st.st_size
        info.sha256 = sha256_file(weights)
        info.step, info.epoch = training_position(weights)
    else:
        info.path = weights
    return info


def write_checkpoint_record(out_dir: str | Path, info: CheckpointInfo) -> Path:
    return RunFolder(out_dir).write_checkpoint_record(info)


# ---------------------------------------------------------------------------------------------
# typed results


@dataclass
class CheckpointEntry:
    """One analysed checkpoint, in comparison order."""

    index: int
    label: str
    run_dir: str
    checkpoint: str | None
    sha256: str | None
    step: int | None
    epoch: float | None
    mtime: float | None
    accuracy: float | None
    accuracy_n: int | None
    accuracy_source: str | None
    report: str | None


@dataclass
class LayerPoint:
    """One layer at one checkpoint."""

    channels: int
    applicable: bool
    candidates: int
    candidate_pairs: int
    paper_pairs: int  # the paper's default: 0 <= cosine < 0.5
    selected_pairs: int  # the run's rule
    selected_channels: int
    cosine_q1: float | None
    cosine_median: float | None
    cosine_q3: float | None
    cosine_rows: int  # pairs the quartiles are computed from
    cosines_complete: bool  # False: detection kept a sample of the pairs (max_pairs_per_layer)
    rewired_channels: int
    score_mean: float | None  # mean disentanglement score of the rewired channels


@dataclass
class LayerTrend:
    layer: str
    channels: int
    points: list[LayerPoint]


@dataclass
class ChannelPoint:
    """One channel at one checkpoint."""

    relevant: list[str]  # relevant class names
    candidate: bool
    polysemantic: bool  # at least one pair selected by the run's rule
    pair: list[str] | None  # its lowest-cosine selected pair
    pair_cosine: float | None
    paper_polysemantic: bool
    lowest_cosine: float | None  # over its candidate pairs (None: not a candidate)
    lowest_pair: list[str] | None


@dataclass
class ChannelTrend:
    layer: str
    channel: int
    points: list[ChannelPoint]


@dataclass
class ChannelChange:
    """What changed for one channel between checkpoint ``before`` and ``after`` (indices)."""

    layer: str
    channel: int
    kind: str  # "became-polysemantic", "stopped", "changed-pair"
    before: int
    after: int
    pair_before: list[str] | None
    pair_after: list[str] | None
    cosine_before: float | None
    cosine_after: float | None


@dataclass
class Trend:
    checkpoints: list[CheckpointEntry]
    layers: list[LayerTrend]
    channels: list[ChannelTrend]
    changes: list[ChannelChange]
    order_by: str  # "step", "epoch", "mtime" or "given"
    model: str | None
    params: dict[str, Any]  # the parameters of the first run
    differing_params: dict[str, list[Any]]  # name -> value per checkpoint
    warnings: list[str]
    fingerprint: str  # of the inputs: equal fingerprints, equal trend
    created: str = ""
    format: str = TREND_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return _clean(asdict(self))

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Trend":
        if d.get("format") != TREND_FORMAT:
            raise ValueError(f"not a {TREND_FORMAT} document (format {d.get('format')!r})")
        return cls(
            checkpoints=[CheckpointEntry(**c) for c in d["checkpoints"]],
            layers=[LayerTrend(x["layer"], x["channels"], [LayerPoint(**p) for p in x["points"]])
                    for x in d["layers"]],
            channels=[ChannelTrend(x["layer"], x["channel"], [ChannelPoint(**p) for p in x["points"]])
                      for x in d["channels"]],
            changes=[ChannelChange(**c) for c in d["changes"]],
            order_by=d["order_by"], model=d.get("model"), params=dict(d.get("params") or {}),
            differing_params={k: list(v) for k, v in (d.get("differing_params") or {}).items()},
            warnings=list(d.get("warnings") or []), fingerprint=d["fingerprint"],
            created=d.get("created", ""), format=d["format"])

    @classmethod
    def from_json(cls, text: str) -> "Trend":
        return cls.from_dict(json.loads(text))

    def layer(self, name: str) -> LayerTrend:
        return next(x for x in self.layers if x.layer == name)

    def channel(self, layer: str, channel: int) -> ChannelTrend:
        return next(x for x in self.channels if x.layer == layer and x.channel == channel)


def _clean(x: Any) -> Any:
    """Strict JSON: NaN and infinities as null, numpy scalars as Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


# ---------------------------------------------------------------------------------------------
# reading one run


@dataclass
class RunFiles:
    """The parsed files of one analysed run directory."""

    run_dir: Path
    detection: DetectionResult
    summary: dict[str, Any]  # the report's data (summary.json); its evaluation is ``evaluation``
    checkpoint: CheckpointInfo
    evaluation: Evaluation | None = None  # None when nothing was rewired

    @property
    def params(self) -> dict[str, Any]:
        detection = self.detection.params.to_dict() if self.detection.params is not None else {}
        return {**(self.summary.get("params") or {}), **detection}

    @property
    def model(self) -> str | None:
        return self.checkpoint.model or self.params.get("model")

    @property
    def layer_shapes(self) -> list[tuple[str, int]]:
        return [(s.layer, int(s.channels)) for s in self.detection.layers]


def read_run(run_dir: str | Path) -> RunFiles:
    """The files of one finished analysis; IncompleteRun names what is missing."""
    run = Path(run_dir)
    folder = RunFolder(run)
    missing = folder.missing_analysis_files()
    if missing:
        raise IncompleteRun(f"{run} is not a finished analysis: no {', '.join(missing)}")
    detection = folder.read_detection(DetectionResult)
    summary = folder.read_summary()
    evaluation = Evaluation.from_dict(summary["evaluation"]) if summary.get("evaluation") else None
    info = folder.read_checkpoint_record(CheckpointInfo)
    if info is None:
        # an analysis made before checkpoint records: what summary.json and the file still tell
        weights = (summary.get("params") or {}).get("weights")
        info = CheckpointInfo(path=weights, model=(summary.get("params") or {}).get("model"))
        if weights and Path(weights).is_file():
            info.mtime = Path(weights).stat().st_mtime
            info.step, info.epoch = training_position(weights)
    return RunFiles(run, detection, summary, info, evaluation)


def _quartiles(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], float)
    if v.size == 0:
        return None, None, None
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return float(q1), float(med), float(q3)


def _layer_points(run: RunFiles) -> dict[str, LayerPoint]:
    aggregate = run.evaluation.table1_aggregate if run.evaluation else {}
    agg = {a["layer"]: a for a in aggregate.get("layers", [])}
    out = {}
    for summ, det in zip(run.detection.layers, run.detection.detections, strict=True):
        cosines = [r.cosine for r in det.pairs]
        q1, med, q3 = _quartiles(cosines)
        a = agg.get(det.layer) or {}
        out[det.layer] = LayerPoint(
            channels=int(summ.channels), applicable=bool(summ.applicable),
            candidates=int(summ.candidates), candidate_pairs=int(summ.pairs),
            paper_pairs=int(summ.paper_polysemantic_pairs), selected_pairs=int(summ.selected_pairs),
            selected_channels=int(summ.selected_channels), cosine_q1=q1, cosine_median=med,
            cosine_q3=q3, cosine_rows=len([c for c in cosines if c is not None and math.isfinite(c)]),
            cosines_complete=len(det.pairs) == int(summ.pairs),
            rewired_channels=int(a.get("channels") or 0), score_mean=a.get("score_mean"))
    return out


def _class_names(run: RunFiles) -> dict[int, str]:
    names: dict[int, str] = {}
    for det in run.detection.detections:
        for r in det.pairs:
            names[r.class1], names[r.class2] = r.name1, r.name2
    names.update(enumerate(run.detection.class_names or []))
    return names


def _channel_points(run: RunFiles) -> dict[tuple[str, int], ChannelPoint]:
    names = _class_names(run)
    out: dict[tuple[str, int], ChannelPoint] = {}
    for det in run.detection.detections:
        # every channel's relevant classes where the run recorded them, else the candidates'
        relevant = det.relevant_all or det.relevant
        by_channel: dict[int, list[PairRow]] = {}
        for r in det.pairs:
            by_channel.setdefault(int(r.channel), []).append(r)
        candidates = set(det.candidates)
        for c in sorted(set(relevant) | candidates | set(by_channel)):
            rows = [r for r in by_channel.get(c, []) if r.cosine is not None and math.isfinite(r.cosine)]
            low = min(rows, key=lambda r: r.cosine) if rows else None
            sel = [r for r in rows if r.selected]
            best = min(sel, key=lambda r: r.cosine) if sel else None
            out[(det.layer, c)] = ChannelPoint(
                relevant=[names.get(int(t), str(t)) for t in relevant.get(c, [])], candidate=c in candidates,
                polysemantic=best is not None, pair=[best.name1, best.name2] if best else None,
                pair_cosine=best.cosine if best else None,
                paper_polysemantic=any(r.paper_polysemantic for r in rows),
                lowest_cosine=low.cosine if low else None,
                lowest_pair=[low.name1, low.name2] if low else None)
    return out


def run_accuracy(run: RunFiles) -> tuple[float | None, int | None, str | None]:
    """Top-1 accuracy of the analysed checkpoint on the evaluation images: the evaluation
    stage's number when it ran (rewired channels), else from the evaluation cube's labels and
    predictions (images that failed to decode left out)."""
    acc = run.evaluation.accuracy if run.evaluation else {}
    if acc.get("accuracy_original") is not None:
        return float(acc["accuracy_original"]), int(acc["n"]), RunFolder(run.run_dir).summary_json.name
    store = (run.summary.get("params") or {}).get("eval_store")
    if not store:
        return None, None, None
    from polysemantic_disentangle.storage.cube import CubeReader, store_exists

    if not store_exists(store):
        return None, None, None
    cube = CubeReader(store)
    labels, pred, skipped = cube.labels(), cube.predictions(), cube.skipped()
    ok = ~skipped & (pred >= 0)
    if not ok.any():
        return None, 0, "evaluation cube"
    return float((labels[ok] == pred[ok]).mean()), int(ok.sum()), "evaluation cube"


# ---------------------------------------------------------------------------------------------
# the comparison


def check_architecture(runs: Sequence[RunFiles]) -> None:
    """Raise ArchitectureMismatch unless every run is of one architecture."""
    first = runs[0]

    def describe(r: RunFiles) -> str:
        return f"{r.run_dir} ({r.model})"

    for r in runs[1:]:
        problems = []
        if r.model != first.model:
            problems.append(f"model {first.model} vs {r.model}")
        if r.checkpoint.architecture and first.checkpoint.architecture and \
                r.checkpoint.architecture != first.checkpoint.architecture:
            a = {x[0]: x[1] for x in first.checkpoint.architecture}
            b = {x[0]: x[1] for x in r.checkpoint.architecture}
            only = sorted(set(a) ^ set(b))
            shapes = sorted(k for k in set(a) & set(b) if a[k] != b[k])
            problems.append(f"{len(a)} vs {len(b)} convs" + (f"; convs in one only: {', '.join(only[:5])}"
                                                            + (" ..." if len(only) > 5 else "") if only else "")
                            + (f"; other shapes: {', '.join(shapes[:5])}" if shapes else ""))
        if r.layer_shapes != first.layer_shapes:
            la, lb = dict(first.layer_shapes), dict(r.layer_shapes)
            diff = sorted(set(la) ^ set(lb)) + sorted(k for k in set(la) & set(lb) if la[k] != lb[k])
            problems.append("analysed layers or channel counts differ: " + ", ".join(diff[:6]))
        if problems:
            raise ArchitectureMismatch(
                f"cannot compare runs of different architectures: {describe(first)} and {describe(r)}: "
                + "; ".join(problems) + ". Compare checkpoints of one network, analysed on the same layers.")


def differing_params(runs: Sequence[RunFiles]) -> dict[str, list[Any]]:
    out = {}
    for name in COMPARED_PARAMS:
        values = [r.params.get(name) for r in runs]
        if any(json.dumps(v, sort_keys=True) != json.dumps(values[0], sort_keys=True) for v in values):
            out[name] = values
    return out


def order_runs(runs: Sequence[RunFiles]) -> tuple[list[RunFiles], str]:
    """By training step when every checkpoint has one, else by epoch, else by the checkpoint
    files' modification times, else as given (Python's sort is stable: ties keep their order)."""
    for key in ("step", "epoch", "mtime"):
        values = [getattr(r.checkpoint, key) for r in runs]
        if all(v is not None for v in values):
            return sorted(runs, key=lambda r: getattr(r.checkpoint, key)), key
    return list(runs), "given"


def _label(run: RunFiles) -> str:
    name = Path(run.checkpoint.path).name if run.checkpoint.path else run.run_dir.name
    if run.checkpoint.step is not None:
        return f"{name} (step {run.checkpoint.step})"
    if run.checkpoint.epoch is not None:
        return f"{name} (epoch {run.checkpoint.epoch:g})"
    return name


def input_fingerprint(run_dirs: Sequence[str | Path]) -> str:
    """Changes when any input file of any run changes (name, size, mtime), or the set of runs."""
    import hashlib

    parts = []
    for d in sorted(str(Path(x).resolve()) for x in run_dirs):
        for p in RunFolder(d).inputs_of_trend():
            st = p.stat() if p.is_file() else None
            parts.append(f"{d}/{p.name}:{st.st_size if st else '-'}:{st.st_mtime_ns if st else '-'}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _changes(channels: Sequence[ChannelTrend]) -> list[ChannelChange]:
    out = []
    for ch in channels:
        for i in range(1, len(ch.points)):
            a, b = ch.points[i - 1], ch.points[i]
            kind = None
            if not a.polysemantic and b.polysemantic:
                kind = "became-polysemantic"
            elif a.polysemantic and not b.polysemantic:
                kind = "stopped"
            elif a.polysemantic and b.polysemantic and sorted(a.pair or []) != sorted(b.pair or []):
                kind = "changed-pair"
            if kind:
                out.append(ChannelChange(ch.layer, ch.channel, kind, i - 1, i, a.pair, b.pair,
                                         a.pair_cosine, b.pair_cosine))
    return out


def compare_runs(run_dirs: Sequence[str | Path], *, warn: bool = True) -> Trend:
    """The trend over the analysed runs in ``run_dirs`` (two or more, one architecture).

    Raises IncompleteRun for a directory without a finished analysis and ArchitectureMismatch
    for runs of different networks, both before anything is computed. Runs whose detection or
    data parameters differ are compared, with a warning that names the parameters."""
    if len(run_dirs) < 2:
        raise ValueError(f"a comparison needs at least two analysed runs, got {len(run_dirs)}")
    runs = [read_run(d) for d in run_dirs]
    check_architecture(runs)
    runs, order_by = order_runs(runs)
    differing = differing_params(runs)
    notes = []
    if differing:
        notes.append("runs differ in parameters that change what detection finds: "
                     + "; ".join(f"{k} ({', '.join(json.dumps(v) for v in vals)})" for k, vals in differing.items())
                     + ". Changes between checkpoints may come from the parameters, not from training.")
        if warn:
            warnings.warn(notes[-1], stacklevel=2)
    if order_by in ("mtime", "given"):
        notes.append(f"checkpoints carry no training step or epoch; ordered by {'modification time' if order_by == 'mtime' else 'the order given'}")

    entries = []
    for i, r in enumerate(runs):
        acc, n, source = run_accuracy(r)
        report = RunFolder(r.run_dir).report_html
        entries.append(CheckpointEntry(
            index=i, label=_label(r), run_dir=str(r.run_dir.resolve()), checkpoint=r.checkpoint.path,
            sha256=r.checkpoint.sha256, step=r.checkpoint.step, epoch=r.checkpoint.epoch,
            mtime=r.checkpoint.mtime, accuracy=acc, accuracy_n=n, accuracy_source=source,
            report=str(report.resolve()) if report.is_file() else None))

    per_run_layers = [_layer_points(r) for r in runs]
    layers = [LayerTrend(name, channels, [p[name] for p in per_run_layers])
              for name, channels in runs[0].layer_shapes]
    per_run_channels = [_channel_points(r) for r in runs]
    keys = sorted(set().union(*per_run_channels),
                  key=lambda k: ([n for n, _ in runs[0].layer_shapes].index(k[0]), k[1]))
    empty = ChannelPoint([], False, False, None, None, False, None, None)
    channels = [ChannelTrend(layer, c, [p.get((layer, c), empty) for p in per_run_channels])
                for layer, c in keys]
    return Trend(checkpoints=entries, layers=layers, channels=channels, changes=_changes(channels),
                 order_by=order_by, model=runs[0].model, params=runs[0].params, differing_params=differing,
                 warnings=notes, fingerprint=input_fingerprint([r.run_dir for r in runs]),
                 created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))


def read_trend(out_dir: str | Path) -> Trend | None:
    path = TrendFolder(out_dir).trend_json
    if not path.is_file():
        return None
    try:
        return Trend.from_json(path.read_text())
    except (ValueError, KeyError, TypeError):
        return None
