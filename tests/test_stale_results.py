"""Results that cannot go stale: runs that share a store, or that follow an interrupted run
with other parameters in the same folder, each get exactly what they would get alone.

The oracle of "alone" is independent of the stage cache and of the store's statistics: the
reduction and detection functions called directly on the run's cube with the run's parameters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, cifar_subset
from tests.test_faults import _run_cli, assert_same_run_files

LAYER = "layer3.2.conv2"
# Small and complete: 200 detection and 50 evaluation images, one layer, no feature visualisation.
ARGS = ["--layers", LAYER, "--max-per-class-train", "20", "--max-per-class-eval", "5", "--chunk-images", "50",
        "--batch-size", "50", "--rho-max-images", "8", "--check-images", "20", "--max-rewired-per-layer", "2",
        "--featvis-channels", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, assets_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stale-data")
    return (cifar_subset(assets_dir.resolve(), root / "train", "train", 20),
            cifar_subset(assets_dir.resolve(), root / "test", "test", 5))


def _run(data: tuple[Path, Path], out: Path, *extra: str, stores: Path | None = None) -> int:
    from polysemantic_disentangle.flows.cli import main

    train, test = data
    shared = ["--train-store", str(stores / "cube-train.zarr"), "--eval-store", str(stores / "cube-eval.zarr")] \
        if stores else []
    return main(["run", "--train-dir", str(train), "--eval-dir", str(test), *ARGS, *shared, *extra,
                 "--out-dir", str(out)])


def _detection_alone(out: Path, store: Path, *extra: str) -> bytes:
    """detection.csv as the run's parameters give it from the run's cube, computed directly."""
    from polysemantic_disentangle.flows.cli import build_parser, params_from_args
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube
    from polysemantic_disentangle.tasks.stage3_detect.detect import add_wordnet_similarities, detect_layers
    from polysemantic_disentangle.tasks.stage3_detect.files import write_pairs_csv

    params = params_from_args(build_parser().parse_args(["run", *ARGS, *extra])).resolved().detection()
    bundle = load_model("cifar_resnet20")
    stats = reduce_cube(str(store), tau=params.tau)
    detections = detect_layers(bundle.model, str(store), stats, params, bundle.class_names, bundle.wnids)
    add_wordnet_similarities(detections)
    target = out.parent / f"{out.name}-oracle.csv"
    write_pairs_csv(target, detections)
    return target.read_bytes()


def _detection(out: Path) -> tuple[bytes, dict]:
    record = json.loads((out / "detection.json").read_text())
    return (out / "detection.csv").read_bytes(), record["params"]


@pytest.mark.slow
@pytest.mark.parametrize("order", ["A-B-A", "B-A-B"])
def test_runs_sharing_a_store_each_get_their_own_statistics(tmp_path, data, prefect_api, order) -> None:
    """Two parameter sets on one pair of stores, the first run repeated with another gamma last:
    every run's detection equals what its own parameters give alone, byte for byte."""
    params = {"A": ["--tau", "0.03"], "B": ["--tau", "0.01"]}
    first, second = order[0], order[2]
    runs = [(first, tmp_path / first, params[first]),
            (second, tmp_path / second, params[second]),
            (first, tmp_path / first, [*params[first], "--gamma", "0.95"])]
    stores = tmp_path / first
    seen: dict[str, bytes] = {}
    for name, out, extra in runs:
        assert _run(data, out, *extra, stores=stores if out != stores else None) in (0, 4)
        csv, recorded = _detection(out)
        assert recorded["tau"] == float(extra[1]), f"run {name} reports another run's tau"
        assert csv == _detection_alone(out, stores / "cube-train.zarr", *extra), f"run {name} ({' '.join(extra)}) differs from the same run alone"
        seen[" ".join(extra)] = csv
    assert len(set(seen.values())) == 3, "the three parameter sets should give three different tables"


@pytest.mark.slow
def test_interrupted_run_with_other_parameters_leaves_nothing_stale(tmp_path, data, prefect_api) -> None:
    """A finished run, the same folder killed mid-way by a run with other parameters (after its
    rewire stage wrote its checkpoint, before recording it), then the first parameters again:
    every output equals the first run's; a truncated or swapped output reruns its stage."""
    from prefect.settings import PREFECT_API_URL

    from polysemantic_disentangle.flows.runtime.faults import STOP_ENV

    first = ["--gamma", "0.9"]
    other = ["--gamma", "0.95", "--rho-grid", "0.5,1.0", "--tau", "0.05"]
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert _run(data, reference, *first) == 0
    assert _run(data, out, *first) == 0
    _assert_same_outputs(reference, out)

    env = {k: v for k, v in os.environ.items() if k != STOP_ENV}
    env.update(PYTHONPATH=str(PROJECT_ROOT), PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONUNBUFFERED="1",
               **{STOP_ENV: "rewired"})
    train, test = data
    killed = _run_cli(["run", "--train-dir", str(train), "--eval-dir", str(test), *ARGS, *other,
                       "--out-dir", str(out)], env)
    assert killed.rc == -signal.SIGKILL, killed.log[-3000:]
    assert (out / "detection.csv").read_bytes() != (reference / "detection.csv").read_bytes()

    assert _run(data, out, *first) == 0
    _assert_same_outputs(reference, out)

    # Damaged or swapped outputs of a finished run: the stages that wrote them run again (two
    # files at a time, from different stages, to keep the test short).
    for damaged in ({"disentangled.pt": "truncate", "summary.json": "truncate"},
                    {"evaluation.json": "empty", "detection.csv": "swap"}):
        for name, damage in damaged.items():
            path = out / name
            if damage == "truncate":
                path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
            elif damage == "empty":
                path.write_bytes(b"")
            else:
                shutil.copy(reference / "table1.csv", path)  # another file of the run in its place
        assert _run(data, out, *first) == 0
        _assert_same_outputs(reference, out)


def _assert_same_outputs(ref: Path, got: Path) -> None:
    assert_same_run_files(ref, got, csv_files=("detection.csv", "table1.csv"),
                          json_files=("detection.json", "summary.json", "disentangled.pt.json", "evaluation.json"))
