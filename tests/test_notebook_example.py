"""The README's notebook example runs as it stands: a user's own ``nn.Module`` class, real
CIFAR-10 images, ``memory://`` cubes, one import; it rewires a channel with the logits unchanged
and its checkpoint loads back onto the user's spec."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from PIL import Image

from polysemantic_disentangle.tasks.data.assets import cifar_resnet_checkpoint
from polysemantic_disentangle.tasks.models.registry import read_state_dict
from tests.conftest import cifar_subset

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_notebook_code() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Your own network in a notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_notebook_example_runs_verbatim(assets_dir: Path, tmp_path: Path, monkeypatch) -> None:
    cifar_subset(assets_dir, tmp_path / "data" / "train", "train", 20)
    cifar_subset(assets_dir, tmp_path / "data" / "test", "test", 10)
    # The user's weights: ResNet-20's, under the wrapper's `backbone.` prefix.
    torch.save({f"backbone.{k}": v for k, v in read_state_dict(cifar_resnet_checkpoint(20)).items()},
               tmp_path / "my_net.pt")
    monkeypatch.chdir(tmp_path)
    code = readme_notebook_code()
    assert code.count("polysemantic_disentangle") == 2  # the package, and the example's backbone
    namespace: dict = {"__name__": "__main__"}
    exec(compile(code, "README.md (notebook example)", "exec"), namespace)

    spec, rewiring, rewired, saved = (namespace[k] for k in ("spec", "rewiring", "rewired", "saved"))
    assert type(spec.model).__name__ == "MyNet" and spec.name == "my_net"
    assert rewiring.splits[0].layer == "backbone.layer3.2.conv2"
    assert saved["base"]["state_sha256"] == spec.state_sha256 and "source" not in saved["base"]
    files = sorted((tmp_path / "data" / "test").rglob("*.jpg"))
    x = torch.stack([spec.transform(Image.open(f).convert("RGB")) for f in files])
    with torch.no_grad():
        original = spec.model(x)
        torch.testing.assert_close(rewiring.model(x), original, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rewired(x), original, rtol=1e-4, atol=1e-4)
    assert namespace["evaluation"].channels[0].table1
    # The training cube records the dataset's item keys, and was read through the source.
    train = namespace["train"]
    assert train.dataset_root == "dataset:my-train" and len(train.image_paths()) == 200
    assert not train.skipped().any()


def test_a_dataset_item_that_cannot_be_read_is_recorded_not_raised(tmp_path: Path) -> None:
    import numpy as np
    from torch import nn

    import polysemantic_disentangle as pdis

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int):
            if i == 4:
                raise OSError("disk gone")
            return np.full((8, 8, 3), 40 * i, np.uint8), i % 2

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    spec = pdis.ModelSpec(net, ["a", "b"], trained=False)
    cube = pdis.extract(spec, pdis.DatasetSource(Items()), "memory://items-test.zarr", layers="2",
                        chunk_images=3, batch_size=3)
    assert cube.skipped().tolist() == [False, False, False, False, True, False]
    assert list(cube.image_paths()) == ["0", "1", "2", "3", "4", "5"]
    assert cube.dataset_root == "dataset:Items"


def test_a_store_extracted_again_from_a_folder_reads_the_folder_not_the_earlier_dataset(tmp_path: Path) -> None:
    import numpy as np
    from torch import nn

    import polysemantic_disentangle as pdis

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int):
            return np.full((8, 8, 3), 200 - 40 * i, np.uint8), i % 2

    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / cls / f"{i}.png")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    spec = pdis.ModelSpec(net, ["a", "b"], trained=False)
    options = {"layers": "2", "chunk_images": 2, "batch_size": 2}
    pdis.extract(spec, pdis.DatasetSource(Items()), "memory://again.zarr", **options)
    again = pdis.extract(spec, pdis.ImageFolder(folder), "memory://again.zarr", overwrite=True, **options)
    fresh = pdis.extract(spec, pdis.ImageFolder(folder), "memory://fresh.zarr", **options)
    assert again.dataset_root == fresh.dataset_root == str(folder.resolve())
    np.testing.assert_array_equal(again.relevance("2"), fresh.relevance("2"))
    assert np.abs(fresh.relevance("2")).sum() > 0
