"""Building the splits keeps a (layer, class)'s layer inputs only while a row still needs them,
loads each of them once, and gives the splits each row gets on its own."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from polysemantic_disentangle.storage.cube import as_str, open_store_group
from polysemantic_disentangle.tasks.data.images import load_batch
from polysemantic_disentangle.tasks.stage2_reduce.reduce import reduce_cube
from polysemantic_disentangle.tasks.stage3_detect.detect import PairRow
from polysemantic_disentangle.tasks.stage4_rewire import plan

LAST, EARLIER = "layer3.2.conv2", "layer2.2.conv2"


def test_layer_inputs_live_from_first_to_last_use(small_cube, monkeypatch) -> None:
    url, bundle, _ = small_cube
    root = open_store_group(url)
    images, ok, _ = load_batch(root.attrs["dataset"]["root"], [str(p) for p in as_str(root["image_path"][:])],
                               bundle.transform)
    assert ok.all()
    labels = root["label"][:].astype(np.int64)
    stats = reduce_cube(url, tau=0.03, layers=[LAST, EARLIER])
    names, wnids = bundle.class_names, bundle.wnids

    def row(layer: str, channel: int, t1: int, t2: int) -> PairRow:
        return PairRow(layer, channel, t1, t2, names[t1], names[t2], wnids[t1], wnids[t2], 0.8, 1.0, 1.0,
                       False, True)

    rows = [row(LAST, 7, 0, 1), row(LAST, 15, 1, 6), row(LAST, 20, 1, 2), row(EARLIER, 3, 3, 8)]
    alone = [plan.build_splits(bundle.model, [r], stats, lambda t: images[labels == t])[0] for r in rows]

    live: dict[tuple[str, int], weakref.ref] = {}
    loads: list[tuple[tuple[str, int], set[tuple[str, int]]]] = []  # what was alive at each load
    asked: list[int] = []
    real = plan.collect_layer_inputs

    def class_images(t: int) -> torch.Tensor:
        asked.append(t)
        return images[labels == t]

    def tracked(model: torch.nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
        loads.append(((layer, asked[-1]), {k for k, ref in live.items() if ref() is not None}))
        out = real(model, layer, x)
        live[(layer, asked[-1])] = weakref.ref(out)
        return out

    monkeypatch.setattr(plan, "collect_layer_inputs", tracked)
    together, skipped = plan.build_splits(bundle.model, rows, stats, class_images)
    assert [s.to_dict() for s in together] == [s.to_dict() for split in alone for s in split]
    assert not skipped
    # Each (layer, class) loaded once, in row order ...
    assert [k for k, _ in loads] == [(LAST, 0), (LAST, 1), (LAST, 6), (LAST, 2), (EARLIER, 3), (EARLIER, 8)]
    alive_at = dict(loads)
    # ... class 0's inputs gone once its only row is done, class 1's kept for its later rows ...
    assert alive_at[(LAST, 6)] == {(LAST, 1)}
    assert alive_at[(LAST, 2)] == {(LAST, 1)}
    # ... and nothing of the last layer left when the next layer starts.
    assert alive_at[(EARLIER, 3)] == set()
    assert all(ref() is None for ref in live.values())
