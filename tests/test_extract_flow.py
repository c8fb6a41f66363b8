"""The extraction flow through a real Prefect API: fan-out, resume after a real kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from polysemantic_disentangle.storage.cube import completed_chunks, open_store_group
from tests.conftest import PROJECT_ROOT, add_bad_images, cifar_subset

pytestmark = pytest.mark.slow


def _arrays(url: str) -> dict[str, np.ndarray]:
    root = open_store_group(url)
    out = {}
    for path, arr in root.arrays():
        out[path] = arr[:]
    for layer in root["layers"].group_keys():
        for name, arr in root["layers"][layer].arrays():
            out[f"{layer}/{name}"] = arr[:]
    return out


def test_killed_run_resumes_to_identical_store(tmp_path, assets_dir, prefect_api) -> None:
    from prefect.settings import PREFECT_API_URL

    from polysemantic_disentangle.flows.extract import extract_relevance_cube

    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=64)
    add_bad_images(data, "dog")
    common = dict(data_dir=str(data), layers="all", chunk_images=32, shard_chunks=4, batch_size=16)

    reference = str(tmp_path / "reference.zarr")
    extract_relevance_cube(store_url=reference, **common)

    killed = str(tmp_path / "killed.zarr")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(PROJECT_ROOT)}
    cmd = [sys.executable, "-m", "polysemantic_disentangle.flows.cli", "extract", "--data-dir", str(data), "--store", killed,
           "--chunk-images", "32", "--shard-chunks", "4", "--batch-size", "16"]
    proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    done_at_kill = None
    try:
        while time.time() < deadline and proc.poll() is None:
            try:
                done = completed_chunks(killed)
            except Exception:  # the store is not created yet
                done = None
            if done is not None and done.sum() >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                done_at_kill = int(done.sum())
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert done_at_kill is not None, "the run finished or failed before it could be killed"
    n_chunks = len(completed_chunks(killed))
    assert completed_chunks(killed).sum() < n_chunks, "killed too late to test resuming"

    extract_relevance_cube(store_url=killed, **common)
    assert completed_chunks(killed).all()
    ref, got = _arrays(reference), _arrays(killed)
    assert set(ref) == set(got)
    for name in ref:
        if ref[name].dtype.kind == "f":
            np.testing.assert_array_equal(ref[name], got[name], err_msg=name)  # NaN == NaN here
        else:
            assert (ref[name] == got[name]).all(), name
    assert ref["skipped"].sum() == 2
    # The class-sum partials are part of the identical store: a resumed chunk overwrote its
    # own slab instead of adding to it, so every usable image is counted exactly once.
    assert any(name.endswith("/moment_sums") for name in ref)
    from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube

    a, b = reduce_cube(reference, tau=0.03), reduce_cube(killed, tau=0.03)
    usable = int((~ref["skipped"]).sum())
    for layer in a:
        assert int(b[layer].count.sum()) == usable
        np.testing.assert_array_equal(a[layer].mean_moments, b[layer].mean_moments)
