"""Stage records are skipped only when what the stage produced is still there; a skipped stage
shows as a Cached task run."""

from __future__ import annotations

import shutil

import pytest

from polysemantic_disentangle.flows.pipeline import STATS_SUBSET, reduce_task, run_stage, stats_in_store
from polysemantic_disentangle.flows.runtime.stage_cache import StageCache
from polysemantic_disentangle.flows.stage_results import EvaluationResult, ReduceResult
from polysemantic_disentangle.storage.cube import STATS_GROUP, cube_info, open_store_group
from polysemantic_disentangle.tasks.stage2_reduce.reduce import read_stats


def _reduced(cache: StageCache, key: dict, url: str) -> bool:
    """Whether the reduce stage's record would be reused, by the pipeline's own rule."""
    result = cache.get("reduce", key)
    return result is not None and stats_in_store(ReduceResult.from_dict(result))


def test_reduce_record_needs_the_statistics_in_the_store(small_cube, tmp_path) -> None:
    original, _, _ = small_cube
    url = str(tmp_path / "train.zarr")
    shutil.copytree(original, url)
    info = cube_info(url)
    layers = list(info["layers"])
    cache = StageCache(tmp_path / "run")
    key = {"train": info["fingerprint"], "tau": 0.03, "correct_only": False}

    assert not _reduced(cache, key, url)
    reduce_task.fn(url, 0.03, False, None)
    cache.store("reduce", key, {"store": url})
    assert _reduced(cache, key, url)
    assert set(read_stats(url, STATS_SUBSET, layers)) == set(layers)

    # One layer's statistics gone (the consolidated metadata still lists them).
    del open_store_group(url, mode="r+")[f"{STATS_GROUP}/{STATS_SUBSET}/{layers[-1]}"]
    assert cache.hit("reduce", key)
    assert not _reduced(cache, key, url)

    # Extracted again from the same inputs: same fingerprint, same key, no statistics.
    reduce_task.fn(url, 0.03, False, None)
    assert _reduced(cache, key, url)
    shutil.rmtree(url)
    shutil.copytree(original, url)
    assert cube_info(url)["fingerprint"] == info["fingerprint"]
    assert cache.hit("reduce", key)
    assert not _reduced(cache, key, url)
    with pytest.raises(Exception):  # what the detect stage would have met
        read_stats(url, STATS_SUBSET, layers)


def test_a_stage_runs_once_and_then_shows_as_cached(prefect_api, tmp_path) -> None:
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    cache = StageCache(tmp_path / "run")
    out = tmp_path / "run" / "result.txt"
    calls: list[int] = []

    def stage() -> EvaluationResult:
        calls.append(1)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("x")
        return EvaluationResult(evaluation=str(out), figures={"f": str(out)})

    def again(key: int) -> EvaluationResult:
        return run_stage(cache, "evaluate", {"k": key}, stage, result_type=EvaluationResult,
                         stop="evaluated", must_exist=["evaluation"])

    @flow
    def twice() -> list:
        first, second = again(1), again(1)
        out.unlink()  # an output gone: the stage runs again, however unchanged its inputs
        third = again(1)
        changed = again(2)
        return [first, second, third, changed]

    state = twice(return_state=True)
    results = state.result()
    assert all(r == EvaluationResult(evaluation=str(out), figures={"f": str(out)}) for r in results)
    assert len(calls) == 3  # the second call reused the first's result
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
    cached = [r for r in runs if r.state and r.state.name == "Cached"]
    assert len(cached) == 1 and cached[0].name.startswith("evaluate")
    assert cached[0].state.is_completed()


def test_stage_results_round_trip_through_json() -> None:
    import json

    from polysemantic_disentangle.flows.stage_results import (DetectionResult, ReduceResult, ReportResult,
                                                               RewiringResult)
    from polysemantic_disentangle.tasks.stage3_detect.detect import LayerDetection, PairRow

    pair = dict.fromkeys(PairRow.__dataclass_fields__)
    pair.update(layer="l", channel=3, class1=0, class2=1, cosine=0.1)
    detection = DetectionResult(
        params={"tau": 0.03}, layers=[{"layer": "l", "candidates": 1, "pairs": 1, "selected_pairs": 1}],
        detections=[{"layer": "l", "channels": 8, "applicable": True, "reason": "", "candidates": [3],
                     "relevant": {"3": [0, 1]}, "relevant_all": {"3": [0, 1]}, "counts": {"pairs": 1},
                     "diagnostics": {}, "pairs": [pair]}],
        figure3={}, figure3_last_layer=None, class_names=["a", "b"])
    results = [ReduceResult("s3://b/train.zarr"), detection,
               RewiringResult(splits=[{"layer": "l", "channel": 3}], checkpoint="x.pt", equivalence={"n": 4}),
               EvaluationResult("e.json", {"fig": "f.png"}), ReportResult("r.html", "s.json", {"table1": "t.csv"})]
    for result in results:
        back = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
        assert back == result
    det = detection.layer_detections()[0]
    assert isinstance(det, LayerDetection) and det.relevant == {3: [0, 1]} and det.pairs[0].channel == 3
    assert detection.totals() == {"candidates": 1, "pairs": 1, "selected_pairs": 1}
    # a record from before a field existed still loads, the field at its default
    assert RewiringResult.from_dict({"splits": [], "skipped": []}).export is None
