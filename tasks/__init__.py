"""The method, stage by stage, as pure functions over tensors and arrays.

The stages, in the order a run takes them:

    stage1_extract   per-image channel relevance, activations and input moments
    stage2_reduce    class means: counts, relevance statistics, ARVs
    stage3_detect    polysemantic candidates, their class pairs and the gamma rule
    stage4_rewire    split each selected channel in two and rewire the network exactly
    stage5_evaluate  Table 1, scores, exemplars, feature visualisations, explanations
    stage6_report    the self-contained HTML report, summary.json and the artifacts
    stage7_trend     the comparison of runs across checkpoints

What they stand on: ``models`` (architectures, weights, safe loading, conv geometry, hooks),
``data`` (images, classes, assets, WordNet, the statistics class of an image), ``defaults``
(the method's defaults), ``presets`` (per-model values beside them), ``plots`` (figures),
``json_values`` (plain JSON records) and ``run_folder`` (the names of a run folder's files).
The store is ``storage``. A stage imports earlier stages and these, never a later stage.
"""

if __name__ != "polysemantic_disentangle.tasks":
    # The folder is also importable as a bare top-level name (the checkout root is on the path
    # in an editable install); loaded that way every file would be a second module object.
    raise ImportError(f"import polysemantic_disentangle.tasks, not {__name__}")

