"""Shared fixtures: real assets from ../shared/assets, small real cubes, a Prefect test API."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Prefect reads its settings at import: isolate its home (cached results leak otherwise) and
# keep telemetry off before any test module imports it.
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
# The package's own choice (polysemantic_disentangle/__init__.py), made before torch loads here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _assets_dir() -> Path:
    return Path(os.environ.get("DISENTANGLE_ASSETS", PROJECT_ROOT.parent / "shared" / "assets"))


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    path = _assets_dir()
    if not path.is_dir():
        pytest.fail(f"real assets not found at {path}; set DISENTANGLE_ASSETS")
    return path


@pytest.fixture(scope="module")
def resnet20_batch(assets_dir: Path):
    """ResNet-20 with its real CIFAR-10 weights, and two test photos of each class: (bundle,
    images, labels). Per module: tests put the model in eval mode and hook it."""
    from polysemantic_disentangle.tasks.data.images import load_batch, scan_image_folder
    from polysemantic_disentangle.tasks.models.registry import load_model

    bundle = load_model("cifar_resnet20")
    manifest = scan_image_folder(assets_dir / "cifar10" / "test", bundle.class_names, bundle.wnids,
                                 max_per_class=2)
    images, ok, _ = load_batch(manifest.root, manifest.paths, bundle.transform)
    assert ok.all()
    return bundle, images, torch.as_tensor(manifest.labels)


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    # The tests' convs are small: a second intra-op thread gains little and, on a shared
    # two-core machine, spinning threads slow them down several-fold.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (the test harness runs a temporary server on 127.0.0.1)."""
    from prefect.testing.utilities import prefect_test_harness

    # A hang guard, not a pace: on 2 cores at load 13 the server took more than 120 s to start.
    with prefect_test_harness(server_startup_timeout=300):
        yield


def cifar_subset(assets_dir: Path, dest: Path, split: str, per_class: int, offset: int = 0) -> Path:
    """An ImageFolder of real CIFAR-10 JPEGs (symlinks), ``per_class`` images of each class."""
    src = assets_dir / "cifar10" / split
    for cls in sorted(p.name for p in src.iterdir()):
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted((src / cls).iterdir())[offset:offset + per_class]:
            os.symlink(f, dest / cls / f.name)
    return dest


def add_bad_images(folder: Path, cls: str = "cat") -> dict[str, str]:
    """Put a truncated JPEG, a non-image, a grayscale, a CMYK and an RGBA image into ``folder/cls``."""
    target = folder / cls
    good = sorted(p for p in target.iterdir() if p.suffix == ".jpg")[0]
    data = Path(os.path.realpath(good)).read_bytes()
    (target / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    (target / "zz_not_an_image.jpg").write_bytes(b"this is not a jpeg")
    img = Image.open(good).convert("RGB")
    img.convert("L").save(target / "zz_gray.png")
    img.convert("CMYK").save(target / "zz_cmyk.jpg")
    img.convert("RGBA").save(target / "zz_rgba.png")
    return {"zz_truncated.jpg": "bad", "zz_not_an_image.jpg": "bad", "zz_gray.png": "ok",
            "zz_cmyk.jpg": "ok", "zz_rgba.png": "ok"}


@pytest.fixture(scope="session")
def small_cube(tmp_path_factory, assets_dir):
    """A real cube: ResNet-20, 24 CIFAR-10 test images per class, all 19 conv layers; the "full"
    float32 layout, so that it holds per-image moments and the class sums side by side."""
    from polysemantic_disentangle.storage.cube import CubeLayout
    from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
    from polysemantic_disentangle.tasks.models.registry import load_model

    root = tmp_path_factory.mktemp("small_cube")
    data = cifar_subset(assets_dir, root / "data", "test", per_class=24)
    url = str(root / "cube.zarr")
    bundle = load_model("cifar_resnet20")
    plan = plan_cube(bundle, str(data), url, "all", chunk_images=48, target_mode="label",
                     layout=CubeLayout.preset("full", dtype="float32"))
    extract_chunks(url, bundle.model.eval(), bundle.transform, str(data), range(plan.n_chunks),
                   plan.layers, batch_size=48)
    return url, bundle, data


def count_store_opens(monkeypatch) -> list[str]:
    """Record every Zarr store open from now on (the list grows as stores are opened)."""
    import zarr

    opened: list[str] = []
    for name in ("open_group", "open", "open_array", "open_consolidated"):
        real = getattr(zarr, name)

        def counting(*args, _real=real, **kwargs):
            opened.append(str(args[0] if args else kwargs.get("store")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(zarr, name, counting)
    return opened
