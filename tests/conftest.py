"""Shared fixtures: the real assets live at ../shared/assets relative to the project root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _assets_dir() -> Path:
    return Path(os.environ.get("DISENTANGLE_ASSETS", PROJECT_ROOT.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    path = _assets_dir()
    if not path.is_dir():
        pytest.fail(f"real assets not found at {path}; set DISENTANGLE_ASSETS")
    return path


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    # CI has two cores; one intra-op thread per test process keeps runs predictable.
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
