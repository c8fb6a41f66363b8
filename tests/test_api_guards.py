"""The public face refuses what would give silently wrong results or fail after the work: a
cube of another network, a spec whose module changed, labels that are not the items', normalised
tensors, class names that do not match the logits, counts and layouts a late step needs; and it
hands the user's module back as it came. Real ResNet-20 weights and CIFAR-10 images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import polysemantic_disentangle as pdis
from polysemantic_disentangle import api
from polysemantic_disentangle.storage.cube import CubeMismatch, store_exists
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.models.spec import StaleModelSpec, tensor_transform

LAYER = "layer3.2.conv2"


class Photos(torch.utils.data.Dataset):
    """CIFAR-10 JPEGs as uint8 arrays, ``per_class`` of each class, labels in ``targets``."""

    def __init__(self, assets: Path, split: str, per_class: int) -> None:
        root = assets / "cifar10" / split
        self.images, self.targets = [], []
        for label, cls in enumerate(sorted(p.name for p in root.iterdir())):
            for f in sorted((root / cls).iterdir())[:per_class]:
                self.images.append(np.asarray(Image.open(f).convert("RGB")))
                self.targets.append(label)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i]


@pytest.fixture(scope="module")
def made(assets_dir: Path, tmp_path_factory) -> dict:
    """One detection and one evaluation cube of trained ResNet-20, its detections and rewiring."""
    folder = tmp_path_factory.mktemp("guards")
    spec = load_model("cifar_resnet20")
    train = pdis.DatasetSource(Photos(assets_dir, "train", 6), name="guards-train")
    test = pdis.DatasetSource(Photos(assets_dir, "test", 3), name="guards-test")
    cube = pdis.extract(spec, train, str(folder / "train.zarr"), layers=LAYER, layout="detection", batch_size=60)
    eval_cube = pdis.extract(spec, test, str(folder / "test.zarr"), layers=LAYER, batch_size=60)
    detections = pdis.detect(spec, cube, p=0.3, rule="lowest-k", k=1)
    # rho_grid as any sequence of numbers, a numpy array included
    rewiring = pdis.rewire(spec, detections, cube, max_per_layer=1, max_images=4, check_images=10,
                           rho_grid=np.array([0.25, 0.5, 1.0]))
    assert rewiring.splits
    return {"folder": folder, "spec": spec, "train": train, "test": test, "cube": cube, "eval_cube": eval_cube,
            "detections": detections, "rewiring": rewiring}


def test_a_cube_of_another_network_is_refused_by_every_step(made: dict) -> None:
    other = load_model("cifar_resnet20", "random")
    with pytest.raises(CubeMismatch, match="extracted from another network"):
        pdis.detect(other, made["cube"], p=0.3, rule="lowest-k", k=1)
    with pytest.raises(CubeMismatch, match="extracted from another network"):
        pdis.rewire(other, made["detections"], made["cube"], max_per_layer=1)
    with pytest.raises(CubeMismatch, match="extracted from another network"):
        pdis.rewire(made["spec"], made["detections"], made["cube"], max_per_layer=1,
                    check_cube=other_cube(other, made))
    with pytest.raises(CubeMismatch, match="extracted from another network"):
        pdis.evaluate(other, made["rewiring"], made["eval_cube"], featvis_max_channels=0, explain_layers=[])


def other_cube(spec, made: dict) -> str:
    url = str(made["folder"] / "other.zarr")
    if not store_exists(url):
        pdis.extract(spec, made["test"], url, layers=LAYER, batch_size=30)
    return url


def test_a_spec_whose_module_changed_is_refused_and_the_store_kept(made: dict) -> None:
    spec = load_model("cifar_resnet20")
    url = str(made["folder"] / "stale.zarr")
    first = pdis.extract(spec, made["test"], url, layers=LAYER, batch_size=30).relevance(LAYER)
    with torch.no_grad():
        spec.model.layer3[2].conv2.weight.mul_(0.5)  # trained further, or load_state_dict
    for step in (lambda: pdis.extract(spec, made["test"], url, layers=LAYER, batch_size=30),
                 lambda: pdis.detect(spec, url, p=0.3),
                 lambda: made["rewiring"].save(made["folder"] / "stale.pt", spec)):
        with pytest.raises(StaleModelSpec, match="changed after its ModelSpec was made"):
            step()
    np.testing.assert_array_equal(pdis.open_cube(url)[f"layers/{LAYER}"].relevance.values, first)
    # The module as it now is, named by a new spec, is another network for the old store.
    with pytest.raises(CubeMismatch):
        pdis.extract(pdis.ModelSpec(spec.model, spec.class_names, trained=True), made["test"], url, layers=LAYER)


def test_labels_follow_target_transform_and_are_checked_against_the_items(assets_dir: Path, made: dict) -> None:
    spec = made["spec"]
    data = Photos(assets_dir, "test", 2)
    reversed_order = [9 - t for t in data.targets]

    class Remapped(torch.utils.data.Dataset):
        """Targets in the dataset's own class order; target_transform maps them to the model's."""
        targets = reversed_order
        target_transform = staticmethod(lambda t: 9 - t)

        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            return data.images[i], self.target_transform(self.targets[i])

    cube = pdis.extract(spec, pdis.DatasetSource(Remapped(), name="remapped"), "memory://guards-remapped.zarr",
                        layers=LAYER, batch_size=20)
    assert cube.labels().tolist() == data.targets

    class Contradicting(Remapped):
        """The same items, and targets that say other classes (no target_transform)."""
        target_transform = None

        def __getitem__(self, i: int):
            return data.images[i], data.targets[i]

    url = "memory://guards-contradicting.zarr"
    with pytest.raises(ValueError, match="has label 0, but the labels read from the dataset"):
        pdis.extract(spec, pdis.DatasetSource(Contradicting(), name="contradicting"), url, layers=LAYER)
    assert not store_exists(url)


def test_torchvision_style_targets_give_class_indices() -> None:
    """Tensor targets, a lookup-style target_transform (applied to int(target), as torchvision
    does) and a one-hot one (which leaves the class index as it is)."""

    class Items(torch.utils.data.Dataset):
        targets = torch.tensor([0, 1, 2, 1])

        def __init__(self, target_transform) -> None:
            self.target_transform = target_transform

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            y = int(self.targets[i])
            image = torch.full((3, 4, 4), 1 + 0.5 / 255)  # a resampling filter's overshoot: clipped
            return image, (self.target_transform(y) if self.target_transform else y)

    for transform, expected in (({0: 5, 1: 6, 2: 7}.__getitem__, [5, 6, 7, 6]),
                                (lambda y: torch.zeros(10).scatter_(0, torch.tensor(y), value=1), [0, 1, 2, 1]),
                                (None, [0, 1, 2, 1])):
        source = pdis.DatasetSource(Items(transform))
        assert source.labels().tolist() == expected
        source.check()
        decoded = source.decode("0", lambda image: torch.tensor(np.array(image)))
        assert decoded.reason == "" and int(decoded.tensor.min()) == 255


def test_normalised_tensors_are_refused_and_raw_tensors_read_as_the_arrays(assets_dir: Path, made: dict) -> None:
    spec = made["spec"]
    data = Photos(assets_dir, "test", 1)
    mean = torch.tensor(spec.mean).view(3, 1, 1)
    std = torch.tensor(spec.std).view(3, 1, 1)

    class Tensors(torch.utils.data.Dataset):
        def __init__(self, normalise: bool) -> None:
            self.normalise = normalise

        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            x = torch.tensor(data.images[i]).permute(2, 0, 1).float() / 255  # ToTensor's values
            return ((x - mean) / std if self.normalise else x), data.targets[i]

    url = "memory://guards-normalised.zarr"
    with pytest.raises(ValueError, match=r"values in \[0, 1\].*leave Normalize out"):
        pdis.extract(spec, pdis.DatasetSource(Tensors(True), name="normalised"), url, layers=LAYER)
    assert not store_exists(url)
    raw = pdis.extract(spec, pdis.DatasetSource(Tensors(False), name="raw"), "memory://guards-raw.zarr",
                       layers=LAYER, batch_size=10)
    arrays = pdis.extract(spec, pdis.DatasetSource(data, name="arrays"), "memory://guards-arrays.zarr",
                          layers=LAYER, batch_size=10)
    np.testing.assert_array_equal(raw.relevance(LAYER), arrays.relevance(LAYER))


def test_class_names_that_do_not_match_the_logits_stop_the_plan(made: dict) -> None:
    spec = pdis.ModelSpec(made["spec"].model, ["airplane", "automobile", "bird"], trained=True)
    url = "memory://guards-three-classes.zarr"
    with pytest.raises(ValueError, match="the model gives 10 logits but has 3 class names"):
        pdis.extract(spec, made["test"], url, layers=LAYER, target_mode="prediction")
    assert not store_exists(url)


def test_bad_counts_and_precisions_are_refused_before_any_work(made: dict) -> None:
    spec, cube, detections = made["spec"], made["cube"], made["detections"]
    for kwargs, needle in (({"check_images": 0}, "check_images must be positive, got 0"),
                           ({"batch_size": -1}, "batch_size must be positive"),
                           ({"max_images": 0}, "max_images must be positive"),
                           ({"max_per_layer": 0}, "max_per_layer must be positive"),
                           ({"rho_grid": [0.0, 0.5]}, r"rho_grid values must lie in \(0, 1\]"),
                           ({"rho_grid": []}, r"rho_grid values must lie in \(0, 1\]")):
        with pytest.raises(ValueError, match=needle):
            pdis.rewire(spec, detections, cube, **kwargs)
    url = "memory://guards-counts.zarr"
    with pytest.raises(ValueError, match="batch_size must be positive"):
        pdis.extract(spec, made["test"], url, layers=LAYER, batch_size=0)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, got 'fp16'"):
        api.plan_extraction(spec, made["test"], url, layers=LAYER, precision="fp16")
    assert not store_exists(url)


def test_the_check_cube_is_read_through_its_own_source(made: dict, monkeypatch) -> None:
    spec, cube, detections = made["spec"], made["cube"], made["detections"]
    # The same cube under another spelling of its path is read through the source it was made from.
    monkeypatch.chdir(made["folder"])
    same = pdis.rewire(spec, detections, cube, max_per_layer=1, max_images=4, check_images=10,
                       check_cube="./train.zarr")
    assert same.equivalence["n"] == 10
    # A cube of a dataset this process does not hold names the argument to give, before the rho selection.
    monkeypatch.delitem(api._SOURCES, api._source_key(str(made["folder"] / "test.zarr")))
    with pytest.raises(ValueError, match="dataset:guards-test, whose items this process does not hold: pass its "
                                         "DatasetSource as check_source="):
        pdis.rewire(spec, detections, cube, max_per_layer=1, check_cube=made["eval_cube"])
    checked = pdis.rewire(spec, detections, cube, max_per_layer=1, max_images=4, check_images=10,
                          check_cube=made["eval_cube"], check_source=made["test"])
    assert checked.equivalence["n"] == 10 and checked.equivalence["top1_changed"] == 0
    with pytest.raises(ValueError, match="pass its DatasetSource as images="):
        pdis.evaluate(spec, made["rewiring"], made["eval_cube"], featvis_max_channels=0)


def test_evaluate_refuses_what_it_cannot_explain_before_the_model_pass(made: dict) -> None:
    spec, rewiring = made["spec"], made["rewiring"]
    calls = []
    real = api.evaluate_run.__globals__["model_pass"]

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    api.evaluate_run.__globals__["model_pass"] = counted
    try:
        with pytest.raises(ValueError, match="keeps no per-image activation maxima"):
            pdis.evaluate(spec, rewiring, made["cube"], images=made["train"], featvis_max_channels=0)
        with pytest.raises(ValueError, match=r"explain_layers \['layer9.conv'\] are not layers of"):
            pdis.evaluate(spec, rewiring, made["eval_cube"], images=made["test"], explain_layers=["layer9.conv"])
    finally:
        api.evaluate_run.__globals__["model_pass"] = real
    assert calls == []


def test_the_users_module_is_handed_back_as_it_came(made: dict) -> None:
    spec = load_model("cifar_resnet20")
    model = spec.model
    model.train()
    model.layer1.eval()  # a mixed state: every submodule's own flag must come back
    before = {name: m.training for name, m in model.named_modules()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    cube = pdis.extract(spec, made["train"], "memory://guards-modes.zarr", layers=LAYER, layout="detection",
                        batch_size=60)
    detections = pdis.detect(spec, cube, p=0.3, rule="lowest-k", k=1)
    rewiring = pdis.rewire(spec, detections, cube, max_per_layer=1, max_images=4, check_images=10)
    pdis.evaluate(spec, rewiring, made["eval_cube"], images=made["test"], featvis_max_channels=0, explain_layers=[])
    assert {name: m.training for name, m in model.named_modules()} == before
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


class Unlabelled(torch.utils.data.Dataset):
    """The images of ``data`` alone (no labels), as uint8 arrays, ToTensor-style tensors, or
    Hugging Face-style dicts with the label."""

    def __init__(self, data: Photos, kind: str) -> None:
        self.data, self.kind = data, kind

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        image = self.data.images[i]
        if self.kind == "tensor":
            return torch.tensor(image).permute(2, 0, 1).float() / 255
        if self.kind == "dict":
            return {"img": image, "label": self.data.targets[i]}
        return image


def test_items_that_are_the_image_alone_or_dicts_are_read_as_the_images(assets_dir: Path, made: dict) -> None:
    """An unlabelled dataset's item is the image, not a tuple whose first element would be a
    colour plane (tensor) or a pixel row (array): the same relevance as (image, label) pairs."""
    spec, data = made["spec"], Photos(assets_dir, "test", 2)
    pairs = pdis.extract(spec, pdis.DatasetSource(data, name="pairs"), "memory://guards-pairs.zarr", layers=LAYER,
                         target_mode="prediction", batch_size=20).relevance(LAYER)
    for kind in ("array", "tensor"):
        source = pdis.DatasetSource(Unlabelled(data, kind), name=f"bare-{kind}")
        assert (source.labels() == -1).all()
        cube = pdis.extract(spec, source, f"memory://guards-bare-{kind}.zarr", layers=LAYER,
                            target_mode="prediction", batch_size=20)
        assert not cube.skipped().any()
        np.testing.assert_array_equal(cube.relevance(LAYER), pairs)
        url = f"memory://guards-bare-{kind}-label.zarr"
        with pytest.raises(ValueError, match=r"20 items of dataset:bare-\w+ give no class index \(item 0: the item has "
                                             r"no label; .*target_mode='prediction'"):
            pdis.extract(spec, source, url, layers=LAYER)
        assert not store_exists(url)
    dicts = pdis.DatasetSource(Unlabelled(data, "dict"), name="dicts")
    assert dicts.labels().tolist() == data.targets
    cube = pdis.extract(spec, dicts, "memory://guards-dicts.zarr", layers=LAYER, target_mode="prediction",
                        batch_size=20)
    np.testing.assert_array_equal(cube.relevance(LAYER), pairs)


def test_labels_that_are_not_class_indices_stop_the_plan(assets_dir: Path, made: dict) -> None:
    spec, data = made["spec"], Photos(assets_dir, "test", 1)

    class Labelled(torch.utils.data.Dataset):
        def __init__(self, label) -> None:
            self.label = label

        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            return data.images[i], self.label(data.targets[i])

    cases = ((lambda y: torch.nn.functional.one_hot(torch.tensor(y), 10),
              r"10 items of dataset:one-hot give no class index \(item 0: its label has shape \(10,\), not a class index"),
             (lambda y: ["airplane", "automobile"][y % 2], "item 0: its label 'airplane' is not a class index"),
             (lambda y: {"boxes": [[0, 0, 4, 4]], "labels": [y]}, r"item 0: its label \{'boxes'.* is not a class index"),
             (lambda y: y + 1, r"1 labels of dataset:one-based are not class indices of the model's 10 classes "
                               r"\(0 to 9\): item 9: 10"))
    for (label, needle), name in zip(cases, ("one-hot", "names", "detection", "one-based")):
        url = f"memory://guards-labels-{name}.zarr"
        with pytest.raises(ValueError, match=needle):
            pdis.extract(spec, pdis.DatasetSource(Labelled(label), name=name), url, layers=LAYER)
        assert not store_exists(url)
        # Attributed to the predictions, a label is only compared with them: any is taken.
        cube = pdis.extract(spec, pdis.DatasetSource(Labelled(label), name=name), url, layers=LAYER,
                            target_mode="prediction", batch_size=10)
        assert not cube.skipped().any()
    # One class index in a one-element tensor, a float or a bool is a class index.
    for label in (lambda y: torch.tensor([y]), float):
        assert pdis.DatasetSource(Labelled(label)).labels().tolist() == data.targets
    assert pdis.DatasetSource(Labelled(lambda y: y % 2 == 1)).labels().tolist() == [y % 2 for y in data.targets]

    class Targets(torch.utils.data.Dataset):
        def __init__(self, targets) -> None:
            self.targets = targets

        def __len__(self) -> int:
            return len(self.targets)

        def __getitem__(self, i: int):
            return data.images[i], 0

    for targets, needle in ((np.eye(10)[data.targets], r"dataset.targets of dataset:t has shape \(10, 10\), not one "
                                                        r"class index per item"),
                            ([0.0, 2.5] + [1.0] * 8, r"dataset.targets of dataset:t holds 2.5 at item 1: not a class index")):
        with pytest.raises(ValueError, match=needle):
            pdis.DatasetSource(Targets(targets), name="t").labels()


def test_class_names_are_checked_on_the_datasets_own_image_size(made: dict) -> None:
    """A head that takes one input size only fails on a blank 224 x 224 image; the check runs on
    the dataset's first image instead of being skipped."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 32 * 32, 10))
    url = "memory://guards-flatten.zarr"
    with pytest.raises(ValueError, match="the model gives 10 logits but has 8 class names"):
        pdis.extract(pdis.ModelSpec(net, [f"c{i}" for i in range(8)], trained=False), made["test"], url, layers="0")
    assert not store_exists(url)
    cube = pdis.extract(pdis.ModelSpec(net, [f"c{i}" for i in range(10)], trained=False), made["test"], url,
                        layers="0", batch_size=30)
    assert not cube.skipped().any()


def test_a_model_whose_output_is_not_logits_stops_the_plan(made: dict) -> None:
    """Auxiliary outputs, Hugging Face-style dicts, fully convolutional heads: every step reads
    the output as (N, classes) logits, so planning says what the model gives instead."""
    torch.manual_seed(0)
    trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 10))

    class Outputs(torch.nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.trunk, self.kind = trunk, kind

        def forward(self, x: torch.Tensor):
            logits = self.trunk(x)
            return {"tuple": (logits, x.mean()), "dict": {"logits": logits},
                    "map": logits[:, :, None, None]}[self.kind]

    for kind, what in (("tuple", "a tuple"), ("dict", "a dict"), ("map", r"a tensor of shape \(1, 10, 1, 1\)")):
        url = f"memory://guards-output-{kind}.zarr"
        with pytest.raises(ValueError, match=f"the model gives {what} for one image, not \\(1, classes\\) logits"):
            pdis.extract(pdis.ModelSpec(Outputs(kind), made["spec"].class_names, trained=False), made["test"], url,
                         layers="trunk.0")
        assert not store_exists(url)


def test_a_store_is_resumed_only_with_the_same_preprocessing_classes_and_items(assets_dir: Path, made: dict) -> None:
    spec, folder = made["spec"], made["folder"]
    url = str(folder / "resume.zarr")
    first = pdis.extract(spec, made["test"], url, layers=LAYER, batch_size=30).relevance(LAYER)
    np.testing.assert_array_equal(pdis.extract(spec, made["test"], url, layers=LAYER).relevance(LAYER), first)

    def respec(**changes) -> pdis.ModelSpec:  # the same network: the same identity, hence fingerprint
        return dataclasses.replace(spec, **changes)

    with pytest.raises(CubeMismatch, match=r"other layers \(\['layer3.2.conv2'\] there, \['layer3.2.conv1'\] here\)"):
        pdis.extract(spec, made["test"], url, layers="layer3.2.conv1")
    renormalised = respec(transform=tensor_transform((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    with pytest.raises(CubeMismatch, match="other preprocessing"):
        pdis.extract(renormalised, made["test"], url, layers=LAYER)
    with pytest.raises(CubeMismatch, match=r"other class names \(10 there, 10 here; 0: 'airplane' -> 'truck'"):
        pdis.extract(respec(class_names=spec.class_names[::-1]), made["test"], url, layers=LAYER)
    # The train split under the test split's name, length and labels: other pixels.
    train = Photos(assets_dir, "train", 3)
    with pytest.raises(CubeMismatch, match="other sampled_items_sha256"):
        pdis.extract(spec, pdis.DatasetSource(train, name="guards-test"), url, layers=LAYER)
    np.testing.assert_array_equal(pdis.open_cube(url)[f"layers/{LAYER}"].relevance.values, first)
    # The later steps refuse such a spec on the cube too.
    with pytest.raises(CubeMismatch, match="extracted with other preprocessing"):
        pdis.detect(renormalised, url, p=0.3)
    with pytest.raises(CubeMismatch, match="names its classes otherwise"):
        pdis.detect(respec(class_names=spec.class_names[::-1]), url, p=0.3)


def test_images_of_another_dataset_are_refused_before_any_work(assets_dir: Path, made: dict) -> None:
    spec, detections = made["spec"], made["detections"]
    with pytest.raises(CubeMismatch, match=r"images=dataset:guards-test is not the dataset .* was extracted from "
                                           r"\(root 'dataset:guards-train' there, 'dataset:guards-test' here; "
                                           r"n_images 60 there, 30 here"):
        pdis.rewire(spec, detections, made["cube"], max_per_layer=1, images=made["test"])
    with pytest.raises(CubeMismatch, match="check_source=dataset:guards-train is not the dataset"):
        pdis.rewire(spec, detections, made["cube"], max_per_layer=1, check_cube=made["eval_cube"],
                    check_source=made["train"])
    with pytest.raises(CubeMismatch, match="images=dataset:guards-train is not the dataset"):
        pdis.evaluate(spec, made["rewiring"], made["eval_cube"], images=made["train"], featvis_max_channels=0)
    # The test split's name, length and labels, the train split's pixels.
    lookalike = pdis.DatasetSource(Photos(assets_dir, "train", 3), name="guards-test")
    with pytest.raises(CubeMismatch, match=r"images=dataset:guards-test is not the dataset .* \(other pixels in its "
                                           r"first, middle or last item\)"):
        pdis.evaluate(spec, made["rewiring"], made["eval_cube"], images=lookalike, featvis_max_channels=0)


def test_a_dataset_that_changes_between_reads_is_named_and_still_resumes(assets_dir: Path, made: dict) -> None:
    """Random augmentation in the dataset: no digest of its pixels is recorded (every reopen would
    differ), and the extraction says that the later steps will see other pixels."""
    data = Photos(assets_dir, "test", 1)

    class Jittered(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            noise = np.random.randint(0, 2, data.images[i].shape, dtype=np.uint8)
            return data.images[i] ^ noise, data.targets[i]

    url = str(made["folder"] / "jittered.zarr")
    for _ in range(2):
        with pytest.warns(UserWarning, match="change from one read to the next"):
            cube = pdis.extract(made["spec"], pdis.DatasetSource(Jittered(), name="jittered"), url, layers=LAYER,
                                batch_size=10)
    assert cube.chunk_done().all()


def test_images_a_batch_leaves_out_for_their_size_are_reported(assets_dir: Path, made: dict) -> None:
    """Without an input size a batch keeps its most common shape: the others are skipped, and
    the extraction says how many and how to avoid it."""
    data = Photos(assets_dir, "test", 2)
    data.images = [np.asarray(Image.fromarray(a).resize((40, 40))) if i % 4 == 0 else a
                   for i, a in enumerate(data.images)]
    spec = pdis.ModelSpec(made["spec"].model, made["spec"].class_names, trained=True)  # any input size
    with pytest.warns(UserWarning, match=r"5 of 20 images of memory://guards-sizes.zarr were skipped \(5 wrong "
                                         r"size\), e.g. 'wrong size: a 40x40 image .* Give the ModelSpec an input_size"):
        cube = pdis.extract(spec, pdis.DatasetSource(data, name="sizes"), "memory://guards-sizes.zarr",
                            layers=LAYER, batch_size=20)
    assert int(cube.skipped().sum()) == 5


def test_an_item_unreadable_only_when_labelled_is_skipped_not_a_crash(assets_dir: Path, made: dict) -> None:
    """An item that fails when the labels are read (-1) but decodes later has no target logit in
    label mode: it is skipped with its reason, and the rest of the chunk is extracted."""
    data = Photos(assets_dir, "test", 1)

    class FlakyOnce(torch.utils.data.Dataset):
        failed = False

        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            if i == 3 and not self.failed:
                self.failed = True
                raise OSError("share not mounted yet")
            return data.images[i], data.targets[i]

    with pytest.warns(UserWarning, match=r"1 of 10 images .* were skipped \(1 no label\)"):
        cube = pdis.extract(made["spec"], pdis.DatasetSource(FlakyOnce(), name="flaky"), "memory://guards-flaky.zarr",
                            layers=LAYER, batch_size=10)
    assert np.flatnonzero(cube.skipped()).tolist() == [3]
    assert cube.skip_reasons()[3].startswith("no label: ")
    reference = pdis.extract(made["spec"], pdis.DatasetSource(data, name="steady"), "memory://guards-steady.zarr",
                             layers=LAYER, batch_size=10).relevance(LAYER)
    kept = np.arange(10) != 3
    np.testing.assert_array_equal(cube.relevance(LAYER)[kept], reference[kept])
