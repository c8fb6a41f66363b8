"""The deployment path as a user runs it (server, pool, deploy, run, worker) and the watcher."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, cifar_subset

PREFECT = str(Path(sys.executable).with_name("prefect"))
RESNET20 = ("weights", "cifar10-resnet", "resnet20-12fca82f.th")

# A cheap but complete analysis: the last block only, few images, lenient p so that something
# is selected, one channel rewired per layer, no feature visualisation.
TINY = dict(max_per_class_train=10, max_per_class_eval=5, check_images=20, rho_max_images=8,
            chunk_images=50, batch_size=50, shard_chunks=2, gamma=0.9, p=0.5,
            layers=["layer3.2.conv1", "layer3.2.conv2"], max_rewired_per_layer=1,
            featvis_channels=0)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory, assets_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("watch-data")
    return {"train_dir": str(cifar_subset(assets_dir, root / "train", "train", 10)),
            "eval_dir": str(cifar_subset(assets_dir, root / "test", "test", 5))}


# --------------------------------------------------------------------------------------------
# the run registry (no Prefect API needed)


def test_registry_claim_is_exclusive_across_connections(tmp_path) -> None:
    from polysemantic_disentangle.flows.watch.registry import Registry

    path = tmp_path / "registry.sqlite"
    winners: list[dict] = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        reg = Registry(path)  # own connections, as a second watcher process has
        barrier.wait()
        row = reg.claim("ab" * 32, "cd" * 32, checkpoint=f"/c/{i}.th", out_dir="/o", params="{}",
                        watcher_run_id=str(i), deployment=None)
        if row is not None:
            winners.append(row)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and winners[0]["status"] == "running"
    reg = Registry(path)
    reg.finish("ab" * 32, "cd" * 32, "failed", error="boom")
    retry = reg.claim("ab" * 32, "cd" * 32, checkpoint="/c/0.th", out_dir="/o", params="{}",
                      watcher_run_id="x", deployment=None)
    assert retry is not None and retry["attempts"] == 2 and retry["error"] is None
    reg.finish("ab" * 32, "cd" * 32, "completed")
    assert reg.claim("ab" * 32, "cd" * 32, checkpoint="/c/1.th", out_dir="/o", params="{}",
                     watcher_run_id="y", deployment=None) is None


def test_params_hash_covers_defaults_and_rejects_owned_fields() -> None:
    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.flows.watch.registry import params_hash

    default_gamma = PipelineParams().gamma
    assert params_hash({}) == params_hash(None) == params_hash({"gamma": default_gamma})
    assert params_hash({"gamma": 0.8}) != params_hash({})
    with pytest.raises(ValueError, match="out_dir"):
        params_hash({"out_dir": "x"})
    with pytest.raises(ValueError):
        params_hash({"tau": -1})


# --------------------------------------------------------------------------------------------
# the watcher, in-process against a Prefect test API


@pytest.mark.slow
def test_watcher_analyses_each_content_once(tmp_path, assets_dir, tiny_data, prefect_api) -> None:
    from polysemantic_disentangle.flows.watch.registry import Registry, params_hash
    from polysemantic_disentangle.flows.watch.flow import watch_checkpoints

    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copyfile(assets_dir.joinpath(*RESNET20), ckpts / "resnet20.th")
    shutil.copyfile(assets_dir.joinpath(*RESNET20), ckpts / "copy-of-resnet20.pt")
    os.utime(ckpts / "copy-of-resnet20.pt", (1e9, 1e9))  # another name, another mtime
    (ckpts / "broken.pth").write_bytes(b"not a checkpoint")
    (ckpts / "notes.txt").write_text("ignored")
    registry = tmp_path / "watch" / "registry.sqlite"
    params = {**TINY, **tiny_data}
    common = dict(location=str(ckpts), registry=str(registry))

    first = watch_checkpoints(params=params, fail_on_error=False, **common)
    # broken.pth is no checkpoint: refused before any flow run (by what it is, not what it holds)
    assert first["checkpoints"] == 2 and first["refused"] == 1
    assert (first["started"], first["completed"], first["failed"]) == (1, 1, 0)
    by_name = {Path(r["checkpoint"]).name: r for r in first["files"]}
    assert by_name["broken.pth"]["action"] == "refused" and "not a checkpoint" not in by_name["broken.pth"]["error"]
    # sorted listing: the copy comes first and is the one analysed; the other name is its alias
    assert by_name["copy-of-resnet20.pt"]["action"] == "started"
    assert by_name["resnet20.th"]["action"] == "alias"
    assert by_name["resnet20.th"]["alias_of"] == str(ckpts / "copy-of-resnet20.pt")

    reg = Registry(registry)
    done = reg.analyses("completed")
    assert len(done) == 1
    row = done[0]
    phash = params_hash(params)
    assert row["params_hash"] == phash and row["attempts"] == 1
    assert row["aliases"] == [str(ckpts / "resnet20.th")]
    assert row["flow_run_id"] and row["started_at"] and row["finished_at"]
    out = Path(row["out_dir"])
    assert out == registry.parent / f"{row['sha256'][:12]}-{phash[:8]}"
    assert (out / "detection.csv").is_file()
    assert row["result"]["out_dir"] == str(out)
    assert reg.analyses("failed") == []
    refusals = reg.refusals()
    assert len(refusals) == 1 and refusals[0]["url"].endswith("broken.pth") and refusals[0]["reason"]

    # the unchanged bad file is not tried again and does not fail the scan; the good content is
    # not touched
    again = watch_checkpoints(params=params, **common)
    assert (again["started"], again["failed"], again["refused"]) == (0, 0, 1)
    assert len(reg.refusals()) == 1
    assert reg.get(row["sha256"], phash)["finished_at"] == row["finished_at"]

    (ckpts / "broken.pth").unlink()
    second = watch_checkpoints(params=params, **common)
    assert second["started"] == 0
    assert {r["action"] for r in second["files"]} == {"already-analysed", "alias"}

    changed = {**params, "gamma": 0.95}
    third = watch_checkpoints(params=changed, **common)
    assert (third["started"], third["completed"]) == (1, 1)
    assert len(reg.analyses("completed")) == 2
    new_out = Path(reg.get(row["sha256"], params_hash(changed))["out_dir"])
    assert new_out != out and (new_out / "detection.csv").is_file()


@pytest.mark.slow
def test_watcher_reads_fsspec_urls(tmp_path, assets_dir, tiny_data, prefect_api) -> None:
    import fsspec

    from polysemantic_disentangle.flows.watch.registry import Registry

    from polysemantic_disentangle.flows.watch.flow import watch_checkpoints
    from polysemantic_disentangle.tasks.data.assets import sha256_file

    fs = fsspec.filesystem("memory")
    folder = f"/watch-{uuid.uuid4().hex[:8]}"
    fs.pipe(f"{folder}/nets/resnet20.th", assets_dir.joinpath(*RESNET20).read_bytes())
    registry = tmp_path / "registry.sqlite"
    scan = dict(location=f"memory://{folder}/nets", params={**TINY, **tiny_data}, registry=str(registry))

    first = watch_checkpoints(**scan)
    assert (first["started"], first["completed"]) == (1, 1)
    row = Registry(registry).analyses("completed")[0]
    assert row["checkpoint"] == f"memory://{folder}/nets/resnet20.th"
    assert row["sha256"] == sha256_file(assets_dir.joinpath(*RESNET20))
    assert Path(row["weights"]) == registry.parent / "downloads" / f"{row['sha256']}.th"
    assert (Path(row["out_dir"]) / "detection.csv").is_file()
    assert watch_checkpoints(**scan)["started"] == 0
    fs.rm(folder, recursive=True)


@pytest.mark.slow
def test_watcher_through_a_deployment(tmp_path, assets_dir, prefect_api) -> None:
    """Deployment mode: the watcher creates the run and the next scans follow its state (no
    worker here: the runs' final states are set through the API)."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed

    from polysemantic_disentangle.flows.pipeline import disentangle_all_layers
    from polysemantic_disentangle.flows.watch.registry import Registry
    from polysemantic_disentangle.flows.watch.flow import watch_checkpoints

    name = f"watch-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        flow_id = client.create_flow(disentangle_all_layers)
        deployment_id = client.create_deployment(
            flow_id=flow_id, name=name, entrypoint="flows/pipeline.py:disentangle_all_layers",
            enforce_parameter_schema=False)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    shutil.copyfile(assets_dir.joinpath(*RESNET20), ckpts / "resnet20.th")
    registry = tmp_path / "registry.sqlite"
    scan = dict(location=str(ckpts), registry=str(registry), params={"gamma": 0.9},
                deployment=f"disentangle-all-layers/{name}", wait=False)

    first = watch_checkpoints(**scan)
    assert (first["started"], first["files"][0]["status"]) == (1, "running")
    reg = Registry(registry)
    row = reg.analyses()[0]
    assert row["status"] == "running" and row["deployment"] == scan["deployment"]
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(row["flow_run_id"])
        assert run.deployment_id == deployment_id
        assert run.parameters["params"]["weights"] == str(ckpts / "resnet20.th")
        assert run.parameters["params"]["out_dir"] == row["out_dir"]
        assert run.parameters["params"]["gamma"] == 0.9

        assert watch_checkpoints(**scan)["files"][0]["action"] == "running-elsewhere"
        client.set_flow_run_state(run.id, Failed(message="worker lost"), force=True)
        retried = watch_checkpoints(**scan)
        assert retried["started"] == 1
        row = reg.analyses()[0]
        assert row["attempts"] == 2 and row["flow_run_id"] != str(run.id)
        client.set_flow_run_state(row["flow_run_id"], Completed(), force=True)
    last = watch_checkpoints(**scan)
    assert last["started"] == 0 and last["files"][0]["action"] == "already-analysed"
    assert reg.analyses()[0]["status"] == "completed"


# --------------------------------------------------------------------------------------------
# the deployment path, for real: server, pool, deploy, run, worker


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group (workers and servers ignore SIGINT), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
    except ProcessLookupError:
        pass
    proc.wait(timeout=20)


@pytest.mark.slow
def test_deployment_run_through_a_process_worker(tmp_path, assets_dir) -> None:
    t0 = time.monotonic()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=api,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1", PREFECT_CLI_PROMPT="false",
               PREFECT_LOGGING_LEVEL="INFO", PYTHONUNBUFFERED="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []
    timings: dict[str, float] = {}

    def cli(*args: str, timeout: float = 180, ok: bool = True) -> str:
        t = time.monotonic()
        res = subprocess.run([PREFECT, *args], env=env, cwd=PROJECT_ROOT, capture_output=True,
                             text=True, timeout=timeout, start_new_session=True)
        timings[" ".join(args[:3])] = round(time.monotonic() - t, 1)
        assert (res.returncode == 0) == ok, f"prefect {' '.join(args)}: rc {res.returncode}\n{res.stdout}\n{res.stderr}"
        return res.stdout + res.stderr

    def background(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "w")
        proc = subprocess.Popen([PREFECT, *args], env=env, cwd=PROJECT_ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    def tail(name: str) -> str:
        return (logs / f"{name}.log").read_text()[-6000:]

    try:
        # --no-scheduler: the watcher's schedule must not add runs for this one-shot worker
        server = background("server", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                            "--no-scheduler", "--no-ui")
        deadline = time.monotonic() + 300  # a loaded 2-core machine can take minutes
        while True:
            assert server.poll() is None, f"server exited:\n{tail('server')}"
            try:
                with urllib.request.urlopen(f"{api}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"server not healthy:\n{tail('server')}"
            time.sleep(0.5)
        timings["server healthy"] = round(time.monotonic() - t0, 1)

        cli("work-pool", "create", "disentangle-pool", "--type", "process")
        cli("deploy", "--all")

        data = tmp_path / "data"
        params = {
            "train_dir": str(cifar_subset(assets_dir, data / "train", "train", 20)),
            "eval_dir": str(cifar_subset(assets_dir, data / "test", "test", 10)),
            "max_per_class_train": 20, "max_per_class_eval": 10, "check_images": 50,
            "rho_max_images": 16, "chunk_images": 100, "batch_size": 50, "shard_chunks": 2,
            "gamma": 0.9, "max_rewired_per_layer": 2, "featvis_channels": 1, "featvis_steps": 8,
            "out_dir": str(tmp_path / "out"),
        }
        # the two command-line forms of a pydantic-model parameter give the same parameters;
        # the second run is scheduled an hour ahead, so the one-shot worker leaves it alone
        out = cli("deployment", "run", "disentangle-all-layers/cifar10-demo",
                  "-p", f"params={json.dumps(params)}")
        run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", out).group(1)
        later = cli("deployment", "run", "disentangle-all-layers/cifar10-demo",
                    "--params", json.dumps({"params": params}), "--start-in", "1 hour")
        later_id = re.search(r"UUID:\s*([0-9a-f-]{36})", later).group(1)
        # a value of the wrong type is refused when the run is created (parameter schema)
        refused = cli("deployment", "run", "disentangle-all-layers/cifar10-demo",
                      "-p", 'params={"gamma": "high"}', ok=False)
        assert "gamma" in refused, refused

        t = time.monotonic()
        worker = background("worker", "worker", "start", "--pool", "disentangle-pool", "--run-once")
        try:
            worker.wait(timeout=600)
        except subprocess.TimeoutExpired:
            pytest.fail(f"worker did not finish:\n{tail('worker')}")
        timings["worker --run-once"] = round(time.monotonic() - t, 1)
        assert worker.returncode == 0, tail("worker")

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            run = client.read_flow_run(run_id)
            assert run.state.is_completed(), f"{run.state}\n{tail('worker')}"
            assert run.parameters == {"params": params}
            assert client.read_flow_run(later_id).parameters == {"params": params}
            assert client.read_flow_run(later_id).state.is_scheduled()

            demo = client.read_deployment_by_name("disentangle-all-layers/cifar10-demo")
            assert demo.work_pool_name == "disentangle-pool"
            assert demo.pull_steps == [{"prefect.deployments.steps.set_working_directory":
                                        {"directory": str(PROJECT_ROOT)}}]
            assert demo.parameters["params"]["out_dir"] == "runs/cifar10-demo"
            watcher = client.read_deployment_by_name("watch-checkpoints/new-checkpoints")
            assert [s.schedule.interval.total_seconds() for s in watcher.schedules] == [21600]
            assert watcher.parameters["patterns"] == ["*.th", "*.pt", "*.pth"]

        outputs = Path(params["out_dir"])
        assert (outputs / "disentangled.pt").stat().st_size > 0
        assert (outputs / "detection.csv").read_text().count("\n") > 1
        assert (outputs / "report.html").is_file()
        summary = json.loads((outputs / "summary.json").read_text())
        # the numbers are this run's: its parameters reached the report stage
        assert {k: summary["params"][k] for k in ("gamma", "chunk_images", "max_per_class_train")} == \
            {k: params[k] for k in ("gamma", "chunk_images", "max_per_class_train")}
        assert summary["detection"]
        from polysemantic_disentangle.tasks.defaults import REPORT_MAX_BYTES

        page = (outputs / "report.html").read_text(encoding="utf-8")
        # the demo's report opens with its findings and stays small enough for a browser
        assert re.findall(r"<h2[^>]*>(.*?)</h2>", page)[0] == "Findings"
        assert len(page.encode()) < REPORT_MAX_BYTES
    finally:
        for proc in reversed(procs):
            _stop(proc)
        timings["total"] = round(time.monotonic() - t0, 1)
        print("deployment test timings (s):", json.dumps(timings))
