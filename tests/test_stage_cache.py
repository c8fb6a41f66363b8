"""Stage records are skipped only when what the stage produced is still there."""

from __future__ import annotations

import shutil

import pytest

from polysemantic_disentangle.flows.pipeline import STATS_SUBSET, reduce_cached, reduce_task
from polysemantic_disentangle.flows.runtime.stage_cache import StageCache
from polysemantic_disentangle.storage.cube import STATS_GROUP, cube_info, open_store_group
from polysemantic_disentangle.tasks.stage2_reduce.reduce import read_stats


def test_reduce_record_needs_the_statistics_in_the_store(small_cube, tmp_path) -> None:
    original, _, _ = small_cube
    url = str(tmp_path / "train.zarr")
    shutil.copytree(original, url)
    info = cube_info(url)
    layers = list(info["layers"])
    cache = StageCache(tmp_path / "run")
    key = {"train": info["fingerprint"], "tau": 0.03, "correct_only": False}

    assert not reduce_cached(cache, key, url)
    reduce_task.fn(url, 0.03, False, None)
    cache.store("reduce", key, {"store": url})
    assert reduce_cached(cache, key, url)
    assert set(read_stats(url, STATS_SUBSET, layers)) == set(layers)

    # One layer's statistics gone (the consolidated metadata still lists them).
    del open_store_group(url, mode="r+")[f"{STATS_GROUP}/{STATS_SUBSET}/{layers[-1]}"]
    assert cache.hit("reduce", key)
    assert not reduce_cached(cache, key, url)

    # Extracted again from the same inputs: same fingerprint, same key, no statistics.
    reduce_task.fn(url, 0.03, False, None)
    assert reduce_cached(cache, key, url)
    shutil.rmtree(url)
    shutil.copytree(original, url)
    assert cube_info(url)["fingerprint"] == info["fingerprint"]
    assert cache.hit("reduce", key)
    assert not reduce_cached(cache, key, url)
    with pytest.raises(Exception):  # what the detect stage would have met
        read_stats(url, STATS_SUBSET, layers)
