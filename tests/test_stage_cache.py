"""Stage records are skipped only when what the stage produced is still there; a skipped stage
shows as a Cached task run."""

from __future__ import annotations

import shutil

import pytest

import numpy as np

from polysemantic_disentangle.flows.pipeline import reduce_task, run_stage, stats_in_store
from polysemantic_disentangle.flows.runtime.stage_cache import StageCache
from polysemantic_disentangle.flows.stage_results import EvaluationResult, ReduceResult
from polysemantic_disentangle.storage.cube import (STATS_GROUP, class_stats_sets, cube_info, open_store_group,
                                                  write_layer_stats)
from polysemantic_disentangle.tasks.stage2_reduce.reduce import (StaleStatistics, class_statistics, has_stats, read_stats,
                                                                 reduce_cube, statistics_key)


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
    result = reduce_task.fn(url, 0.03, False, None)
    cache.store("reduce", key, result.to_dict())
    assert _reduced(cache, key, url)
    stats_key = result.statistics_key()
    assert set(read_stats(url, stats_key, layers)) == set(layers)

    # One layer's statistics gone (the consolidated metadata still lists them).
    del open_store_group(url, mode="r+")[f"{STATS_GROUP}/{stats_key.name}/{layers[-1]}"]
    assert cache.hit("reduce", key)
    assert not _reduced(cache, key, url)

    # Extracted again from the same inputs: same fingerprint, same key, no statistics.
    assert reduce_task.fn(url, 0.03, False, None) == result
    assert _reduced(cache, key, url)
    shutil.rmtree(url)
    shutil.copytree(original, url)
    assert cube_info(url)["fingerprint"] == info["fingerprint"]
    assert cache.hit("reduce", key)
    assert not _reduced(cache, key, url)
    with pytest.raises(StaleStatistics):  # what the detect stage would have met
        read_stats(url, stats_key, layers)


def test_statistics_sets_are_keyed_by_their_parameters(small_cube, tmp_path) -> None:
    """Two parameter sets coexist in one store; each reader gets the set it asks for, and a set
    whose attributes do not match (overwritten by hand, or made from other parameters) is never
    read in its place."""
    original, _, _ = small_cube
    url = str(tmp_path / "train.zarr")
    shutil.copytree(original, url)
    layers = ["layer3.2.conv2"]
    k03, s03 = class_statistics(url, tau=0.03, layers=layers)
    k01, s01 = class_statistics(url, tau=0.01, layers=layers)
    kc, sc = class_statistics(url, tau=0.03, layers=layers, correct_only=True)
    assert len({k03.name, k01.name, kc.name}) == 3
    assert set(class_stats_sets(url)) == {k03.name, k01.name, kc.name}
    for key, stats in ((k03, s03), (k01, s01), (kc, sc)):
        oracle = reduce_cube(url, tau=key.tau, layers=layers, correct_only=key.correct_only)
        back = read_stats(url, key, layers)
        for layer in layers:
            np.testing.assert_array_equal(back[layer].important_fraction, oracle[layer].important_fraction)
            np.testing.assert_array_equal(back[layer].count, oracle[layer].count)
            np.testing.assert_array_equal(stats[layer].important_fraction, oracle[layer].important_fraction)
    assert not np.array_equal(s03[layers[0]].important_fraction, s01[layers[0]].important_fraction)
    assert not np.array_equal(s03[layers[0]].count, sc[layers[0]].count)

    # Another set's arrays under this key's name (what an overwrite by an older version did):
    # the attributes say tau 0.01, so a reader asking for tau 0.03 does not take it.
    write_layer_stats(url, k03.name, layers[0], {"count": s01[layers[0]].count}, k01.to_dict())
    assert not has_stats(url, k03, layers)
    with pytest.raises(StaleStatistics):
        read_stats(url, k03, layers)
    again, recomputed = class_statistics(url, tau=0.03, layers=layers)
    assert again == k03
    np.testing.assert_array_equal(recomputed[layers[0]].important_fraction, s03[layers[0]].important_fraction)

    # The same parameters on other cube content (a chunk extracted again) are another key.
    assert statistics_key(url, tau=0.03).content == k03.content
    root = open_store_group(url, mode="r+")
    root["chunk_done"][0] = 0
    assert statistics_key(url, tau=0.03) != k03


def test_the_face_reads_statistics_by_key_from_an_opened_cube(small_cube, tmp_path) -> None:
    """What the pipeline's tasks call: statistics by key through the face, on one CubeReader,
    equal to a fresh reduction; a key the store does not hold is refused, not recomputed."""
    from polysemantic_disentangle import api
    from polysemantic_disentangle.storage.cube import CubeReader

    original, _, _ = small_cube
    url = str(tmp_path / "train.zarr")
    shutil.copytree(original, url)
    layers = ["layer3.2.conv2"]
    cube = CubeReader(url)
    key, stats = api.keyed_class_statistics(cube, tau=0.03, layers=layers)
    assert api.has_statistics(cube, key, layers) and has_stats(cube, key, layers)
    back = api.stored_statistics(cube, key, layers)
    oracle = reduce_cube(url, tau=0.03, layers=layers)
    for got in (stats, back, read_stats(cube, key, layers)):
        np.testing.assert_array_equal(got[layers[0]].important_fraction, oracle[layers[0]].important_fraction)
        np.testing.assert_array_equal(got[layers[0]].count, oracle[layers[0]].count)
    other = statistics_key(cube, tau=0.01)
    assert not api.has_statistics(cube, other, layers)
    with pytest.raises(StaleStatistics):
        api.stored_statistics(cube, other, layers)


def test_a_damaged_stage_record_is_recomputed_with_one_warning(tmp_path) -> None:
    out = tmp_path / "run"
    warnings: list[str] = []
    cache = StageCache(out, warn=warnings.append)
    target = out / "x.json"
    for damage in (b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", b'{"key": "abc", "result": {"st', b"", b"[1, 2]"):
        out.mkdir(parents=True, exist_ok=True)
        target.write_text("{}")
        cache.store("detect", {"k": 1}, {"x": str(target)}, outputs=[str(target)])
        assert cache.get("detect", {"k": 1}) == {"x": str(target)}
        (out / ".stages" / "detect.json").write_bytes(damage)
        warnings.clear()
        assert cache.get("detect", {"k": 1}) is None
        assert len(warnings) == 1 and "detect.json" in warnings[0] and "runs again" in warnings[0]


def test_an_output_changed_after_its_record_reruns_the_stage(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    cache = StageCache(out, warn=lambda _: None)
    files = [out / "a.csv", out / "b.pt"]
    for f in files:
        f.write_bytes(b"what the stage wrote\n" * 100)
    cache.store("rewire", {"k": 1}, {"files": [str(f) for f in files]}, outputs=[str(f) for f in files])
    assert cache.get("rewire", {"k": 1}) is not None
    files[1].write_bytes(files[1].read_bytes()[:50])  # truncated
    assert cache.get("rewire", {"k": 1}) is None
    files[1].write_bytes(b"what the stage wrote\n" * 100)
    assert cache.get("rewire", {"k": 1}) is not None
    files[0].write_bytes(b"another run's table\n" * 100)  # swapped for another run's file
    assert cache.get("rewire", {"k": 1}) is None
    # A result that declares a file the record never hashed is not trusted either.
    files[0].write_bytes(b"what the stage wrote\n" * 100)
    extra = str(out / "c.json")
    assert cache.get("rewire", {"k": 1}, outputs=lambda r: [*r["files"], extra]) is None
    cache.forget("rewire")
    assert cache.get("rewire", {"k": 1}) is None


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
                         stop="evaluated")

    @flow
    def twice() -> list:
        first, second = again(1), again(1)
        out.unlink()  # an output gone: the stage runs again, however unchanged its inputs
        third = again(1)
        out.write_text("y")  # an output with other content: it runs again too
        fourth = again(1)
        changed = again(2)
        return [first, second, third, fourth, changed]

    state = twice(return_state=True)
    results = state.result()
    assert all(r == EvaluationResult(evaluation=str(out), figures={"f": str(out)}) for r in results)
    assert len(calls) == 4  # the second call reused the first's result
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
    from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams
    from polysemantic_disentangle.tasks.stage3_detect.records import (Figure3Stats, LayerDetection, LayerRecord,
                                                                      LayerSummary, PairRow)
    from polysemantic_disentangle.tasks.stage4_rewire.rewire import ChannelSplit

    pair = PairRow(layer="l", channel=3, class1=0, class2=1, name1="a", name2="b", wnid1="n1", wnid2="n2",
                   cosine=0.1, fraction1=0.5, fraction2=0.25, paper_polysemantic=True, selected=True, wup=0.3)
    detection = DetectionResult(
        params={"tau": 0.03},
        layers=[LayerSummary(layer="l", channels=8, candidates=1, pairs=1, selected_pairs=1,
                             diagnostics={"images_per_class_median": 3.0, "warnings": []})],
        detections=[LayerRecord(layer="l", channels=8, candidates=[3], relevant={3: [0, 1]},
                                relevant_all={3: [0, 1], 5: [1]}, counts={"pairs": 1}, pairs=[pair])],
        figure3={"l": {"spearman": 0.5, "n_pairs": 1, "pairs_total": 1, "rows_kept": 1, "table_cut": False,
                       "figure": "fig3/l", "png": "f.png"}},
        figure3_last_layer="l", class_names=["a", "b"])
    split = ChannelSplit(layer="l", channel=3, concepts=[[0], [1]], concept_names=["a", "b"], rho=0.5,
                         sources=[[0, 2], [1]], shared=[3], scores={0.5: 0.9, 0.25: 0.7})
    results = [ReduceResult("s3://b/train.zarr"), detection,
               RewiringResult(splits=[split], checkpoint="x.pt", equivalence={"n": 4}),
               EvaluationResult("e.json", {"fig": "f.png"}), ReportResult("r.html", "s.json", {"table1": "t.csv"})]
    for result in results:
        back = type(result).from_dict(json.loads(json.dumps(result.to_dict())))
        assert back == result
    # read back typed, not as dicts
    back = DetectionResult.from_dict(json.loads(json.dumps(detection.to_dict())))
    assert isinstance(back.layers[0], LayerSummary) and isinstance(back.detections[0], LayerRecord)
    assert isinstance(back.detections[0].pairs[0], PairRow) and back.detections[0].relevant_all == {3: [0, 1], 5: [1]}
    assert back.layers[0].diagnostics == {"images_per_class_median": 3.0, "warnings": []}
    assert isinstance(back.params, DetectionParams) and back.params.tau == 0.03
    assert isinstance(back.figure3["l"], Figure3Stats) and back.last_figure3 == back.figure3["l"]
    assert (back.figure3["l"].spearman, back.figure3["l"].png, back.output_files()) == (0.5, "f.png", ["f.png"])
    rewiring = RewiringResult.from_dict(json.loads(json.dumps(results[2].to_dict())))
    assert rewiring.splits == [split] and rewiring.splits[0].scores == {0.5: 0.9, 0.25: 0.7}
    det = detection.layer_detections()[0]
    assert isinstance(det, LayerDetection) and det.relevant == {3: [0, 1]} and det.pairs[0].channel == 3
    assert detection.totals() == {"candidates": 1, "pairs": 1, "selected_pairs": 1}
    # the summary keeps its diagnostics flat, beside the counts, as detection.json always had them
    assert list(detection.to_dict()["layers"][0]) == [
        "layer", "kind", "channels", "applicable", "reason", "candidates", "pairs", "paper_polysemantic_pairs",
        "selected_pairs", "selected_channels", "rows_kept", "images_per_class_median", "warnings"]
    # a record from before a field existed still loads, the field at its default
    assert RewiringResult.from_dict({"splits": [], "skipped": []}).export is None
