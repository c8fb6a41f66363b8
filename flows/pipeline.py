"""`disentangle-all-layers`: extract -> reduce -> detect -> rewire -> evaluate -> report.

Every stage is a coarse task fed by store paths and small JSON-able values. A stage whose
inputs (content hashes of checkpoint, data manifest and parameters) are unchanged is not
recomputed: ``run_stage`` reads its result back from the run directory (see
``flows/runtime/stage_cache.py``) once every output it names is verified, and the stage shows
in the UI as a Cached task run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, State

from polysemantic_disentangle import api
from polysemantic_disentangle.flows.runtime.cluster import cluster_address
from polysemantic_disentangle.flows.extract import extract_relevance_cube, validate_extraction
from polysemantic_disentangle.flows.runtime.faults import stop_point
from polysemantic_disentangle.flows.runtime.locking import holding, run_locks
from polysemantic_disentangle.flows.runtime.outputs import RunOutputs
from polysemantic_disentangle.flows.runtime.progress import stage_progress
from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.flows.preflight import Preflight, run_preflight
from polysemantic_disentangle.flows.runtime.stage_cache import StageCache
from polysemantic_disentangle.flows.stage_results import (DetectionResult, EvaluationResult, ReduceResult, ReportResult,
                                                           RewiringResult)
from polysemantic_disentangle.storage.cube import CubeReader
from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.heap import release_free_memory
from polysemantic_disentangle.tasks.run_folder import RunFolder
from polysemantic_disentangle.tasks.stage3_detect.files import detection_record, write_pairs_csv
from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams
from polysemantic_disentangle.tasks.stage3_detect.records import LayerSummary, PairRow
from polysemantic_disentangle.tasks.stage5_evaluate.records import Evaluation
from polysemantic_disentangle.tasks.stage6_report.html_parts import data_uri
from polysemantic_disentangle.tasks.stage6_report.report import (build_summary, detection_rows, markdown_artifacts, save_figure3,
                                                                 skipped_images, write_report)
from polysemantic_disentangle.tasks.stage7_trend.trend import checkpoint_info, write_checkpoint_record

R = TypeVar("R", ReduceResult, DetectionResult, RewiringResult, EvaluationResult, ReportResult)
# Published once, by the detect stage; the report stage leaves this table out of its artifacts.
DETECTION_TABLE_ARTIFACT = "detection-per-layer"


def _png_markdown(title: str, png: bytes) -> str:
    return f"### {title}\n\n![{title}]({data_uri(png)})\n"


@task(name="reduce", cache_policy=NO_CACHE)
def reduce_task(store_url: str, tau: float, correct_only: bool, scheduler_address: str | None) -> ReduceResult:
    """Class statistics of every layer, in the store under the key of these parameters (reused
    when a run with the same key, this one or another sharing the store, made them already)."""
    with stage_progress() as progress:
        key, _ = api.keyed_class_statistics(CubeReader(store_url), tau=tau, correct_only=correct_only,
                                            scheduler_address=scheduler_address, progress=progress)
    return ReduceResult(store_url, statistics=key.to_dict())


def stats_in_store(result: ReduceResult) -> bool:
    """Whether the reduce stage's output is still there, exactly as keyed. It lives in the train
    store, not the run directory, so the record alone proves nothing: another run may have
    extracted the store again, or it never held this key's set."""
    return bool(result.statistics) and api.has_statistics(CubeReader(result.store), result.statistics_key())


@task(name="detect", cache_policy=NO_CACHE)
def detect_task(store_url: str, statistics: ReduceResult, model_name: str, weights: str | None,
                params: dict[str, Any], out_dir: str, seed: int = 0) -> DetectionResult:
    """Candidates and gamma-polysemantic pairs of every layer, with WordNet similarities;
    writes detection.csv / detection.json and the Figure 3 plot of the last layer."""
    detection_params = DetectionParams(**params)
    if statistics.statistics_key().tau != detection_params.tau:
        raise ValueError(f"statistics made at tau {statistics.statistics_key().tau}, detection asks for "
                         f"tau {detection_params.tau}")
    spec = api.load_model(model_name, weights, seed=seed)
    cube = CubeReader(store_url)
    stats = api.stored_statistics(cube, statistics.statistics_key())
    detections = api.detect(spec, cube, stats, params=detection_params, wordnet=True)
    folder = RunFolder(out_dir)
    folder.root.mkdir(parents=True, exist_ok=True)
    # what a comparison over checkpoints needs: the training step and the whole architecture
    write_checkpoint_record(folder.root, checkpoint_info(model_name, weights, spec.model))
    write_pairs_csv(folder.detection_csv, detections)
    fig3_stats, last = save_figure3(folder, detections,
                                    detection_params.gamma if detection_params.rule == "gamma" else None,
                                    spec.wnids)
    result = DetectionResult(
        params=detection_params,
        layers=[LayerSummary.of(d) for d in detections],
        detections=[detection_record(d, stats[d.layer], detection_params.p) for d in detections],
        figure3=fig3_stats,
        figure3_last_layer=last,
        class_names=list(spec.class_names),
        files=folder.detection_files(),
    )
    folder.write_detection(result)
    publish_detection_artifacts(result)
    return result


def publish_detection_artifacts(result: DetectionResult) -> None:
    """The per-layer table (published once, here) and Figure 3 of the last layer that has one."""
    create_table_artifact(key=DETECTION_TABLE_ARTIFACT, table=detection_rows(result.layers),
                          description="Per-layer detection: candidates, paper-default pairs, selected pairs")
    last = result.figure3_last_layer
    if last is not None:
        st = result.figure3[last]
        create_markdown_artifact(key="figure3", markdown=_png_markdown(
            f"Figure 3: WordNet similarity vs ARV cosine, {last} (Spearman {st.spearman:.3f})",
            Path(st.png or "").read_bytes()))


def nothing_to_rewire_reason(layers: Sequence[LayerSummary | Mapping[str, Any]], planned: Sequence[PairRow],
                             skipped: list[Any]) -> str:
    """One sentence on why no channel was rewired, from the per-layer detection summaries."""
    layers = [d if isinstance(d, LayerSummary) else LayerSummary.from_dict(d) for d in layers]
    cands = sum(d.candidates or 0 for d in layers)
    pairs = sum(d.pairs or 0 for d in layers)
    sel = sum(d.selected_pairs or 0 for d in layers)
    text = f"{cands} candidate channels, {pairs} candidate pairs, {sel} selected pairs in {len(layers)} layers"
    if sel and not planned:
        text += "; none of the selected pairs is in the rewired layers (rewire_layers)"
    elif planned:
        text += f"; {len(skipped)} planned channel(s) could not be split"
    few = [d.layer for d in layers if any("important channels per image" in w for w in d.warnings)]
    if few:
        text += f"; (almost) no important channels at this tau in {', '.join(few[:5])}" + (
            f" and {len(few) - 5} more" if len(few) > 5 else "") + " (the report shows smaller taus)"
    return text


@task(name="rewire", cache_policy=NO_CACHE)
def rewire_task(train_store: str, eval_store: str, statistics: ReduceResult, model_name: str,
                weights: str | None, detection: DetectionResult, rewire_layers: str | list[str], max_per_layer: int | None,
                rho_grid: list[float], rho_max_images: int, out_dir: str, check_images: int,
                seed: int = 0, batch_size: int = defaults.BATCH_SIZE) -> RewiringResult:
    """Split every selected channel, check the function is unchanged (``api.rewire``: rho on
    the detection cube's images, the check on the evaluation cube's, ``batch_size`` at a time),
    save the checkpoint and a standalone export (``disentangled.pt2``, plain torch)."""
    logger = get_run_logger()
    spec = api.load_model(model_name, weights, seed=seed)
    with stage_progress(logger.info) as progress:
        # Refuses (raises FunctionChanged) before anything is saved if the function changed.
        rewiring = api.rewire(spec, detection.layer_detections(), CubeReader(train_store),
                              stats=statistics.statistics_key(), layers=rewire_layers, max_per_layer=max_per_layer,
                              rho_grid=rho_grid, max_images=rho_max_images, check_cube=CubeReader(eval_store),
                              check_images=check_images, batch_size=batch_size, progress=progress)
    splits = rewiring.splits
    logger.info("rewire: rho chosen for %d channels (%d skipped)", len(splits), len(rewiring.skipped))
    result = RewiringResult(splits=list(splits), skipped=rewiring.skipped)
    if not splits:
        result.nothing_to_rewire = nothing_to_rewire_reason(detection.layers, rewiring.planned, rewiring.skipped)
        logger.warning("nothing to rewire: %s", result.nothing_to_rewire)
        return result
    equivalence = rewiring.equivalence or {}
    logger.info("rewire: function check passed on %d images, %d at a time", equivalence["n"], batch_size)
    folder = RunFolder(out_dir)
    rewiring.save(folder.checkpoint, spec)
    result.checkpoint, result.equivalence = str(folder.checkpoint), equivalence
    try:
        result.export = str(rewiring.export(folder.export))
    except Exception as exc:  # torch.export cannot trace every model; the checkpoint stands
        logger.warning("standalone export failed (%s: %s); the checkpoint is saved", type(exc).__name__, exc)
    rows = [{"layer": s.layer, "channel": s.channel, "concepts": " | ".join(s.concept_names),
             "rho": s.rho, "sources": [len(x) for x in s.sources], "shared": len(s.shared)} for s in splits]
    create_table_artifact(key="rewired-channels", table=rows,
                          description=f"Rewired channels; max |logit diff| {equivalence['max_abs_logit_diff']:.2e}")
    logger.info("rewired %d channels in %d layers; max |logit diff| %.2e on %d images", len(splits),
                len({s.layer for s in splits}), equivalence["max_abs_logit_diff"], equivalence["n"])
    return result


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(eval_store: str, model_name: str, weights: str | None, rewiring: RewiringResult,
                  params: dict[str, Any], out_dir: str, device: str, seed: int = 0) -> EvaluationResult:
    """Table 1, scores, figures and explanations before/after of the saved checkpoint; writes
    ``evaluation.json`` and the figures' PNGs and returns where they are."""
    if not rewiring.checkpoint:
        return EvaluationResult()
    logger = get_run_logger()
    spec = api.load_model(model_name, weights, seed=seed)
    # Evaluate what was saved: the checkpoint round trip is part of what is checked.
    saved = api.Rewiring.load(rewiring.checkpoint, spec)
    with stage_progress(logger.info) as progress:
        evaluation, figures = api.evaluate(
            spec, saved, CubeReader(eval_store), tau=params["tau"],
            batch_size=params["batch_size"], featvis_steps=params["featvis_steps"],
            featvis_max_channels=params["featvis_channels"], explain_layers="all",
            explain_quantile=params.get("explain_quantile"), device=device, log=logger.info, progress=progress)
    return save_evaluation(Path(out_dir), evaluation, figures)


def save_evaluation(out: Path, evaluation: Evaluation, figures: dict[str, bytes]) -> EvaluationResult:
    """The evaluation's result as files, so that the report stage (or a rerun of it) reads them
    back instead of evaluating again: ``evaluation.json`` and one PNG per figure."""
    folder = RunFolder(out)
    folder.evaluation_figures.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, png) in enumerate(figures.items()):
        path = folder.evaluation_figure(i, name)
        path.write_bytes(png)
        paths[name] = str(path)
    # written through a rename: a kill never leaves a half-written result behind
    return EvaluationResult(evaluation=str(folder.write_evaluation(evaluation)), figures=paths)


@task(name="report", cache_policy=NO_CACHE)
def report_task(eval_store: str, train_store: str, evaluated: EvaluationResult, rewiring: RewiringResult,
                detection: DetectionResult, params: dict[str, Any], out_dir: str,
                preflight: dict[str, Any] | None = None) -> ReportResult:
    """report.html + summary.json (and its CSV tables) from the stages' saved results."""
    detections = detection.layer_detections()
    evaluation = RunFolder.read(evaluated.evaluation, Evaluation) if evaluated.evaluation else None
    figures = {name: Path(path).read_bytes() for name, path in evaluated.figures.items()}
    # Figure 3 was drawn by the detect stage; reuse its files rather than redraw every layer.
    fig3_stats = {layer: st.summary() for layer, st in detection.figure3.items()}
    fig3_pngs = {st.figure: Path(st.png or "").read_bytes() for st in detection.figure3.values()}
    links = {"detection cube": train_store, "evaluation cube": eval_store,
             "detection table": str(RunFolder(out_dir).detection_csv)}
    if rewiring.checkpoint:
        links["rewired checkpoint"] = rewiring.checkpoint
    if rewiring.export:
        links["rewired model, standalone (torch.export.load)"] = rewiring.export
    extra: dict[str, Any] = {"rewiring": {"equivalence": rewiring.equivalence, "skipped": rewiring.skipped,
                                          "nothing_to_rewire": rewiring.nothing_to_rewire}}
    if preflight:
        extra = {"notes": preflight.get("notes", []), "preflight": Preflight.from_dict(preflight).lines()[1:],
                 **extra}
    skipped = {name: skipped_images(cube.image_paths(), cube.skipped(), cube.skip_reasons())
               for name, cube in (("detection", CubeReader(train_store)), ("evaluation", CubeReader(eval_store)))}
    summary = build_summary(params=params, evaluation=evaluation, detections=detections,
                            figure3_stats=fig3_stats, links=links, extra=extra, skipped=skipped)
    all_figures = {**figures, **fig3_pngs}
    paths = write_report(out_dir, summary, all_figures)
    artifacts = markdown_artifacts(summary, all_figures, max_channels=3)
    for key, md in artifacts["markdown"].items():
        create_markdown_artifact(key=key, markdown=md)
    for key, rows in artifacts["tables"].items():
        if rows and key != DETECTION_TABLE_ARTIFACT:
            create_table_artifact(key=key, table=rows)
    files = {k: str(v) for k, v in paths.items()}
    return ReportResult(report=files["report"], summary=files["summary"], files=files)


@task(name="cached", cache_policy=NO_CACHE)
def _cached(stage: str, result: Any) -> State:
    """A stage whose inputs are unchanged, in the UI as a Cached task run with its stored result."""
    return Completed(name="Cached", data=result,
                     message=f"{stage}: inputs unchanged; result read from the run directory")


def run_stage(cache: StageCache, stage: str, key: Any, run: Callable[[], R], *, result_type: type[R],
              stop: str, verify: Callable[[R], bool] | None = None) -> R:
    """The one caching rule of every stage: reuse the stored result when the key matches, every
    file the result declares (``output_files``) is there with the content recorded when the
    stage finished, and ``verify`` (outputs kept elsewhere, e.g. in a store) holds; else drop
    the record, run the stage, pass its stop point and record its result with its files'
    hashes."""
    stored = cache.get(stage, key, outputs=lambda d: result_type.from_dict(d).output_files())
    if stored is not None:
        result = result_type.from_dict(stored)
        if verify is None or verify(result):
            state = _cached.with_options(name=stage, task_run_name=f"{stage} (cached)")(stage, stored)
            return result_type.from_dict(state.result() if isinstance(state, State) else state)
    cache.forget(stage)
    result = run()
    # What the stage freed stays resident in glibc's arenas unless handed back: without this
    # every later stage would run on top of the largest earlier one (tasks/heap.py).
    release_free_memory()
    stop_point(stop)
    cache.store(stage, key, result.to_dict(), outputs=result.output_files())
    return result


def stage_keys(params: PipelineParams, model_identity: dict[str, Any], train_fp: str, eval_fp: str,
               train_content: str, eval_content: str) -> dict[str, dict[str, Any]]:
    """The stage cache's key of every stage: what its result depends on. The model identity
    (with the state dict's content hash) is in every key, besides each cube's fingerprint and
    content digest (``CubeReader.content_digest``: a chunk extracted again changes it)."""
    reduce_key = {"model": model_identity, "cube": train_fp, "content": train_content,
                  "tau": params.tau, "correct_only": params.correct_only}
    detect_key = {**reduce_key, "detection": params.detection().to_dict()}
    rewire_key = {**detect_key, "eval": eval_fp, "eval_content": eval_content,
                  "rewire_layers": params.rewire_layers, "max_per_layer": params.max_rewired_per_layer,
                  "rho_grid": list(params.rho_grid), "rho_max_images": params.rho_max_images,
                  "check_images": params.check_images}
    evaluate_key = {**rewire_key, "eval_params": {k: getattr(params, k) for k in
                                                  ("featvis_steps", "featvis_channels", "batch_size",
                                                   "explain_quantile")}}
    report_key = {**evaluate_key, "report": 2}  # 2: the report lists the images each cube skipped
    return {"reduce": reduce_key, "detect": detect_key, "rewire": rewire_key, "evaluate": evaluate_key,
            "report": report_key}


def preflight_inputs(params: PipelineParams) -> Preflight:
    """Resolve ``params`` and check every input before any work (see ``flows/preflight.py``)."""
    validate_extraction(params.chunk_images, params.shard_chunks, params.batch_size)
    checked = run_preflight(params)
    release_free_memory()  # the estimate's timed extraction batches and feature visualisation
    return checked


@flow(name="disentangle-all-layers", log_prints=True)
def disentangle_all_layers(params: PipelineParams | None = None,
                           preflight: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole method on every conv layer; returns where the outputs are.

    ``preflight``: the ``Preflight.to_dict()`` of these params when the caller (the CLI) has
    already run it; otherwise it runs here, before any model pass."""
    params = (params or PipelineParams()).resolved()
    # One run per output folder, one writer per local store (see flows/runtime/locking.py).
    with holding(run_locks(params.out_dir, [params.train_store, params.eval_store]),
                 on_wait=get_run_logger().warning):
        return _all_layers(params, preflight)


def _all_layers(params: PipelineParams, preflight: dict[str, Any] | None) -> dict[str, Any]:
    logger = get_run_logger()
    validate_extraction(params.chunk_images, params.shard_chunks, params.batch_size)
    detection_params = params.detection()
    from polysemantic_disentangle.tasks.data.wordnet_corpus import ensure_wordnet

    ensure_wordnet()  # fail before any model pass if WordNet cannot be provisioned
    if preflight is None:
        preflight = preflight_inputs(params).to_dict()
    checked = Preflight.from_dict(preflight)
    for line in checked.lines():
        logger.info(line)
    # At a URL, outputs are written to a local mirror and uploaded (also when a stage fails).
    outputs = RunOutputs.at(params.out_dir)
    outputs.pull()
    out = outputs.local
    out.mkdir(parents=True, exist_ok=True)
    folder = RunFolder(out)
    folder.write_preflight(preflight)
    cache = StageCache(out, warn=logger.warning)
    # One cluster (or none) for both extractions and the reduction.
    with cluster_address(params.dask_address, params.dask_workers) as address, _pushed(outputs):
        rewiring, detection, report, train_store, eval_store = _stages(params, detection_params, out,
                                                                       cache, address, checked,
                                                                       preflight)
    summary = {
        "out_dir": outputs.location,
        "report": outputs.url_of(report.report),
        "summary_json": outputs.url_of(report.summary),
        "train_store": train_store,
        "eval_store": eval_store,
        "figure3": detection.last_figure3.to_dict() if detection.last_figure3 else {},
        "rewired_channels": len(rewiring.splits),
        # Visible in the run's result (and the CLI's exit status), not only as a warning line.
        "outcome": (f"rewired {len(rewiring.splits)} channels" if rewiring.splits
                    else "nothing to rewire: " + (rewiring.nothing_to_rewire
                                                  or nothing_to_rewire_reason(detection.layers, [], []))),
        "checkpoint": outputs.url_of(rewiring.checkpoint),
        "export": outputs.url_of(rewiring.export),
        "preflight": outputs.url_of(str(folder.preflight)),
        "equivalence": rewiring.equivalence,
    }
    publish_links(summary)
    logger.info("report: %s; checkpoint: %s; stores: %s, %s", summary["report"], summary["checkpoint"],
                train_store, eval_store)
    return summary


def publish_links(summary: dict[str, Any]) -> None:
    """Link artifacts to the report and both stores, where the run left them (a local path
    becomes a file:// URL; an object-store URL stays as it is)."""
    for key, text, where in (("report-link", "report", summary.get("report")),
                             ("detection-cube-link", "detection cube", summary.get("train_store")),
                             ("evaluation-cube-link", "evaluation cube", summary.get("eval_store"))):
        if where:
            link = where if "://" in where else Path(where).resolve().as_uri()
            create_link_artifact(key=key, link=link, link_text=text)


@contextlib.contextmanager
def _pushed(outputs: RunOutputs) -> Iterator[None]:
    try:
        yield
    finally:
        outputs.push()


def _stages(params: PipelineParams, detection_params: DetectionParams, out: Path, cache: StageCache,
            address: str | None, checked: Preflight, preflight: dict[str, Any],
            ) -> tuple[RewiringResult, DetectionResult, ReportResult, str, str]:
    """extract -> reduce -> detect -> rewire -> evaluate -> report, each skipped when cached."""
    common = dict(model=params.model, weights=params.weights, layers=params.layers,
                  chunk_images=params.chunk_images, shard_chunks=params.shard_chunks,
                  batch_size=params.batch_size, device=params.device, target_mode=params.target_mode,
                  dask_address=address, seed=params.seed, precision=params.precision)
    # The preflight created (or replaced) both stores; extraction resumes them.
    # The detection cube keeps what the statistics need; the evaluation cube what evaluation reads.
    train_store = extract_relevance_cube(data_dir=params.train_dir, store_url=params.train_store,
                                         max_per_class=params.max_per_class_train,
                                         **params.store_layouts()["train"], **common)
    stop_point("train-extracted")
    eval_store = extract_relevance_cube(data_dir=params.eval_dir, store_url=params.eval_store,
                                        max_per_class=params.max_per_class_eval,
                                        **params.store_layouts()["eval"], **common)
    stop_point("eval-extracted")
    train_cube, eval_cube = CubeReader(train_store), CubeReader(eval_store)
    keys = stage_keys(params, checked.model_identity, train_cube.fingerprint, eval_cube.fingerprint,
                      train_cube.content_digest(), eval_cube.content_digest())

    statistics = run_stage(cache, "reduce", keys["reduce"], result_type=ReduceResult, stop="reduced",
                           verify=stats_in_store,
                           run=lambda: reduce_task(train_store, params.tau, params.correct_only, address))
    detection = run_stage(cache, "detect", keys["detect"], result_type=DetectionResult, stop="detected",
                          run=lambda: detect_task(train_store, statistics, params.model, params.weights,
                                                  detection_params.to_dict(), str(out), params.seed))
    rewiring = run_stage(cache, "rewire", keys["rewire"], result_type=RewiringResult, stop="rewired",
                         run=lambda: rewire_task(train_store, eval_store, statistics, params.model, params.weights,
                                                 detection, params.rewire_layers,
                                                 params.max_rewired_per_layer, list(params.rho_grid),
                                                 params.rho_max_images, str(out), params.check_images,
                                                 params.seed, params.batch_size))
    evaluated = run_stage(cache, "evaluate", keys["evaluate"], result_type=EvaluationResult, stop="evaluated",
                          run=lambda: evaluate_task(eval_store, params.model, params.weights, rewiring,
                                                    params.model_dump(), str(out), params.device,
                                                    params.seed))
    report = run_stage(cache, "report", keys["report"], result_type=ReportResult, stop="reported",
                       run=lambda: report_task(eval_store, train_store, evaluated, rewiring, detection,
                                               params.model_dump(), str(out), preflight))

    return rewiring, detection, report, train_store, eval_store
