"""Idle OpenMP threads sleep in every process the package starts (unless the user chose a
policy): spinning threads on a busy machine burn the cores the work needs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = ("import polysemantic_disentangle, torch, os; "
         "print(os.environ.get('OMP_WAIT_POLICY'), torch.get_num_threads() >= 1)")


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_wait_policy_is_set_before_torch_loads(given: str | None, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [expected, "True"]
