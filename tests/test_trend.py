"""The comparison over checkpoints, on real fine-tuned ResNet-20 checkpoints analysed by the real
pipeline, through the watcher (scan, file-system events) and `disentangle compare`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from tests.checkpoints import finetune_checkpoints
from tests.conftest import cifar_subset

RESNET56 = ("weights", "cifar10-resnet", "resnet56-4bfd9763.th")
RESNET20 = ("weights", "cifar10-resnet", "resnet20-12fca82f.th")
# The last block only, few images, lenient p so that channels are selected; no feature
# visualisation: a complete analysis in seconds.
TINY = dict(max_per_class_train=10, max_per_class_eval=5, check_images=20, rho_max_images=8,
            chunk_images=50, batch_size=50, shard_chunks=2, gamma=0.9, p=0.5,
            layers=["layer3.2.conv1", "layer3.2.conv2"], max_rewired_per_layer=1, featvis_channels=0)
PATTERNS = ["**/*.pt"]


def _analysed(registry: Path) -> dict[str, dict]:
    from polysemantic_disentangle.flows.watch.registry import Registry

    return {Path(r["checkpoint"]).name: r for r in Registry(registry).analyses()}


@pytest.fixture(scope="module")
def watched(tmp_path_factory, assets_dir, prefect_api):
    """Three checkpoints of one fine-tuning run (steps 10, 20, 30) in one watched folder: two
    found by a scan, the third written in two halves while the folder is followed; then a
    scan with nothing new."""
    from polysemantic_disentangle.flows.watch.flow import watch_checkpoints
    from polysemantic_disentangle.flows.watch.follow import follow

    root = tmp_path_factory.mktemp("trend")
    data = {"train_dir": str(cifar_subset(assets_dir, root / "data" / "train", "train", 10)),
            "eval_dir": str(cifar_subset(assets_dir, root / "data" / "test", "test", 5))}
    t0 = time.monotonic()
    step10, step20, step30 = finetune_checkpoints(assets_dir, root / "made", [10, 20, 30])
    finetune_s = time.monotonic() - t0
    folder = root / "ckpts" / "run-a"
    folder.mkdir(parents=True)
    # names and modification times in the opposite order of the steps
    shutil.copyfile(step30, folder / "a-late.pt")
    os.utime(folder / "a-late.pt", (1e9, 1e9))
    shutil.copyfile(step10, folder / "c-early.pt")
    registry = root / "watch" / "registry.sqlite"
    scan = dict(location=str(root / "ckpts"), patterns=PATTERNS, params={**TINY, **data},
                registry=str(registry))

    t0 = time.monotonic()
    first = watch_checkpoints(**scan)
    first_s = time.monotonic() - t0

    # followed: the third checkpoint arrives in two halves
    scans: list[dict] = []
    stop = threading.Event()
    errors: list[BaseException] = []

    def on_ready(ready):
        scans.append({"ready": [str(p) for p in ready], **watch_checkpoints(**scan)})

    def run_follow():
        try:
            follow(scan["location"], on_ready, patterns=PATTERNS, settle_seconds=0.5, poll_seconds=0.2,
                   stop=stop, initial_scan=False, log=lambda m: None)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    follower = threading.Thread(target=run_follow, daemon=True)
    follower.start()
    time.sleep(1.0)  # the observer is running
    payload = step20.read_bytes()
    target = folder / "b-middle.pt"
    with open(target, "wb") as f:
        f.write(payload[: len(payload) // 2])
    time.sleep(3.0)  # six settle periods: size and mtime stable, but the file does not load
    half_written = {"scans": list(scans), "analysed": sorted(_analysed(registry))}
    with open(target, "ab") as f:
        f.write(payload[len(payload) // 2:])
    written_at = time.monotonic()
    deadline = written_at + 300
    while not any(s["completed"] for s in scans) and time.monotonic() < deadline and not errors:
        time.sleep(0.2)
    picked_up_s = time.monotonic() - written_at
    stop.set()
    follower.join(timeout=30)

    trend_dir = Path(next(r for r in (scans[-1]["trends"] if scans else []) if r["group"] == "run-a")["out_dir"])
    before = (trend_dir / "trend.json").read_bytes(), (trend_dir / "trend.json").stat().st_mtime_ns, \
        (trend_dir / "trend.html").stat().st_mtime_ns
    t0 = time.monotonic()
    again = watch_checkpoints(**scan)
    again_s = time.monotonic() - t0
    after = (trend_dir / "trend.json").read_bytes(), (trend_dir / "trend.json").stat().st_mtime_ns, \
        (trend_dir / "trend.html").stat().st_mtime_ns
    print(f"trend fixture timings (s): fine-tune {finetune_s:.1f}, first scan {first_s:.1f}, pickup "
          f"{picked_up_s:.1f}, empty scan {again_s:.1f}; comparison in the scans: first "
          f"{first['trend_seconds']}, after pickup {scans[-1]['trend_seconds'] if scans else None}, "
          f"empty {again['trend_seconds']}")
    return dict(root=root, data=data, folder=folder, registry=registry, scan=scan, first=first, scans=scans,
                errors=errors, half_written=half_written, again=again, before=before, after=after,
                trend_dir=trend_dir, steps={"c-early.pt": 10, "b-middle.pt": 20, "a-late.pt": 30})


@pytest.fixture(scope="module")
def trend(watched):
    from polysemantic_disentangle.tasks.stage7_trend.trend import Trend

    return Trend.from_json((watched["trend_dir"] / "trend.json").read_text())


def _run_files(run_dir: str) -> tuple[dict, dict]:
    run = Path(run_dir)
    return json.loads((run / "detection.json").read_text()), json.loads((run / "summary.json").read_text())


# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_watcher_builds_the_trend_in_step_order(watched, trend) -> None:
    first = watched["first"]
    assert (first["started"], first["completed"]) == (2, 2)
    row = next(r for r in first["trends"] if r["group"] == "run-a")
    assert row["status"] == "updated" and row["runs"] == 2
    assert not watched["errors"]
    # the follower's scan analysed the third checkpoint and updated the trend to three
    last = watched["scans"][-1]
    assert last["completed"] == 1 and [Path(p).name for p in last["ready"]] == ["b-middle.pt"]
    assert next(r for r in last["trends"] if r["group"] == "run-a")["runs"] == 3
    assert trend.order_by == "step"
    assert [c.step for c in trend.checkpoints] == [10, 20, 30]
    analysed = _analysed(watched["registry"])
    assert [Path(analysed[n]["out_dir"]) for n in ("c-early.pt", "b-middle.pt", "a-late.pt")] == \
        [Path(c.run_dir) for c in trend.checkpoints]
    assert all(c.report and Path(c.report).is_file() for c in trend.checkpoints)


@pytest.mark.slow
def test_trend_numbers_are_the_runs_own(trend) -> None:
    from polysemantic_disentangle.storage.cube import open_store_group

    assert [x.layer for x in trend.layers] == TINY["layers"]
    for i, ck in enumerate(trend.checkpoints):
        detection, summary = _run_files(ck.run_dir)
        for lt, layer_summary, det in zip(trend.layers, detection["layers"], detection["detections"], strict=True):
            p = lt.points[i]
            assert (p.channels, p.candidates, p.candidate_pairs, p.paper_pairs, p.selected_pairs,
                    p.selected_channels) == (layer_summary["channels"], layer_summary["candidates"],
                                             layer_summary["pairs"], layer_summary["paper_polysemantic_pairs"],
                                             layer_summary["selected_pairs"], layer_summary["selected_channels"])
            cos = [r["cosine"] for r in det["pairs"]]
            assert p.cosines_complete and p.cosine_rows == len(cos) == layer_summary["pairs"]
            assert p.cosine_median == pytest.approx(float(np.median(cos)))
            assert p.cosine_q1 == pytest.approx(float(np.percentile(cos, 25)))
            agg = {a["layer"]: a for a in summary["evaluation"]["table1_aggregate"]["layers"]}
            if lt.layer in agg:
                assert p.score_mean == pytest.approx(agg[lt.layer]["score_mean"])
                assert p.rewired_channels == agg[lt.layer]["channels"]
        acc = summary["evaluation"]["accuracy"]
        assert (ck.accuracy, ck.accuracy_n) == (acc["accuracy_original"], acc["n"])
        # independently, from the evaluation cube's labels and the checkpoint's predictions
        root = open_store_group(summary["params"]["eval_store"])
        ok = ~root["skipped"][:]
        assert ck.accuracy == pytest.approx(float((root["label"][:][ok] == root["prediction"][:][ok]).mean()))
    # fine-tuning at a large learning rate really moved the model and its statistics
    assert len({c.accuracy for c in trend.checkpoints}) > 1
    assert len({tuple(p.cosine_median for p in lt.points) for lt in trend.layers}) > 0
    assert any(len({p.cosine_median for p in lt.points}) == 3 for lt in trend.layers)


@pytest.mark.slow
def test_tracked_channels_and_their_changes(trend) -> None:
    tracked = [c for c in trend.channels if any(p.polysemantic for p in c.points)]
    assert tracked, "no polysemantic channel at any checkpoint"
    for ch in tracked:
        for ck, p in zip(trend.checkpoints, ch.points):
            detection, _ = _run_files(ck.run_dir)
            det = next(d for d in detection["detections"] if d["layer"] == ch.layer)
            rows = [r for r in det["pairs"] if r["channel"] == ch.channel]
            selected = [r for r in rows if r["selected"]]
            assert p.polysemantic == bool(selected)
            assert p.candidate == (ch.channel in det["candidates"])
            if selected:
                best = min(selected, key=lambda r: r["cosine"])
                assert p.pair == [best["name1"], best["name2"]] and p.pair_cosine == best["cosine"]
            if rows:
                assert p.lowest_cosine == min(r["cosine"] for r in rows)
            names = detection["class_names"]
            assert p.relevant == [names[t] for t in det["relevant_all"].get(str(ch.channel), [])]
    # every change is what the per-checkpoint states say, and every such transition is listed
    expected = set()
    for ch in trend.channels:
        for i in range(1, len(ch.points)):
            a, b = ch.points[i - 1], ch.points[i]
            kind = ("became-polysemantic" if b.polysemantic and not a.polysemantic else
                    "stopped" if a.polysemantic and not b.polysemantic else
                    "changed-pair" if a.polysemantic and sorted(a.pair) != sorted(b.pair) else None)
            if kind:
                expected.add((ch.layer, ch.channel, kind, i))
    assert {(c.layer, c.channel, c.kind, c.after) for c in trend.changes} == expected
    assert trend.changes, "the statistics did not move between checkpoints"


@pytest.mark.slow
def test_half_written_checkpoint_is_never_analysed(watched) -> None:
    half = watched["half_written"]
    assert half["analysed"] == ["a-late.pt", "c-early.pt"]
    assert half["scans"] == []  # a file that does not load is not handed to a scan
    from polysemantic_disentangle.flows.watch.trend import still_written

    # and a scan that meets a half-written file leaves it alone
    part = watched["root"] / "partial" / "x.pt"
    part.parent.mkdir()
    payload = (watched["folder"] / "b-middle.pt").read_bytes()
    part.write_bytes(payload[: len(payload) // 3])
    assert still_written(part) and not still_written(watched["folder"] / "b-middle.pt")
    os.utime(part, (1e9, 1e9))
    assert not still_written(part)  # old and broken: analysed, and the failure reported


@pytest.mark.slow
def test_second_scan_with_nothing_new_changes_nothing(watched) -> None:
    again = watched["again"]
    assert again["started"] == 0
    assert next(r for r in again["trends"] if r["group"] == "run-a")["status"] == "unchanged"
    assert watched["before"] == watched["after"]


@pytest.mark.slow
def test_trend_artifacts_on_the_watcher_run(watched) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    slug = Path(watched["trend_dir"]).name
    with get_client(sync_client=True) as client:
        md = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"trend-{slug}"])))
        table = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[f"trend-table-{slug}"])))
    assert md and table
    latest = max(md, key=lambda a: a.created)
    assert latest.flow_run_id is not None
    assert "over 3 checkpoints" in latest.data and "](data:image/png;base64," in latest.data
    assert len(latest.data.encode()) < 1_500_000


@pytest.mark.slow
def test_compare_by_hand_and_refusal_of_another_architecture(watched, trend, tmp_path, assets_dir, capsys) -> None:
    from polysemantic_disentangle.flows.cli import main
    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.flows.pipeline import disentangle_all_layers
    from polysemantic_disentangle.tasks.stage7_trend.trend import ArchitectureMismatch, Trend, compare_runs

    runs = [c.run_dir for c in trend.checkpoints]
    # given in another order: the comparison orders by step
    assert main(["compare", runs[2], runs[0], runs[1], "--out", str(tmp_path / "by-hand")]) == 0
    by_hand = Trend.from_json((tmp_path / "by-hand" / "trend.json").read_text())
    assert [c.step for c in by_hand.checkpoints] == [10, 20, 30]
    assert by_hand.layers == trend.layers and by_hand.channels == trend.channels

    # ResNet-56 has layers of the same names and widths as the ones analysed; it is still refused
    r56 = tmp_path / "resnet56"
    disentangle_all_layers(PipelineParams(**TINY, **watched["data"], model="cifar_resnet56",
                                          weights=str(assets_dir.joinpath(*RESNET56)), out_dir=str(r56)))
    with pytest.raises(ArchitectureMismatch, match="cifar_resnet20 vs cifar_resnet56"):
        compare_runs([runs[0], str(r56)])
    capsys.readouterr()
    assert main(["compare", runs[0], str(r56), "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err
    assert "different architectures" in err and "convs" in err
    assert not (tmp_path / "refused").exists()

    # other detection parameters: compared, with a warning that names them
    other = tmp_path / "gamma"
    shutil.copytree(runs[0], other)
    disentangle_all_layers(PipelineParams(**{**TINY, "gamma": 0.95}, **watched["data"], out_dir=str(other),
                                          weights=trend.checkpoints[0].checkpoint))
    with pytest.warns(UserWarning, match=r"gamma \(0.9, 0.95\)"):
        mixed = compare_runs([runs[0], str(other)])
    assert mixed.differing_params == {"gamma": [0.9, 0.95]}


def test_order_falls_back_from_step_to_mtime_to_as_given(tmp_path) -> None:
    from polysemantic_disentangle.tasks.stage7_trend.trend import CheckpointInfo, RunFiles, order_runs

    def run(name: str, **info) -> RunFiles:
        return RunFiles(tmp_path / name, {}, {}, CheckpointInfo(**info))

    by_step = [run("a", step=30, mtime=1.0), run("b", step=10, mtime=3.0), run("c", step=20, mtime=2.0)]
    assert [(r.run_dir.name) for r in order_runs(by_step)[0]] == ["b", "c", "a"]
    assert order_runs(by_step)[1] == "step"
    by_epoch = [run("a", epoch=2.0), run("b", epoch=1.5)]
    assert [r.run_dir.name for r in order_runs(by_epoch)[0]] == ["b", "a"]
    by_mtime = [run("a", step=5, mtime=9.0), run("b", mtime=1.0)]  # not every checkpoint has a step
    assert [r.run_dir.name for r in order_runs(by_mtime)[0]] == ["b", "a"]
    assert order_runs(by_mtime)[1] == "mtime"
    given = [run("z"), run("y", mtime=1.0)]
    assert [r.run_dir.name for r in order_runs(given)[0]] == ["z", "y"] and order_runs(given)[1] == "given"


def test_pending_files_wait_until_complete(tmp_path) -> None:
    from polysemantic_disentangle.flows.watch.follow import Pending, matches

    loadable: set[Path] = set()
    pending = Pending(settle_seconds=1.0, give_up_seconds=100.0, is_complete=lambda p: p in loadable)
    f = tmp_path / "x.pt"
    f.write_bytes(b"PK\x03\x04half")
    pending.touch(f, now=0.0)
    assert pending.ready(now=0.1) == []  # first look: size and mtime recorded
    assert pending.ready(now=0.5) == []  # not settled yet
    assert pending.ready(now=1.2) == [] and len(pending) == 1  # settled, but does not load
    with open(f, "ab") as fh:
        fh.write(b"rest")
    os.utime(f, ns=(f.stat().st_mtime_ns + 10**9,) * 2)
    loadable.add(f)
    assert pending.ready(now=1.5) == []  # it changed: settling starts again
    assert pending.ready(now=2.0) == []
    assert pending.ready(now=2.6) == [f] and len(pending) == 0
    assert matches(tmp_path / "a" / "b.pt", tmp_path, ["**/*.pt"])
    assert matches(tmp_path / "b.pt", tmp_path, ["*.pt"]) and not matches(tmp_path / "a" / "b.pt", tmp_path, ["*.pt"])
    assert not matches(tmp_path / "b.pth.tmp", tmp_path, ["**/*.pt"])


@pytest.mark.slow
def test_waiting_for_a_deployment_without_a_worker_ends(tmp_path, assets_dir, prefect_api) -> None:
    from prefect.client.orchestration import get_client

    from polysemantic_disentangle.flows.pipeline import disentangle_all_layers
    from polysemantic_disentangle.flows.watch.registry import Registry
    from polysemantic_disentangle.flows.watch.flow import watch_checkpoints

    name = f"no-worker-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(disentangle_all_layers)
        client.create_deployment(flow_id=flow_id, name=name, entrypoint="flows/pipeline.py:disentangle_all_layers",
                                 enforce_parameter_schema=False)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copyfile(assets_dir.joinpath(*RESNET20), ckpts / "resnet20.th")
    summary = watch_checkpoints(location=str(ckpts), registry=str(tmp_path / "registry.sqlite"),
                                deployment=f"disentangle-all-layers/{name}", wait=True,
                                wait_timeout_seconds=2.0, poll_seconds=0.5)
    assert summary["files"][0]["status"] == "running" and summary["failed"] == 0
    assert Registry(tmp_path / "registry.sqlite").analyses()[0]["status"] == "running"


# --------------------------------------------------------------------------------------------
# the page, rendered


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.attrs: list[tuple[str, str, str]] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)
        self.attrs += [(tag, k, v or "") for k, v in attrs]


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is required in CI (make test installs it)")
        pytest.skip("chromium not on PATH")
    return path


@pytest.mark.slow
def test_trend_page_renders_in_headless_chromium(watched, trend, tmp_path) -> None:
    page = watched["trend_dir"] / "trend.html"
    text = page.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(text)
    assert "script" not in parser.tags
    assert not [v for t, k, v in parser.attrs if k in ("src", "href") and re.match(r"^\s*(https?:)?//", v, re.I)]
    assert all(v.startswith("data:image/png;base64,") for t, k, v in parser.attrs if t == "img" and k == "src")
    chromium = _chromium()
    profile = tmp_path / "profile"
    res = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run",
                          f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
                         check=True, timeout=120, capture_output=True, text=True)
    dom = res.stdout
    assert dom.count("<section class=\"layer\"") == len(trend.layers) == 2
    for lt in trend.layers:
        assert f">{lt.layer}</h2>" in dom
    from polysemantic_disentangle.tasks.stage7_trend.page import polysemantic_layers

    hot = polysemantic_layers(trend)
    assert hot and dom.count("channel by checkpoint\"") == len(hot)
    assert dom.count("over checkpoints\"") == len(trend.layers) + 1  # the layer plots and accuracy
    report_links = re.findall(r'href="([^"]+report\.html)"', dom)
    assert len(report_links) == 3
    for link in report_links:
        assert (page.parent / link).resolve().is_file()
    for ck in trend.checkpoints:
        assert ck.label in dom
    assert f"{len(trend.changes)}" in dom and "Channels that changed" in dom
