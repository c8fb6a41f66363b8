"""The project imports under one distinctive name, so a user's own modules named like its
folders (a ``tasks.py`` or ``storage.py`` beside a notebook) cannot shadow it."""

from __future__ import annotations

import subprocess
import sys


def test_own_tasks_and_storage_modules_do_not_shadow_the_project(tmp_path) -> None:
    (tmp_path / "tasks.py").write_text("raise ImportError('the user tasks.py was imported')\n")
    (tmp_path / "storage.py").write_text("raise ImportError('the user storage.py was imported')\n")
    (tmp_path / "flows.py").write_text("raise ImportError('the user flows.py was imported')\n")
    code = ("from polysemantic_disentangle.storage import open_cube\n"
            "from polysemantic_disentangle.flows.params import PipelineParams\n"
            "from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams\n"
            "import sys\n"
            "assert 'tasks' not in sys.modules and 'storage' not in sys.modules, sorted(sys.modules)\n"
            "print(PipelineParams().resolved().model)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "cifar_resnet20"
