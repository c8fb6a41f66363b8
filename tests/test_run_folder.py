"""The run folder has one owner (``tasks/run_folder.py``), and its records read back typed.

The names below are spelled out on purpose: they are the independent statement of the layout
that ``RunFolder`` must give, and that people, scripts and older runs rely on."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from polysemantic_disentangle.tasks.run_folder import RUN_FILE_NAMES, RunFolder, TrendFolder
from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams
from polysemantic_disentangle.tasks.stage3_detect.records import (DetectionResult, Figure3Stats, LayerDetection,
                                                                  LayerRecord, LayerSummary, PairRow)
from polysemantic_disentangle.tasks.stage5_evaluate.records import ChannelEvaluation, Evaluation

ROOT = Path(__file__).resolve().parents[1]
OWNER = ROOT / "tasks" / "run_folder.py"
SCANNED = ("flows", "tasks", "storage", "benchmarks", "polysemantic_disentangle")


def test_the_layout_is_what_runs_have_always_had(tmp_path: Path) -> None:
    run = RunFolder(tmp_path)
    expected = {"preflight": "preflight.json", "checkpoint_record": "checkpoint.json",
                "detection_csv": "detection.csv", "detection_json": "detection.json",
                "checkpoint": "disentangled.pt", "export": "disentangled.pt2", "evaluation_json": "evaluation.json",
                "report_html": "report.html", "summary_json": "summary.json", "table1_csv": "table1.csv",
                "explanations_csv": "explanations.csv", "figures": "figures", "stage_records": ".stages",
                "train_cube": "cube-train.zarr", "eval_cube": "cube-eval.zarr", "lock": ".disentangle.lock"}
    for role, name in expected.items():
        assert getattr(run, role) == tmp_path / name, role
    assert run.evaluation_figures == tmp_path / "figures" / "evaluation"
    assert run.figure3_png("layer4.1.conv2") == tmp_path / "figures" / "figure3_layer4.1.conv2.png"
    assert run.evaluation_figure(3, "fig2 layer4/7") == tmp_path / "figures" / "evaluation" / "0003_fig2_layer4_7.png"
    assert run.detection_files() == {"detection.csv": str(tmp_path / "detection.csv"),
                                     "detection.json": str(tmp_path / "detection.json"),
                                     "checkpoint.json": str(tmp_path / "checkpoint.json")}
    trend = TrendFolder(tmp_path)
    assert (trend.trend_json, trend.trend_html) == (tmp_path / "trend.json", tmp_path / "trend.html")
    assert set(RUN_FILE_NAMES) == {*(n for n in expected.values() if "." in n.lstrip(".")), "trend.json",
                                   "trend.html"}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def spelled_run_files(source: str) -> list[tuple[int, str]]:
    """(line, literal) for every string literal that is a run-folder file name or a path ending
    in one (dict keys count: a name is a name wherever it is spelled; docstrings are prose)."""
    tree = ast.parse(source)
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            tail = node.value.rsplit("/", 1)[-1]
            if tail in RUN_FILE_NAMES:
                found.append((node.lineno, node.value))
    return found


def test_the_scan_finds_a_spelled_name() -> None:
    bad = '''
"""A docstring naming detection.json is prose."""
out = run / "detection.json"
files = {"summary.json": path}
page = "runs/x/report.html"
'''
    assert sorted(line for line, _ in spelled_run_files(bad)) == [3, 4, 5]
    assert spelled_run_files('page = folder.report_html\nprint("see report.html for more")\n') == []


def test_no_module_but_the_owner_spells_a_run_file_name() -> None:
    found = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.resolve() == OWNER.resolve() or ".venv" in path.parts:
                continue
            found += [f"{path.relative_to(ROOT)}:{line}: {text!r}"
                      for line, text in spelled_run_files(path.read_text(encoding="utf-8"))]
    assert found == [], "run-folder file names outside tasks/run_folder.py:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# typed records


def _detection() -> LayerDetection:
    pairs = [PairRow("layer3.0.conv1", 5, 0, 2, "cat", "ship", "n1", "n3", 0.12, 0.5, 0.25, True, True,
                     wup=0.3, path=0.1, lowest_common_hypernym="entity.n.01"),
             PairRow("layer3.0.conv1", 5, 1, 2, "dog", "ship", "n2", "n3", float("nan"), 0.4, 0.2, False, False)]
    return LayerDetection(layer="layer3.0.conv1", channels=16, applicable=True, candidates=[5],
                          relevant={5: [0, 1, 2]}, pairs=pairs,
                          counts={"pairs": 3, "paper_polysemantic_pairs": 1, "selected_pairs": 1,
                                  "selected_channels": 1},
                          diagnostics={"images_per_class_median": 4.0, "cosine_quantiles": {"min": 0.12},
                                       "warnings": ["few images"]})


def test_detection_json_is_the_format_it_always_was(tmp_path: Path) -> None:
    """The file a run writes, spelled out key by key (the format before the records existed):
    built from typed records it has these bytes, and read back it is the same records."""
    det = _detection()
    rows = [{"layer": r.layer, "channel": r.channel, "class1": r.class1, "class2": r.class2, "name1": r.name1,
             "name2": r.name2, "wnid1": r.wnid1, "wnid2": r.wnid2, "cosine": r.cosine, "fraction1": r.fraction1,
             "fraction2": r.fraction2, "paper_polysemantic": r.paper_polysemantic, "selected": r.selected,
             "wup": r.wup, "path": r.path, "lowest_common_hypernym": r.lowest_common_hypernym} for r in det.pairs]
    params = DetectionParams(tau=0.03, rule="gamma")
    expected = {
        "params": {"tau": 0.03, "p": params.p, "gamma": params.gamma, "cosine_lower_bound": params.cosine_lower_bound,
                   "rule": "gamma", "k": params.k, "quantile": params.quantile,
                   "max_pairs_per_layer": params.max_pairs_per_layer},
        "layers": [{"layer": "layer3.0.conv1", "kind": "conv", "channels": 16, "applicable": True, "reason": "",
                    "candidates": 1, "pairs": 3, "paper_polysemantic_pairs": 1, "selected_pairs": 1,
                    "selected_channels": 1, "rows_kept": 2, "images_per_class_median": 4.0,
                    "cosine_quantiles": {"min": 0.12}, "warnings": ["few images"]}],
        "detections": [{"layer": "layer3.0.conv1", "kind": "conv", "channels": 16, "applicable": True,
                        "reason": "", "candidates": [5], "relevant": {"5": [0, 1, 2]},
                        "relevant_all": {"5": [0, 1, 2], "9": [1]}, "counts": det.counts,
                        "diagnostics": det.diagnostics, "pairs": rows}],
        "figure3": {"layer3.0.conv1": {"spearman": 0.5, "n_pairs": 3, "pairs_total": 3, "rows_kept": 2,
                                       "table_cut": False, "figure": "f3", "png": "x.png"}},
        "figure3_last_layer": "layer3.0.conv1",
        "class_names": ["cat", "dog", "ship"],
        "files": {"detection.csv": "a", "detection.json": "b"},
    }
    result = DetectionResult(params=params, layers=[LayerSummary.of(det)],
                             detections=[det.record({5: [0, 1, 2], 9: [1]})], figure3=expected["figure3"],
                             figure3_last_layer="layer3.0.conv1", class_names=["cat", "dog", "ship"],
                             files={"detection.csv": "a", "detection.json": "b"})
    folder = RunFolder(tmp_path)
    folder.write_detection(result)
    assert folder.detection_json.read_text() == json.dumps(expected, indent=1)

    back = folder.read_detection(DetectionResult)
    assert isinstance(back.layers[0], LayerSummary) and isinstance(back.detections[0], LayerRecord)
    assert back.params == params and back.figure3["layer3.0.conv1"] == Figure3Stats(0.5, 3, 3, 2, False, "f3", "x.png")
    assert all(isinstance(r, PairRow) for r in back.detections[0].pairs)
    assert back.detections[0].relevant_all == {5: [0, 1, 2], 9: [1]}
    assert math.isnan(back.detections[0].pairs[1].cosine)
    # NaN != NaN: compare what is written, which is the whole record
    assert json.dumps(back.to_dict(), indent=1) == json.dumps(expected, indent=1)
    again = back.layer_detections()[0]
    assert (again.layer, again.candidates, again.relevant, again.counts, again.diagnostics) == \
        (det.layer, det.candidates, det.relevant, det.counts, det.diagnostics)
    assert back.layers[0].to_dict() == det.summary()


def _evaluation() -> Evaluation:
    channel = ChannelEvaluation(
        layer="layer3.0.conv1", channel=5, k=2, concepts=[[0], [2]], concept_names=["cat", "ship"], rho=0.5,
        n_sources=[3, 4], n_shared=2, score=0.42, score_per_concept=[0.4, None], selection="important",
        table1=[{"concept_name": "cat", "n": 4}], summary={"own_median": 0.5}, invariant={"max_abs_error": 0.0},
        explanations={"orig": {"formula": "cat OR ship", "iou": 0.25, "n_active": 7}}, warnings=["few"])
    return Evaluation(eval_cube="e.zarr", dataset_root="/data", n_images=40, n_not_decoded=0, n_classes=3,
                      params={"tau": 0.03},
                      accuracy={"accuracy_original": 0.9, "accuracy_rewired": 0.9, "n": 40,
                                "max_abs_logit_diff": 1e-6},
                      channels=[channel], table1_aggregate={"layers": [], "model": {}},
                      layer_explanations={"layer3.0.conv1": [{"channel": 5, "few_active": True}]},
                      timings_s={"total": 1.0})


def test_the_evaluation_reads_back_typed(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    evaluation = _evaluation()
    folder.write_evaluation(evaluation)
    back = folder.read_evaluation(Evaluation)
    assert back == evaluation and isinstance(back.channels[0], ChannelEvaluation)
    assert folder.evaluation_json.read_text() == json.dumps(evaluation.to_dict())


def test_the_report_takes_the_typed_evaluation() -> None:
    from polysemantic_disentangle.tasks.stage6_report.report import build_summary

    evaluation = _evaluation()
    typed = build_summary(params={}, evaluation=evaluation, detections=[LayerSummary.of(_detection())])
    plain = build_summary(params={}, evaluation=evaluation.to_dict(), detections=[_detection()])
    typed.pop("created"), plain.pop("created")
    assert json.dumps(typed, sort_keys=True) == json.dumps(plain, sort_keys=True)
    assert Evaluation.from_dict(typed["evaluation"]) == evaluation


def _write_run(run: Path) -> None:
    det = _detection()
    folder = RunFolder(run)
    folder.write_detection(DetectionResult(params={"tau": 0.03}, layers=[LayerSummary.of(det)],
                                           detections=[det.record({5: [0, 1, 2]})], figure3={},
                                           figure3_last_layer=None, class_names=["cat", "dog", "ship"]))
    folder.summary_json.write_text(json.dumps({"params": {"model": "m"}, "evaluation": _evaluation().to_dict()}))


def test_show_reads_the_typed_records(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from polysemantic_disentangle.flows.cli import show_run

    _write_run(tmp_path)
    show_run(str(tmp_path))
    out = capsys.readouterr().out
    assert "layer3.0.conv1" in out and "5: cat/ship 0.120 0.3" in out
    assert "accuracy original 0.9000, rewired 0.9000 on 40 images" in out
    assert "layer3.0.conv1/5 cat / ship rho 0.5 score 0.42 (n [4]): orig: cat OR ship (0.250, 7 active)" in out
    assert "! layer3.0.conv1: few images" in out and "! layer3.0.conv1/5: few" in out
    assert "! layer3.0.conv1: 1 of 1 explanations rest on fewer than" in out


def test_the_trend_reads_the_typed_records(tmp_path: Path) -> None:
    from polysemantic_disentangle.tasks.stage7_trend.trend import read_run, run_accuracy

    _write_run(tmp_path)
    run = read_run(tmp_path)
    assert isinstance(run.detection, DetectionResult) and run.evaluation == _evaluation()
    assert run.layer_shapes == [("layer3.0.conv1", 16)]
    assert run_accuracy(run) == (0.9, 40, "summary.json")


def test_the_trend_names_what_an_unfinished_run_lacks(tmp_path: Path) -> None:
    from polysemantic_disentangle.tasks.stage7_trend.trend import IncompleteRun, read_run

    with pytest.raises(IncompleteRun, match="no detection.json, summary.json"):
        read_run(tmp_path)
    _write_run(tmp_path)
    (tmp_path / "summary.json").unlink()
    with pytest.raises(IncompleteRun, match=r"no summary.json$"):
        read_run(tmp_path)
