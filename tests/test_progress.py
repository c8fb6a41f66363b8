"""Progress a person can follow: one redrawn terminal line with rate and ETA on a TTY, a handful
of lines in a log, and the same progress as Prefect progress artifacts of a real run."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest
import torch
from torch import nn

from polysemantic_disentangle.flows.runtime.progress import ProgressReporter, artifact_key
from polysemantic_disentangle.tasks.progress import NO_PROGRESS, Progress
from tests.conftest import cifar_subset


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Recorder:
    """Every call a stage makes, to check what it reports."""

    def __init__(self) -> None:
        self.phases: list[dict] = []

    def start(self, label: str, total: float, unit: str = "images") -> None:
        self.phases.append({"label": label, "total": total, "unit": unit, "done": 0.0, "closed": False})

    def advance(self, n: float = 1) -> None:
        self.phases[-1]["done"] += n

    def close(self) -> None:
        if self.phases:
            self.phases[-1]["closed"] = True


def test_both_implementations_follow_the_protocol() -> None:
    assert isinstance(NO_PROGRESS, Progress)
    assert isinstance(ProgressReporter(io.StringIO(), artifacts=False), Progress)
    assert isinstance(Recorder(), Progress)
    assert artifact_key("extract (detection cube)") == "progress-extract-detection-cube"


def test_a_tty_gets_one_line_redrawn_in_place_with_rate_and_eta() -> None:
    tty, clock = FakeTTY(), Clock()
    progress = ProgressReporter(tty, artifacts=False, clock=clock, redraw_s=0.2)
    progress.start("extract (detection cube)", 1000)
    for _ in range(10):  # ten chunks within one redraw interval: drawn once at most
        clock.now += 0.01
        progress.advance(9)
    assert tty.getvalue().count("\r") <= 2
    for _ in range(9):
        clock.now += 1.0
        progress.advance(100)
    out = tty.getvalue()
    assert "\n" not in out, "a TTY line is redrawn in place, never scrolled"
    last = out.rsplit("\r\x1b[K", 1)[-1]
    assert "extract (detection cube) [" in last and "99%" in last
    assert "990/1,000 images" in last and "images/s" in last and "ETA 0:00" in last
    progress.close()
    out = tty.getvalue()
    assert out.endswith("\n") and out.count("\n") == 1
    assert out.rsplit("\r\x1b[K", 1)[-1].startswith("extract (detection cube): 990/1,000 images in 0:09")


def test_a_log_line_on_the_same_terminal_clears_the_bar_first() -> None:
    tty, clock = FakeTTY(), Clock()
    handler = logging.StreamHandler(tty)
    logger = logging.getLogger("progress-test")
    logger.addHandler(handler)
    try:
        progress = ProgressReporter(tty, artifacts=False, clock=clock)
        progress.start("reduce", 10)
        clock.now += 1
        progress.advance(5)
        logger.warning("a log line")
        clock.now += 0.01  # within the redraw interval: drawn again all the same, below the log line
        progress.advance(1)
        progress.close()
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
    out = tty.getvalue()
    assert "ETA 0:01\r\x1b[Ka log line\n\r\x1b[Kreduce [" in out
    assert out.endswith("reduce: 6/10 images in 0:01 (5.9 images/s), stopped before the end\nafter\n")
    assert not handler.filters


def test_a_log_gets_a_handful_of_lines() -> None:
    log, clock = io.StringIO(), Clock()
    progress = ProgressReporter(log, artifacts=False, clock=clock)
    progress.start("reduce", 50_000)
    for _ in range(1000):
        clock.now += 0.1
        progress.advance(50)
    progress.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 4, lines  # the quarters and the closing line
    assert lines[0] == "reduce: 25% 12,500/50,000 images, 500.0 images/s, ETA 1:15"
    assert lines[-1] == "reduce: 50,000 images in 1:40 (500.0 images/s)"

    short = io.StringIO()
    quick = ProgressReporter(short, artifacts=False, clock=clock)
    quick.start("rho selection", 4, "channels")
    for _ in range(4):
        clock.now += 0.5
        quick.advance()
    quick.start("evaluate: model pass", 10)  # starting the next phase closes the previous one
    quick.close()
    assert short.getvalue().splitlines() == ["rho selection: 4 channels in 0:02 (2.0 channels/s)",
                                             "evaluate: model pass: 0/10 images in 0:00 (0.0 images/s), "
                                             "stopped before the end"]


def test_feature_visualisation_counts_every_step_even_when_it_stops_early() -> None:
    from polysemantic_disentangle.tasks.stage5_evaluate.featvis import ChannelTarget, visualise_channels

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)).eval()
    recorder = Recorder()
    out = visualise_channels([(net, ChannelTarget("2", 0)), (net, ChannelTarget("2", 1))], size=16, steps=6,
                             batch=1, progress=recorder, tol=1e9, window=1)  # converged after 2 steps
    assert out.steps == [2, 2]
    (phase,) = recorder.phases
    assert phase["unit"] == "steps" and phase["closed"] and phase["done"] == phase["total"] == 6


def test_rho_selection_opens_and_closes_its_phase() -> None:
    from polysemantic_disentangle.tasks.stage4_rewire.plan import build_splits

    recorder = Recorder()
    splits, skipped = build_splits(nn.Conv2d(3, 4, 1), [], {}, lambda t: torch.zeros(0), progress=recorder)
    assert not splits and not skipped
    assert recorder.phases == [{"label": "rho selection", "total": 0, "unit": "channels", "done": 0.0,
                                "closed": True}]


def latest_progress_artifact(key: str) -> Any:
    """The newest artifact of ``key`` in the test API, checked to be a progress artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact {key}"
    latest = max(found, key=lambda a: a.created)
    assert latest.type == "progress" and latest.flow_run_id is not None
    return latest


def test_prefect_run_keeps_a_progress_artifact_at_100_percent(tmp_path, assets_dir, prefect_api) -> None:
    """Shards on threads (markers counted by the flow) and the reduce stage's dask pass, each
    with its artifact at 100% and the image count in its description."""
    from prefect import flow

    from polysemantic_disentangle.flows.extract import extract_relevance_cube
    from polysemantic_disentangle.flows.pipeline import reduce_task

    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=2)
    store = str(tmp_path / "cube.zarr")
    extract_relevance_cube(data_dir=str(data), store_url=store, layers="layer3.2.conv2", chunk_images=8,
                           shard_chunks=2, batch_size=8)

    @flow(name="reduce-only")
    def reduce_only() -> None:
        reduce_task(store, 0.03, False, None)

    reduce_only()
    for key, text in {"progress-extract-detection-cube": "extract (detection cube): 20 images in ",
                      "progress-reduce": "reduce: 20 images in "}.items():
        latest = latest_progress_artifact(key)
        assert float(latest.data) == pytest.approx(100.0)
        assert latest.description.startswith(text), latest.description


def test_waiting_on_shards_looks_at_the_markers_between_waits() -> None:
    from polysemantic_disentangle.flows.extract import results_with_progress

    class Slow:
        """A future that times out ``n`` times before it has its result."""

        def __init__(self, n: int, value: Any) -> None:
            self.n, self.value, self._final_state = n, value, None

        def result(self, timeout: float | None = None) -> Any:
            if self.n:
                self.n -= 1
                raise TimeoutError
            if isinstance(self.value, Exception):
                self._final_state = "failed"
                raise self.value
            return self.value

    class Watch:
        interval, looks = 0.0, 0

        def update(self) -> None:
            self.looks += 1

    watch = Watch()
    assert results_with_progress([Slow(2, "a"), Slow(0, "b")], watch) == ["a", "b"]
    assert watch.looks == 4  # twice while waiting, once after each result
    with pytest.raises(TimeoutError, match="the task's own"):  # a task that failed with a TimeoutError
        results_with_progress([Slow(1, TimeoutError("the task's own"))], Watch())
