"""The floor plan holds: a stage builds on earlier stages and on the infrastructure, never on a
later stage; the infrastructure (models, data, the store and the shared top-level modules) never
reaches into a stage; and no two modules import each other, directly or round a loop.

Every import counts, the ones inside functions too: a lazy import is still a dependency."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "polysemantic_disentangle"
STAGE = re.compile(r"^tasks\.stage(\d+)_")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for folder in ("tasks", "storage") for p in sorted((ROOT / folder).rglob("*.py"))}


def imports_of(source: str, modules: set[str]) -> set[str]:
    """The project modules ``source`` imports (``from pkg import mod`` resolves to the module)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            base = node.module[len(PACKAGE) + 1:]
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name[len(PACKAGE) + 1:] for a in node.names if a.name.startswith(PACKAGE + ".")]
        out.update(n for n in names if n in modules)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    names = set(modules)
    return {m: imports_of(p.read_text(encoding="utf-8"), names) - {m} for m, p in modules.items()}


def _stage(module: str) -> int | None:
    m = STAGE.match(module)
    return int(m.group(1)) if m else None


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for src, targets in sorted(graph.items()):
        own = _stage(src)
        for dst in sorted(targets):
            theirs = _stage(dst)
            if theirs is None:
                continue
            if own is None:
                out.append(f"{src} (infrastructure) imports the stage module {dst}")
            elif theirs > own:
                out.append(f"{src} (stage {own}) imports the later stage module {dst}")
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_stages_build_only_on_earlier_stages_and_infrastructure() -> None:
    assert layering_violations(import_graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph()) == []


def test_package_imports_resolve_to_modules() -> None:
    # "from polysemantic_disentangle.tasks import defaults" is the module tasks.defaults
    names = {"tasks", "tasks.defaults", "tasks.stage1_extract.relevance"}
    src = ("from polysemantic_disentangle.tasks import defaults\n"
           "def f():\n    from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance\n")
    assert imports_of(src, names) == {"tasks.defaults", "tasks.stage1_extract.relevance"}


@pytest.mark.parametrize(("graph", "expected"), [
    ({"tasks.data.a": {"tasks.stage2_reduce.b"}, "tasks.stage2_reduce.b": set()},
     ["tasks.data.a (infrastructure) imports the stage module tasks.stage2_reduce.b"]),
    ({"tasks.stage3_detect.a": {"tasks.stage5_evaluate.b"}, "tasks.stage5_evaluate.b": set()},
     ["tasks.stage3_detect.a (stage 3) imports the later stage module tasks.stage5_evaluate.b"]),
    ({"tasks.stage5_evaluate.a": {"tasks.stage3_detect.b", "tasks.models.c"}}, []),
])
def test_the_rule_catches_what_it_forbids(graph: dict[str, set[str]], expected: list[str]) -> None:
    assert layering_violations(graph) == expected


def test_the_cycle_search_finds_a_loop() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


# ---------------------------------------------------------------------------------------------
# the pipeline is a client of the public face

FACE = ROOT / PACKAGE / "api.py"
PIPELINE = ROOT / "flows" / "pipeline.py"
# Modules that hold records, parameters or writers rather than the method: the flow may import
# them to write and read its files.
NOT_METHOD = ("records", "params", "files")


def face_covered_modules() -> set[str]:
    """The stage, model and data modules whose work the face (``api.py``) does for its callers."""
    face = imports_of(FACE.read_text(encoding="utf-8"), set(_modules()))
    return {m for m in face if (_stage(m) is not None or m.startswith(("tasks.models.", "tasks.data.")))
            and m.rsplit(".", 1)[-1] not in NOT_METHOD}


def test_the_face_covers_every_step_of_the_method() -> None:
    # an independent list: were the face to stop importing these, the rule below would go blind
    assert {"tasks.models.registry", "tasks.data.images", "tasks.stage1_extract.chunks",
            "tasks.stage2_reduce.reduce", "tasks.stage3_detect.detect", "tasks.stage4_rewire.plan",
            "tasks.stage4_rewire.rewire", "tasks.stage4_rewire.checkpoint", "tasks.stage4_rewire.export",
            "tasks.stage5_evaluate.evaluate_run"} <= face_covered_modules()


def test_the_pipeline_runs_the_method_only_through_the_face() -> None:
    source = PIPELINE.read_text(encoding="utf-8")
    direct = sorted(imports_of(source, set(_modules())) & face_covered_modules())
    assert direct == [], f"flows/pipeline.py imports what polysemantic_disentangle.api covers: {direct}"
    assert any(isinstance(node, ast.ImportFrom) and node.module == PACKAGE and any(a.name == "api" for a in node.names)
               for node in ast.walk(ast.parse(source))), "flows/pipeline.py does not use polysemantic_disentangle.api"


def test_the_extraction_flow_plans_and_writes_chunks_through_the_face() -> None:
    # Its shards keep the device helpers (placement, batch size, decoders) of stage 1; the
    # method's two calls, planning the cube and writing chunks, are the face's.
    tree = ast.parse((ROOT / "flows" / "extract.py").read_text(encoding="utf-8"))
    imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
    assert not imported & {"plan_cube", "extract_chunks", "load_model"}, imported
    called = {node.func.attr for node in ast.walk(tree) if isinstance(node, ast.Call)
              and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name)
              and node.func.value.id == "api"}
    assert {"plan_extraction", "extract_chunks", "load_model"} <= called, called


def test_the_face_rule_catches_a_direct_import() -> None:
    src = "def f():\n    from polysemantic_disentangle.tasks.stage4_rewire.rewire import rewire_model\n"
    assert imports_of(src, set(_modules())) & face_covered_modules() == {"tasks.stage4_rewire.rewire"}
