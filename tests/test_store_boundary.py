"""Only ``storage/`` knows the store layout: a static scan of every module under ``flows/`` and
``tasks/`` for zarr, for the low-level store opener, and for the array and group names that
``storage.cube`` declares."""

from __future__ import annotations

import ast
from pathlib import Path

from polysemantic_disentangle.storage import cube

ROOT = Path(__file__).resolve().parents[1]
PRODUCT = ("flows", "tasks")
# Raw access to a store: the zarr package, dask's zarr reader, the root-group opener and the
# chunk-level writers (the typed CubeReader/CubeWriter wrap them).
FORBIDDEN_NAMES = {"zarr", "from_zarr", "open_zarr", "to_zarr", "open_store_group", "write_chunk",
                   "record_chunk_writer", "write_class_stats", "read_class_stats"}
FORBIDDEN_ATTRIBUTES = {"from_zarr", "open_zarr", "to_zarr", "open_group", "open_consolidated", "open_store_group"}
# Names distinctive enough that any string literal equal to one names the store.
DISTINCTIVE = {cube.RELEVANCE_ARRAY, cube.ACTIVATION_MAX_ARRAY, cube.ACTIVATION_MEAN_ARRAY, cube.MOMENTS_ARRAY,
               cube.MOMENT_SUMS_ARRAY, cube.ACTIVATION_SUMS_ARRAY, cube.CHUNK_DONE_ARRAY, cube.CHUNK_WRITER_ARRAY,
               "image_path", "class_wnid", "skip_reason", "target_logit", *cube.STATS_ARRAY_DIMS} - {"count"}


def _prose_and_keys(tree: ast.AST) -> set[int]:
    """Docstrings (prose) and keys of dict displays (fields of a result, not store names)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
        if isinstance(node, ast.Dict):
            out.update(id(k) for k in node.keys if k is not None)
    return out


def store_access(source: str) -> list[tuple[int, str]]:
    """(line, what) for every place ``source`` reaches into a store's layout."""
    tree = ast.parse(source)
    docs = _prose_and_keys(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name.split(".")[0] == "zarr"]
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] == "zarr":
                found.append((node.lineno, f"from {node.module} import"))
            found += [(node.lineno, f"import {a.name}") for a in node.names if a.name in FORBIDDEN_NAMES]
        elif isinstance(node, ast.Attribute) and node.attr in FORBIDDEN_ATTRIBUTES:
            found.append((node.lineno, f".{node.attr}"))
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_NAMES:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                and isinstance(node.slice.value, str) and node.slice.value in cube.STORE_ARRAYS:
            found.append((node.lineno, f"[{node.slice.value!r}]"))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            head = node.value.split("/")[0]
            if node.value in DISTINCTIVE or ("/" in node.value and head in cube.STORE_GROUPS):
                found.append((node.lineno, repr(node.value)))
    return found


def test_scan_catches_every_kind_of_raw_access():
    # The oracle for the scan itself: each line reaches into the layout in another way.
    bad = '''
import zarr
from polysemantic_disentangle.storage.cube import open_store_group
x = da.from_zarr(arr)
labels = root["label"][:]
rel = group["relevance"]
path = "stats/detection"
name = "activation_max"
'''
    assert sorted({line for line, _ in store_access(bad)}) == [2, 3, 4, 5, 6, 7, 8]
    clean = '''
"""Docstring naming relevance and stats/detection is prose."""
from polysemantic_disentangle.storage.cube import CubeReader
cube = CubeReader(url)
rel = cube.relevance("layer3.2.conv2")
summary = {"label": 1, "image_path": "a.png"}
cube.write_chunk(0, data)
'''
    assert store_access(clean) == []


def test_no_module_outside_storage_names_the_store_layout():
    offenders = []
    files = sorted(p for folder in PRODUCT for p in (ROOT / folder).rglob("*.py"))
    assert len(files) > 30  # the scan really ran over the product code
    for path in files:
        for line, what in store_access(path.read_text()):
            offenders.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert offenders == [], "store layout named outside storage/:\n" + "\n".join(offenders)
