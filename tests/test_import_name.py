"""The project imports under one distinctive name, so a user's own modules named like its
folders (a ``tasks.py`` or ``storage.py`` beside a notebook) cannot shadow it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest


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


ROOT = Path(__file__).resolve().parents[1]


def test_bare_folder_names_refuse_to_import() -> None:
    """The checkout root is on the path (cwd, editable install), so ``tasks`` is findable; loaded
    under that name every file would become a second module object, so it refuses."""
    for name in ("tasks", "flows", "storage"):
        res = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode != 0 and f"import polysemantic_disentangle.{name}" in res.stderr, res.stderr


def test_every_project_file_loads_as_one_module_object() -> None:
    code = textwrap.dedent("""
        import pkgutil, importlib, sys, os, collections
        import polysemantic_disentangle as pkg
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                importlib.import_module(info.name)
        by_file = collections.defaultdict(set)
        for name, mod in list(sys.modules.items()):
            f = getattr(mod, "__file__", None)
            if f and os.path.realpath(f).startswith(sys.argv[1] + os.sep) and "/.venv/" not in f:
                by_file[os.path.realpath(f)].add(name)
        print(len(by_file))
        dup = {f: sorted(n) for f, n in by_file.items() if len(n) > 1}
        assert not dup, dup
    """)
    res = subprocess.run([sys.executable, "-c", code, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    on_disk = {p for folder in ("flows", "tasks", "storage") for p in (ROOT / folder).rglob("*.py")
               if p.name != "__main__.py"}
    assert int(res.stdout.split()[-1]) >= len(on_disk) + 1


def test_editors_resolve_the_public_names() -> None:
    """jedi (editor go-to, IPython/Jupyter completion) follows the import name statically."""
    import jedi

    env = jedi.create_environment(sys.prefix, safe=False)
    names = {
        "polysemantic_disentangle.storage": "open_cube",
        "polysemantic_disentangle.storage.cube": "CubeReader",
        "polysemantic_disentangle.flows.params": "PipelineParams",
        "polysemantic_disentangle.tasks.stage4_rewire.rewire": "ChannelSplit",
        "polysemantic_disentangle.tasks.stage3_detect.detect": "detect_layers",
    }
    for module, name in names.items():
        source = f"from {module} import {name}\n{name}"
        found = jedi.Script(source, path=str(ROOT.parent / "notebook.py"), environment=env).goto(
            2, 1, follow_imports=True)
        assert found and found[0].module_path is not None, (module, name)
        assert found[0].full_name == f"{module}.{name}" or found[0].full_name.endswith(f".{name}"), found
        assert Path(found[0].module_path).resolve().is_relative_to(ROOT), found[0].module_path
    import polysemantic_disentangle

    face = {c.name for c in jedi.Script("import polysemantic_disentangle as pdis\npdis.", environment=env).complete(2, 5)}
    assert set(polysemantic_disentangle.__all__) <= face, set(polysemantic_disentangle.__all__) - face
    for name in polysemantic_disentangle.__all__:
        script = jedi.Script(f"import polysemantic_disentangle as pdis\npdis.{name}", environment=env)
        found = script.goto(2, 6, follow_imports=True)
        assert found and found[0].module_path is not None, name
        assert Path(found[0].module_path).resolve().is_relative_to(ROOT), (name, found[0].module_path)
        doc = found[0].docstring()
        assert "Parameters" in doc and "Example" in doc, name  # help in the editor, with an example
    completions = {c.name for c in jedi.Script("import polysemantic_disentangle.tasks.stage4_rewire.",
                                               environment=env).complete()}
    assert {"rewire", "checkpoint", "plan"} <= completions, completions


@pytest.mark.skipif(not (ROOT / ".tools" / "bin" / "uv").is_file(), reason="the pinned uv is made by `make setup`")
def test_the_wheel_holds_the_same_package(tmp_path) -> None:
    """sdist then wheel (what an install from the index does): every file of the three folders is in
    the wheel under the one name, and a bare ``import tasks`` there finds nothing."""
    import sysconfig
    import zipfile

    res = subprocess.run([str(ROOT / ".tools" / "bin" / "uv"), "build", "-q", "-o", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    wheel = next(tmp_path.glob("*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {"polysemantic_disentangle/" + p.relative_to(ROOT).as_posix()
                for folder in ("flows", "tasks", "storage") for p in (ROOT / folder).rglob("*.py")}
    assert expected <= names, sorted(expected - names)
    assert not any(n.split("/")[0] in ("flows", "tasks", "storage") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import sys; sys.path[:0] = sys.argv[1:]\n"
            "import polysemantic_disentangle.flows.cli, polysemantic_disentangle.tasks.stage4_rewire.rewire\n"
            "try:\n    import tasks\nexcept ImportError:\n    pass\nelse:\n    raise SystemExit('tasks importable')\n")
    # -I -S: neither the checkout (cwd) nor the editable install's .pth is on the path
    res = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(site), sysconfig.get_paths()["purelib"]],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_package_imports_without_torch() -> None:
    """The command line's help imports the package; its face loads torch only on first use."""
    code = ("import sys, polysemantic_disentangle as p\n"
            "assert 'torch' not in sys.modules\n"
            "assert p.ModelSpec.__module__ == 'polysemantic_disentangle.tasks.models.spec'\n"
            "assert all(hasattr(p, n) for n in p.__all__)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
