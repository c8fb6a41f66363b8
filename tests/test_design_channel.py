"""DESIGN's expected result on a real channel, end to end through the method's functions.

ResNet-20's ``layer3.2.conv2`` channel 15 is relevant for automobiles and frogs, whose ARVs
point apart (cosine below the CIFAR preset's gamma). Its compositional explanation is
"automobile OR frog"; after the split, one part explains "automobile" and the other "frog",
each matching its class better than the original channel did.
"""

from __future__ import annotations

import pytest

from polysemantic_disentangle.flows.params import PipelineParams
from polysemantic_disentangle.api import class_images
from polysemantic_disentangle.storage.cube import CubeLayout
from polysemantic_disentangle.tasks.models.registry import load_model
from polysemantic_disentangle.tasks.stage1_extract.chunks import extract_chunks, plan_cube
from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube
from polysemantic_disentangle.tasks.stage3_detect.detect import detect_layer, read_relevance_sample
from polysemantic_disentangle.tasks.stage4_rewire.plan import build_splits
from polysemantic_disentangle.tasks.stage4_rewire.rewire import rewire_model
from polysemantic_disentangle.tasks.stage5_evaluate.evaluate_run import evaluate_run

LAYER, CHANNEL = "layer3.2.conv2", 15
A, B = "automobile", "frog"


def _cube(bundle, data_dir: str, url: str, per_class: int, layout: str) -> str:
    plan = plan_cube(bundle, data_dir, url, [LAYER], chunk_images=500, target_mode="label",
                     max_per_class=per_class, layout=CubeLayout.preset(layout))
    extract_chunks(url, bundle.model.eval(), bundle.transform, data_dir, range(plan.n_chunks), plan.layers,
                   batch_size=125)
    return url


@pytest.fixture(scope="module")
def channel_15(tmp_path_factory, assets_dir):
    """The demo's parameters on 100 training and 50 test images per class, this layer only."""
    params = PipelineParams(max_per_class_train=100, max_per_class_eval=50).resolved()
    root = tmp_path_factory.mktemp("design")
    bundle = load_model(params.model, params.weights)
    train = _cube(bundle, params.train_dir, str(root / "train.zarr"), params.max_per_class_train, "detection")
    evaluation = _cube(bundle, params.eval_dir, str(root / "eval.zarr"), params.max_per_class_eval, "evaluation")
    stats = reduce_cube(train, tau=params.tau, correct_only=params.correct_only, scheduler_address=None)
    conv = dict(bundle.model.named_modules())[LAYER]
    detection = detect_layer(LAYER, conv.weight, conv.groups, stats[LAYER], params.detection(),
                             bundle.class_names, bundle.wnids, read_relevance_sample(train, LAYER))
    row = next(r for r in detection.selected if r.channel == CHANNEL)
    model = bundle.model.eval()
    splits, skipped = build_splits(model, [row], {LAYER: stats[LAYER]},
                                   class_images(bundle, train, params.rho_max_images),
                                   list(params.rho_grid), params.rho_max_images)
    assert not skipped and len(splits) == 1
    rewired = rewire_model(model, splits)
    evaluated, _ = evaluate_run(model, rewired, splits, evaluation, bundle.transform,
                                class_names=bundle.class_names, wnids=bundle.wnids, tau=params.tau,
                                featvis_max_channels=0, explain_layers=[], log=None)
    return params, row, evaluated.channels[0].to_dict()


def test_the_channel_is_a_detected_low_cosine_pair(channel_15) -> None:
    params, row, _ = channel_15
    assert {row.name1, row.name2} == {A, B}
    assert row.cosine < params.gamma  # the gamma rule selected it (the CIFAR preset: 0.9)


def test_original_a_or_b_becomes_a_and_b(channel_15) -> None:
    _, _, channel = channel_15
    explained = channel["explanations"]
    formulas = {k: explained[k]["formula"] for k in ("orig", "d1", "d2")}
    assert formulas["orig"] in (f"{A} OR {B}", f"{B} OR {A}")
    assert {formulas["d1"], formulas["d2"]} == {A, B}
    # each part matches its own class better than the original channel matched it
    for part in ("d1", "d2"):
        concept = formulas[part]
        assert explained[part]["concept_iou"][concept] > explained["orig"]["concept_iou"][concept]
