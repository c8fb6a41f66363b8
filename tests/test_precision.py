"""bf16 autocast in extraction: recorded in the store's identity, float32 reductions inside the
taps, and refused by the pipeline while it changes what detection finds (measured here on real
CIFAR-10 images with the real ResNet-20, on CPU, whose autocast supports bf16 too)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from polysemantic_disentangle.tasks.stage1_extract import precision as prec
from polysemantic_disentangle.tasks.stage3_detect import precision_check as check
from tests.conftest import cifar_subset


def test_bf16_detection_sets_against_fp32_on_cifar(tmp_path: Path, assets_dir: Path) -> None:
    """Extraction, reduction and detection of the same 200 real CIFAR-10 test images in fp32 and
    in bf16 autocast. Where the candidates, candidate pairs or selected pairs differ, the
    pipeline must refuse bf16 and name the difference; where none differs, it must accept it."""
    from polysemantic_disentangle.tasks.models.registry import load_model
    from polysemantic_disentangle.tasks.presets import preset_for
    from polysemantic_disentangle.tasks.stage3_detect.params import DetectionParams

    data = cifar_subset(assets_dir, tmp_path / "data", "test", per_class=20)
    bundle = load_model("cifar_resnet20")
    params = DetectionParams(gamma=preset_for("cifar_resnet20").gamma)
    comparison, runs = check.compare_precisions(bundle, data, tmp_path / "work", params, batch_size=100,
                                               chunk_images=200)
    print("bf16 against fp32, ResNet-20, 200 CIFAR-10 test images:", check.describe(comparison))
    assert runs["fp32"].sets.counts()["candidates"] > 0 and runs["fp32"].sets.counts()["pairs"] > 0
    # bf16 moved the ARVs, but only a little: the taps sum in float32.
    assert 0 < comparison["max_cosine_shift"] < 0.05
    if comparison["identical"]:
        assert prec.check_precision("bf16") == "bf16"
    else:
        assert prec.BF16_MEASURED, f"bf16 changes the detection sets ({check.describe(comparison)}) but is accepted"
        with pytest.raises(prec.PrecisionRefused, match="Measured against float32"):
            prec.check_precision("bf16")


def test_compare_sets_counts_what_is_lost_and_gained() -> None:
    def sets(cands: list[int], pairs: list[tuple[int, int, int, float]], chosen: list[int]) -> check.DetectionSets:
        keys = check.pair_key(*(np.asarray([p[i] for p in pairs], dtype=np.int64) for i in range(3)))
        order = np.argsort(keys)
        return check.DetectionSets(candidates={"l": np.asarray(cands)}, pairs={"l": keys[order]},
                                  cosines={"l": np.asarray([p[3] for p in pairs])[order]},
                                  selected={"l": np.sort(keys[chosen])})

    a = sets([1, 2], [(1, 0, 1, 0.2), (2, 0, 3, 0.9)], [0])
    b = sets([1, 3], [(1, 0, 1, 0.25), (3, 2, 4, 0.4)], [0, 1])
    c = check.compare_sets(a, b)
    assert c["candidates"] == {"reference": 2, "other": 2, "lost": 1, "gained": 1}
    assert c["pairs"] == {"reference": 2, "other": 2, "lost": 1, "gained": 1}
    assert c["selected"] == {"reference": 1, "other": 2, "lost": 0, "gained": 1}
    assert c["max_cosine_shift"] == pytest.approx(0.05)
    assert c["layers_differing"] == ["l"] and not c["identical"]
    assert check.compare_sets(a, a)["identical"]


def test_precision_is_part_of_the_store_identity(small_cube, tmp_path: Path) -> None:
    """A bf16 store has another fingerprint than the fp32 store of the same inputs, so the two
    never mix; an fp32 store records nothing (stores made before the option keep theirs)."""
    from polysemantic_disentangle.storage.cube import CubeMismatch, CubeReader
    from polysemantic_disentangle.tasks.stage1_extract.chunks import plan_cube

    _, bundle, data = small_cube
    fp32, bf16 = str(tmp_path / "fp32.zarr"), str(tmp_path / "bf16.zarr")
    plan_cube(bundle, str(data), fp32, "layer3.*", 48, "label")
    plan_cube(bundle, str(data), bf16, "layer3.*", 48, "label", precision="bf16")
    a, b = CubeReader(fp32).attrs, CubeReader(bf16).attrs
    assert prec.PRECISION_ATTR not in a and b[prec.PRECISION_ATTR] == "bf16"
    assert prec.store_precision(a) == "fp32" and prec.store_precision(b) == "bf16"
    assert a["fingerprint"] != b["fingerprint"]
    with pytest.raises(CubeMismatch):
        plan_cube(bundle, str(data), fp32, "layer3.*", 48, "label", precision="bf16")


def test_taps_reduce_in_float32_under_bf16_autocast() -> None:
    """Forward hooks run inside the autocast: the moments' matmuls must still sum in float32."""
    from polysemantic_disentangle.tasks.models.cifar_resnet import cifar_resnet
    from polysemantic_disentangle.tasks.stage1_extract.relevance import batch_relevance, input_moments

    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    layers = ["conv1", "layer2.0.conv1", "layer3.2.conv2"]
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    ref = batch_relevance(model, x, y, layers)
    with prec.autocast("bf16", "cpu"):
        low = batch_relevance(model, x, y, layers)
    for name in layers:
        for field in ("relevance", "input_moments", "activation_max", "activation_mean"):
            value = getattr(low, field)[name]
            assert value.dtype == torch.float32, (name, field)
    # The first conv's input is the images themselves, untouched by bf16: float32 sums.
    torch.testing.assert_close(low.input_moments["conv1"], ref.input_moments["conv1"], rtol=1e-6, atol=1e-5)
    wide = torch.rand(2, 8, 9, 9)
    with prec.autocast("bf16", "cpu"):
        inside = input_moments(wide, (3, 3), (2, 2), (1, 1), (1, 1), (5, 5))
    assert torch.equal(inside, input_moments(wide, (3, 3), (2, 2), (1, 1), (1, 1), (5, 5)))


def test_autocast_and_feeding_leave_the_cpu_path_alone() -> None:
    from polysemantic_disentangle.tasks import defaults
    from polysemantic_disentangle.tasks.models.cifar_resnet import cifar_resnet
    from polysemantic_disentangle.tasks.stage1_extract.feeding import decode_workers_for, for_device

    assert isinstance(prec.autocast("fp32", "cpu"), type(prec.autocast("fp32", "cuda")))
    assert not torch.is_autocast_enabled("cpu")
    with prec.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="precision must be one of"):
        prec.autocast("fp16", "cpu")
    assert decode_workers_for("cpu") == defaults.DECODE_WORKERS
    model = for_device(cifar_resnet(20), "cpu")
    assert not model.training
    assert model.conv1.weight.is_contiguous()  # no channels-last on CPU


def test_the_pipeline_refuses_bf16_naming_the_measured_difference(tmp_path: Path, capsys, monkeypatch) -> None:
    """`disentangle run --precision bf16` and `disentangle extract --precision bf16` stop before
    any work with the measured difference; with nothing measured against it, bf16 passes the
    parameter check and fp32 always does."""
    from pydantic import ValidationError

    from polysemantic_disentangle.flows.cli import main
    from polysemantic_disentangle.flows.params import PipelineParams

    assert PipelineParams().precision == "fp32"
    if not prec.BF16_MEASURED:
        pytest.skip("bf16 is accepted: nothing measured against it")
    with pytest.raises(ValidationError, match="precision bf16 is refused"):
        PipelineParams(precision="bf16")
    data = tmp_path / "data"
    (data / "cat").mkdir(parents=True)
    for argv in (["run", "--precision", "bf16", "--out-dir", str(tmp_path / "run")],
                 ["extract", "--precision", "bf16", "--data-dir", str(data), "--store", str(tmp_path / "c.zarr")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "precision bf16 is refused" in err and prec.BF16_MEASURED in err, err
    monkeypatch.setattr(prec, "BF16_MEASURED", "")
    assert PipelineParams(precision="bf16").precision == "bf16"


def test_precision_flags_offer_the_precisions_the_code_accepts() -> None:
    import argparse

    from polysemantic_disentangle.flows.cli import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for command in ("run", "extract"):
        action = next(a for a in subs[command]._actions if a.dest == "precision")
        assert tuple(action.choices) == prec.PRECISIONS, command
