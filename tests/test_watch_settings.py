"""The watcher's settings: its flat flow parameters, checked and resolved before any file is
read (no Prefect API needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

FLOW_DEFAULTS = dict(patterns=None, params=None, runs_root=None, cache_dir=None, deployment=None, wait=True,
                     storage_options=None, rehash=False, stale_after_hours=48.0, fail_on_error=True,
                     poll_seconds=5.0, wait_timeout_seconds=6 * 3600.0, trends="folder", settle_seconds=600.0)


def test_settings_resolve_the_documented_defaults(tmp_path: Path) -> None:
    from polysemantic_disentangle.flows.watch.registry import params_hash
    from polysemantic_disentangle.flows.watch.settings import WatchSettings

    registry = tmp_path / "watch" / "registry.sqlite"
    settings = WatchSettings.from_parameters(**{**FLOW_DEFAULTS, "params": {"gamma": 0.8}},
                                             location="ckpts", registry=str(registry))
    assert settings.patterns == ["*.th", "*.pt", "*.pth"]
    assert settings.params_hash == params_hash({"gamma": 0.8}) != params_hash({})
    assert settings.pipeline_params["gamma"] == 0.8 and "out_dir" not in settings.pipeline_params
    assert settings.runs_root == registry.parent and settings.cache_dir == registry.parent / "downloads"
    assert settings.stale_after_s == 48 * 3600
    sha = "ab" * 32
    assert settings.out_dir(sha) == str(registry.parent / f"{sha[:12]}-{settings.params_hash[:8]}")
    assert settings.resolved_location == str(Path("ckpts").resolve())
    assert not registry.parent.exists()  # settings read and write nothing

    one = WatchSettings.from_parameters(**{**FLOW_DEFAULTS, "patterns": "**/*.pt", "runs_root": str(tmp_path / "o")},
                                        location="s3://bucket/ckpts", registry=str(registry))
    assert one.patterns == ["**/*.pt"] and one.runs_root == tmp_path / "o"
    assert one.resolved_location == "s3://bucket/ckpts"


@pytest.mark.parametrize("params, match", [({"out_dir": "x"}, "out_dir"), ({"tau": -1}, "tau")])
def test_settings_refuse_bad_pipeline_parameters_before_touching_the_registry(tmp_path: Path, params, match) -> None:
    from polysemantic_disentangle.flows.watch.settings import WatchSettings

    registry = tmp_path / "watch" / "registry.sqlite"
    with pytest.raises(ValueError, match=match):
        WatchSettings.from_parameters(**{**FLOW_DEFAULTS, "params": params}, location="ckpts",
                                      registry=str(registry))
    assert not registry.parent.exists()
