"""The function check streams its images: decoded and run a batch at a time, with the same
report as the check of every image at once, and never more than two batches alive."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch

from polysemantic_disentangle.tasks.data.images import load_batch
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage4_rewire.export import export_model
from polysemantic_disentangle.tasks.stage4_rewire import rewire as stage
from polysemantic_disentangle.tasks.stage4_rewire.rewire import (ChannelSplit, FunctionChanged, check_equivalence,
                                                                 check_image_batches, rewire_model)

from tests.conftest import add_bad_images, cifar_subset


@pytest.fixture(scope="module")
def resnet20_rewired():
    bundle = load_model("cifar_resnet20")
    model = bundle.model.eval()
    split = ChannelSplit("layer3.2.conv2", 7, [[0], [1]], ["airplane", "automobile"], 0.9,
                         [list(range(0, 20)), list(range(20, 40))], list(range(40, 64)))
    return bundle, model, rewire_model(model, [split])


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory, assets_dir: Path) -> tuple[Path, list[str]]:
    folder = cifar_subset(assets_dir, tmp_path_factory.mktemp("check") / "test", "test", 3)
    add_bad_images(folder)
    paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    return folder, paths


def test_streamed_check_equals_the_check_of_all_images(resnet20_rewired, cifar_folder, monkeypatch) -> None:
    bundle, model, rewired = resnet20_rewired
    folder, paths = cifar_folder
    everything, ok, _ = load_batch(folder, paths, bundle.transform, input_size=bundle.input_size)
    assert not ok.all()  # the unreadable files drop out of both checks alike
    oracle = check_equivalence(model, rewired, everything)

    asked = []

    def recording(root, chunk, *args, **kwargs):
        asked.append(len(chunk))
        return load_batch(root, chunk, *args, **kwargs)

    monkeypatch.setattr(stage, "load_batch", recording)
    first: list[torch.Tensor] = []
    batches = check_image_batches(folder, paths, bundle.transform, 4, input_size=bundle.input_size,
                                  max_image_pixels=10**8, first=first)
    report = check_equivalence(model, rewired, batches)
    assert report == oracle and report["n"] == len(everything) == int(ok.sum())
    assert max(asked) == 4 and sum(asked) == len(paths)  # decoded 4 at a time, every path once
    # the export's example input: the first two check images, copies of their own
    assert torch.equal(torch.stack(first), everything[:2])
    assert all(t.untyped_storage().nbytes() == t.numel() * t.element_size() for t in first)


def test_the_check_holds_at_most_two_batches(resnet20_rewired) -> None:
    """While batch i + 1 is produced, batch i - 1 is gone: the check keeps only logits."""
    bundle, model, rewired = resnet20_rewired
    torch.manual_seed(0)
    alive: list[weakref.ref] = []

    def batches():
        for i in range(6):
            gc.collect()
            # the check runs batch i - 1 while batch i is produced; nothing older may remain
            assert all(r() is None for r in alive[:-1]), f"batch {i}: an earlier batch is still held"
            x = torch.randn(5, 3, 32, 32)
            alive.append(weakref.ref(x))
            yield x
            del x

    report = check_equivalence(model, rewired, batches())
    assert report["n"] == 30


def test_no_readable_check_image_is_a_clear_error(resnet20_rewired, tmp_path) -> None:
    bundle, model, rewired = resnet20_rewired
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.jpg").write_bytes(b"not an image")
    batches = check_image_batches(tmp_path, ["cat/broken.jpg"], bundle.transform, 4,
                                  input_size=bundle.input_size, max_image_pixels=10**8, first=[],
                                  where="the evaluation cube")
    with pytest.raises(ValueError, match="no readable image in the evaluation cube"):
        check_equivalence(model, rewired, batches)


def test_a_streamed_check_still_refuses_a_changed_function(resnet20_rewired) -> None:
    bundle, model, rewired = resnet20_rewired
    changed = rewire_model(model, [ChannelSplit("layer3.2.conv2", 7, [[0], [1]], ["a", "b"], 0.9,
                                                [list(range(0, 20)), list(range(20, 40))], list(range(40, 64)))])
    with torch.no_grad():
        changed.get_submodule("layer3.2.conv2").extra.weight[-1] += 1.0  # corrupt the residual row
    torch.manual_seed(1)
    with pytest.raises(FunctionChanged):
        check_equivalence(model, changed, (torch.randn(4, 3, 32, 32) for _ in range(3)))


def test_the_export_does_not_keep_the_tensor_its_example_views(resnet20_rewired, tmp_path) -> None:
    """A view as the example input (images[:2] of a large batch) must not put the whole batch
    into the .pt2: the file is as large with a view of 2 images as with 2 images alone."""
    bundle, model, rewired = resnet20_rewired
    big = torch.randn(512, 3, 32, 32)  # 6 MiB
    alone = export_model(rewired, big[:2].clone(), tmp_path / "alone.pt2").stat().st_size
    viewed = export_model(rewired, big[:2], tmp_path / "viewed.pt2").stat().st_size
    assert viewed < alone + big[:2].numel() * 4 + 4096 < big.numel() * 4
