"""Scale-out on loopback: a real Dask scheduler and worker processes, a real S3 HTTP API (moto's
server), the extraction and the whole pipeline through a real Prefect API.

Oracle: the same inputs run in one process into a local directory.
"""

from __future__ import annotations

import csv
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from polysemantic_disentangle.flows.runtime.cluster import stop_process_group
from polysemantic_disentangle.storage.cube import chunk_writers, completed_chunks, open_store_group
from tests.conftest import PROJECT_ROOT, cifar_subset
from tests.test_progress import latest_progress_artifact

pytestmark = pytest.mark.slow

BUCKET = "disentangle-test"
LAYERS = ["layer2.2.conv2", "layer3.2.conv2"]
# 8 images per class -> 80 images in 10 chunks of 8, shards of 3 chunks: 4 shards.
EXTRACT = dict(layers=LAYERS, chunk_images=8, shard_chunks=3, batch_size=8)
SECRET = "s3cr3t-" + secrets.token_hex(12)
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    # Own process group: teardown kills exactly what was started here.
    return subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1, credentials and endpoint in the standard AWS variables."""
    port = _free_port()
    proc = _start([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], dict(os.environ))
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="test-key-id", AWS_SECRET_ACCESS_KEY=SECRET,
                      AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1")
    try:
        _wait_http(endpoint)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        yield fs
    finally:
        stop_process_group(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def cluster(s3, prefect_api):
    """``dask scheduler`` and two ``dask worker --nthreads 1 --resources GPU=1`` processes on
    127.0.0.1 (CPU standing in for the GPU); they read the S3 credentials from the environment."""
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT_ROOT)}
    procs = [_start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--no-dashboard"], env)]
    try:
        for i in range(2):
            procs.append(_start([str(BIN / "dask"), "worker", address, "--name", f"gpu-{i}",
                                 "--host", "127.0.0.1", "--nthreads", "1", "--resources", "GPU=1",
                                 "--no-dashboard"], env))
        client = None
        deadline = time.time() + 120
        while client is None:
            try:
                client = Client(address, timeout=5)
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        with client:
            client.wait_for_workers(2, timeout=120)
            yield address, client
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)


def _worker_pids(client) -> set[int]:
    return set(client.run(os.getpid).values())


@pytest.fixture(scope="module")
def images(tmp_path_factory, assets_dir) -> Path:
    return cifar_subset(assets_dir, tmp_path_factory.mktemp("dist-data"), "test", per_class=8)


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory, images, prefect_api) -> str:
    """The same extraction in this process (threads) into a local directory."""
    from polysemantic_disentangle.flows.extract import extract_relevance_cube

    url = str(tmp_path_factory.mktemp("dist-ref") / "cube.zarr")
    extract_relevance_cube(data_dir=str(images), store_url=url, **EXTRACT)
    return url


def _arrays(url: str) -> dict[str, np.ndarray]:
    root = open_store_group(url)
    out = {path: arr[:] for path, arr in root.arrays()}
    for layer in root["layers"].group_keys():
        for name, arr in root["layers"][layer].arrays():
            out[f"{layer}/{name}"] = arr[:]
    return out


def _assert_same_store(reference: str, got: str) -> None:
    ref, new = _arrays(reference), _arrays(got)
    assert set(ref) == set(new) and len(ref) > 10
    for name in ref:
        if ref[name].dtype.kind == "f":
            np.testing.assert_array_equal(ref[name], new[name], err_msg=name)  # NaN == NaN here
        else:
            assert (ref[name] == new[name]).all(), name
    assert open_store_group(got).attrs["fingerprint"] == open_store_group(reference).attrs["fingerprint"]


def _writer_pids(url: str) -> list[int]:
    return [int(w.split("/")[1]) for w in chunk_writers(url)]


def test_shards_run_on_both_workers_into_s3(cluster, s3, images, reference_store) -> None:
    from polysemantic_disentangle.flows.extract import extract_relevance_cube

    address, client = cluster
    url = f"s3://{BUCKET}/extract/cube.zarr"
    extract_relevance_cube(data_dir=str(images), store_url=url, dask_address=address, **EXTRACT)
    assert completed_chunks(url).all()
    writers = _writer_pids(url)
    assert set(writers) == _worker_pids(client), "every chunk written by one of the two workers, both used"
    assert os.getpid() not in writers
    _assert_same_store(reference_store, url)
    # Chunks are objects in the bucket: the data went through the S3 API.
    assert s3.find(f"{BUCKET}/extract/cube.zarr/layers/{LAYERS[1]}/relevance")
    # Written in the workers' processes, counted by the flow from the chunk markers.
    progress = latest_progress_artifact("progress-extract-detection-cube")
    assert float(progress.data) == 100.0 and progress.description.startswith("extract (detection cube): 80 images in ")


def test_worker_killed_mid_shard_is_retried_elsewhere(cluster, images, reference_store) -> None:
    from polysemantic_disentangle.flows.extract import extract_relevance_cube

    address, client = cluster
    url = f"s3://{BUCKET}/killed/cube.zarr"
    killed: dict[str, int] = {}

    def kill_first_writer() -> None:
        # The first chunk to finish is the first of its shard (every shard has >= 2 chunks), so
        # its writer is killed with that shard half done.
        deadline = time.time() + 240
        while time.time() < deadline:
            try:
                done = completed_chunks(url)
                writers = chunk_writers(url)
            except Exception:  # the store is not there yet
                time.sleep(0.05)
                continue
            written = [w for d, w in zip(done, writers) if d and w]
            if written:
                pid = int(written[0].split("/")[1])
                os.kill(pid, signal.SIGKILL)
                killed.update(pid=pid, done=int(done.sum()), total=len(done))
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_first_writer, daemon=True)
    watcher.start()
    extract_relevance_cube(data_dir=str(images), store_url=url, dask_address=address, **EXTRACT)
    watcher.join(5)
    assert killed, "no chunk was written while the watcher looked"
    assert killed["done"] < killed["total"], "killed too late to test a lost shard"
    assert completed_chunks(url).all()
    _assert_same_store(reference_store, url)
    client.wait_for_workers(2, timeout=120)  # the nanny restarts the killed worker
    assert killed["pid"] not in _worker_pids(client)


TINY = dict(max_per_class_train=8, max_per_class_eval=4, check_images=20, rho_max_images=8,
            chunk_images=16, batch_size=16, shard_chunks=2, gamma=0.9, p=0.5,
            layers=["layer3.2.conv1", "layer3.2.conv2"], max_rewired_per_layer=1, featvis_channels=0)


def _logits(checkpoint: Path, images) -> np.ndarray:
    import torch

    from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import load_disentangled

    model, _ = load_disentangled(checkpoint)
    with torch.no_grad():
        return model(images).numpy()


def test_pipeline_with_s3_cubes_and_outputs_on_the_cluster_equals_local(
        cluster, s3, tmp_path, assets_dir, prefect_api) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter

    from polysemantic_disentangle.flows.params import PipelineParams
    from polysemantic_disentangle.flows.pipeline import disentangle_all_layers
    from polysemantic_disentangle.tasks.data.images import load_batch
    from polysemantic_disentangle.tasks.models.registry import load_model

    address, client = cluster
    data = {"train_dir": str(cifar_subset(assets_dir, tmp_path / "train", "train", 8)),
            "eval_dir": str(cifar_subset(assets_dir, tmp_path / "test", "test", 4))}
    local = disentangle_all_layers(PipelineParams(**TINY, **data, out_dir=str(tmp_path / "local")))
    remote_dir = f"s3://{BUCKET}/runs/tiny"
    remote = disentangle_all_layers(PipelineParams(**TINY, **data, out_dir=remote_dir, dask_address=address))
    assert remote["train_store"] == f"{remote_dir}/cube-train.zarr"
    assert remote["checkpoint"] == f"{remote_dir}/disentangled.pt"
    assert set(_writer_pids(remote["train_store"])) <= _worker_pids(client)
    for name in ("detection.csv", "detection.json", "report.html", "summary.json", "disentangled.pt",
                 "disentangled.pt.json"):
        assert s3.exists(f"{BUCKET}/runs/tiny/{name}"), name
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    s3.get(f"{BUCKET}/runs/tiny/detection.csv", str(fetched / "detection.csv"))
    s3.get(f"{BUCKET}/runs/tiny/disentangled.pt", str(fetched / "disentangled.pt"))
    s3.get(f"{BUCKET}/runs/tiny/disentangled.pt.json", str(fetched / "disentangled.pt.json"))
    local_csv = (tmp_path / "local" / "detection.csv").read_text()
    assert (fetched / "detection.csv").read_text() == local_csv
    assert len(list(csv.DictReader(local_csv.splitlines()))) > 0
    assert local["rewired_channels"] == remote["rewired_channels"] >= 1
    bundle = load_model("cifar_resnet20")
    paths = [str(p.relative_to(data["eval_dir"])) for p in sorted(Path(data["eval_dir"]).rglob("*.jpg"))]
    batch, _, _ = load_batch(data["eval_dir"], paths[:16], bundle.transform)
    np.testing.assert_array_equal(_logits(fetched / "disentangled.pt", batch),
                                  _logits(Path(local["checkpoint"]), batch))

    # The secret key is nowhere: not in any object of the bucket (store metadata, class
    # statistics, report, summary, stage records), not in the Prefect logs.
    needle = SECRET.encode()
    objects = s3.find(BUCKET)
    assert any(p.endswith("/zarr.json") for p in objects) and any(p.endswith("summary.json") for p in objects)
    for path in objects:
        assert needle not in s3.cat_file(path), path
    with get_client(sync_client=True) as api:
        logs = api.read_logs(log_filter=LogFilter(), limit=200)
        offset = 200
        while True:
            more = api.read_logs(log_filter=LogFilter(), limit=200, offset=offset)
            if not more:
                break
            logs += more
            offset += 200
    assert not any(SECRET in log.message for log in logs)


def test_local_cluster_uses_the_runs_api_and_listens_on_loopback_only(prefect_api) -> None:
    """`--workers N`: every worker gets this process's Prefect API (so none starts a server of its
    own), and the scheduler, nannies and workers, their /health and /metrics endpoints included,
    listen on 127.0.0.1 only; on a normal exit every one of them is gone."""
    import psutil
    from distributed import Client
    from prefect.settings import PREFECT_API_URL

    from polysemantic_disentangle.flows.runtime.cluster import local_cluster

    def listening(pids: set[int]) -> list[tuple[int, str, int]]:
        return sorted((c.pid, c.laddr.ip, c.laddr.port) for c in psutil.net_connections("inet")
                      if c.status == psutil.CONN_LISTEN and c.pid in pids)

    with local_cluster(2) as address, Client(address) as client:
        urls = client.run(lambda: os.environ.get("PREFECT_API_URL"))
        workers = set(client.run(os.getpid).values())
        nannies = {psutil.Process(pid).ppid() for pid in workers}
        started = {p.pid for n in nannies for p in [psutil.Process(n), *psutil.Process(n).children(recursive=True)]}
        theirs = listening(started)
        scheduler_http = client.scheduler_info()["services"]["dashboard"]
        ours = [s for s in listening({os.getpid()}) if s[2] in (int(address.rsplit(":", 1)[1]), scheduler_http)]
    assert set(urls.values()) == {PREFECT_API_URL.value()}, urls
    assert len(nannies) == 2 and len(ours) == 2, (nannies, ours)
    assert {pid for pid, _, _ in theirs} >= workers | nannies, theirs
    assert len(theirs) >= 6, theirs  # a nanny: its Dask port; a worker: its Dask port and its HTTP server
    exposed = [s for s in theirs + ours if s[1] != "127.0.0.1"]
    assert not exposed, exposed

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.time() + 30
    while any(alive(pid) for pid in started):
        assert time.time() < deadline, "worker processes outlive their cluster"
        time.sleep(0.2)


def test_cluster_flags_parse_and_conflicts_fail_fast(capsys) -> None:
    from polysemantic_disentangle.flows.cli import build_parser, main, params_from_args

    params = params_from_args(build_parser().parse_args(["run", "--workers", "3"]))
    assert params.dask_workers == 3 and params.dask_address is None
    assert main(["run", "--workers", "2", "--dask-address", "tcp://127.0.0.1:8786"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["run", "--workers", "0"]) == 2
    assert "dask_workers must be positive" in capsys.readouterr().err
