"""Any architecture from the command line: ``--model package.module:callable`` (here a bare
``nn.Module`` wrapping ResNet-20, weights by ``--weights``, class names by ``--classes``) runs end
to end, its reference is recorded in the identity, a rerun finds its stores and stage results,
and ``load_disentangled(path, base=spec)`` rebuilds the rewired network with the same logits."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from PIL import Image

from polysemantic_disentangle.flows.cli import main
from polysemantic_disentangle.tasks.data.classes import CIFAR10_CLASSES
from polysemantic_disentangle.tasks.models.registry import load_model, read_state_dict
from polysemantic_disentangle.tasks.data.assets import cifar_resnet_checkpoint
from polysemantic_disentangle.tasks.stage4_rewire.checkpoint import BaseModelMismatch, load_disentangled
from tests.conftest import cifar_subset
from tests.user_models import trained_spec

FACTORY = "tests.user_models:bare_net"
SMALL = ["--max-per-class-train", "10", "--max-per-class-eval", "5", "--check-images", "20",
         "--rho-max-images", "8", "--chunk-images", "50", "--batch-size", "50", "--p", "0.5",
         "--layers", "backbone.layer3.2.conv2", "--rule", "lowest-k", "--k", "1",
         "--max-rewired-per-layer", "1", "--featvis-channels", "0"]


@pytest.fixture(scope="module")
def custom_run(tmp_path_factory, assets_dir: Path, prefect_api) -> dict:
    root = tmp_path_factory.mktemp("custom-model")
    train = cifar_subset(assets_dir, root / "train", "train", 10)
    test = cifar_subset(assets_dir, root / "test", "test", 5)
    weights = root / "my_net.pt"
    # The user's module wraps ResNet-20 as `backbone`: its state dict names carry that prefix.
    torch.save({f"backbone.{k}": v for k, v in read_state_dict(cifar_resnet_checkpoint(20)).items()}, weights)
    classes = root / "classes.txt"
    classes.write_text("# logit order\n" + "\n".join(CIFAR10_CLASSES) + "\n")
    argv = ["run", "--model", FACTORY, "--weights", str(weights), "--classes", str(classes),
            "--train-dir", str(train), "--eval-dir", str(test), "--out-dir", str(root / "run"), *SMALL]
    written = []
    for _ in range(2):  # the second run is the rerun: it must find what the first made
        buf = io.StringIO()
        with redirect_stdout(buf):
            rc = main(argv)
        assert rc == 0, buf.getvalue()[-3000:]
        written.append({str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "run").rglob("*")
                        if p.is_file() and (p.suffix in (".pt", ".csv") or "/c/" in str(p))})
    return {"out": root / "run", "weights": weights, "classes": classes, "test": test, "written": written}


@pytest.mark.slow
def test_a_callable_runs_end_to_end_and_is_found_again(custom_run) -> None:
    out = custom_run["out"]
    spec = json.loads((out / "disentangled.pt.json").read_text())
    reference = f"{FACTORY}?classes={custom_run['classes']}"
    assert spec["base"]["source"] == reference and spec["base"]["name"] == "my_net"
    assert spec["base"]["trained"] and spec["splits"]
    assert spec["splits"][0]["layer"] == "backbone.layer3.2.conv2"
    check = spec["extra"]["equivalence"]
    assert check["top1_changed"] == 0 and check["max_abs_logit_diff"] <= check["tolerance"]
    for name in ("cube-train.zarr", "cube-eval.zarr"):
        import zarr

        assert zarr.open_group(str(out / name), mode="r").attrs["model"]["source"] == reference
    # The rerun resumed both stores (no chunk rewritten) and took every stage from the run
    # folder (the checkpoint and the detection table are the first run's files).
    first, rerun = custom_run["written"]
    assert "run/disentangled.pt" in first and any(k.endswith(".csv") for k in first)
    assert any("/c/" in k for k in first)
    assert rerun == first


@pytest.mark.slow
def test_load_disentangled_with_the_users_spec_gives_the_same_logits(custom_run) -> None:
    ckpt = custom_run["out"] / "disentangled.pt"
    files = sorted(custom_run["test"].rglob("*.jpg"))[::3]
    base = trained_spec()  # built another way (weights loaded in the factory), same tensors
    x = torch.stack([base.transform(Image.open(f).convert("RGB")) for f in files])
    rewired, spec = load_disentangled(ckpt, base=base)
    with torch.no_grad():
        expected = base.model(x)
        torch.testing.assert_close(rewired(x), expected, rtol=1e-4, atol=1e-4)
        # Without a base the recorded reference rebuilds it: the same network.
        rebuilt, _ = load_disentangled(ckpt)
        torch.testing.assert_close(rebuilt(x), expected, rtol=1e-4, atol=1e-4)
    assert spec["base"]["state_sha256"] == base.state_sha256
    other = load_model(FACTORY + f"?classes={custom_run['classes']}", "random")
    with pytest.raises(BaseModelMismatch, match="not the ones"):
        load_disentangled(ckpt, base=other)


@pytest.mark.slow
def test_the_face_finds_the_clis_detection_table(custom_run) -> None:
    """The same model, images and parameters through the Python API give the command line's
    detection table (candidates, pairs, cosines, selection)."""
    import polysemantic_disentangle as pdis

    spec = load_model(f"{FACTORY}?classes={custom_run['classes']}", custom_run["weights"])
    train = custom_run["out"].parent / "train"
    cube = pdis.extract(spec, pdis.ImageFolder(train), "memory://face-vs-cli.zarr", layers="backbone.layer3.2.conv2",
                        layout="detection", chunk_images=50, batch_size=50)
    (face,) = pdis.detect(spec, cube, p=0.5, rule="lowest-k", k=1)
    (cli,) = json.loads((custom_run["out"] / "detection.json").read_text())["detections"]
    assert face.candidates == cli["candidates"]
    rows = [(r.channel, r.class1, r.class2, r.selected) for r in face.pairs]
    assert rows == [(p["channel"], p["class1"], p["class2"], p["selected"]) for p in cli["pairs"]]
    assert [r.cosine for r in face.pairs] == pytest.approx([p["cosine"] for p in cli["pairs"]], abs=1e-6)
