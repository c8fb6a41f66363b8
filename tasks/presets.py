"""Per-model defaults of the parameters that depend on the network (beside ``tasks/defaults``).

Small CIFAR networks have high ARV cosines (0.8 to 1.0), so the paper's gamma = 0.5 finds no
pair there; their preset selects with gamma = 0.9 (about the lowest-cosine third of the last
layer's candidate pairs) and rewires the two convs of the network's own last block. Every other
model gets the paper's gamma and rewires, in every analysed layer where the rule selected pairs,
the ``max_rewired_per_layer`` lowest-cosine selected channels. A CIFAR run whose analysed layers
leave out the last block rewires that way too ("auto"), rather than naming layers it never analysed.

ConvNeXt and ViT models analyse every conv and every Linear layer over channels ("all"): in
ConvNeXt the pointwise Linear layers of each block make its channels (its depthwise convs read one
input channel each and have no ARVs), in a ViT the MLP units over tokens are where its features are.
Their presets rewire, as the paper does at ResNet-50's last 1x1 conv, the hidden units of the
pointwise/MLP expansion layer of the network's last two blocks (ConvNeXt ``features.7.<b>.block.3``,
ViT ``encoder.layers.encoder_layer_<i>.mlp.0``), the ``max_rewired_per_layer`` lowest-cosine
selected units each, with the paper's gamma.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass

from polysemantic_disentangle.tasks import defaults
from polysemantic_disentangle.tasks.models.names import CIFAR_RESNET_DEPTHS

__all__ = ["AUTO_REWIRE", "CIFAR_GAMMA", "DEMO_MODEL", "Preset", "preset_for"]

# The model of `disentangle run` without --model (`make run`): the CIFAR-10 demo.
DEMO_MODEL = "cifar_resnet20"

# rewire_layers value: every analysed layer where the selection rule found pairs.
AUTO_REWIRE = "auto"
CIFAR_GAMMA = 0.9
# Channels rewired per layer under AUTO_REWIRE (lowest cosine first): a bound on the rho search,
# which needs layer inputs of both concepts' images for every rewired channel.
AUTO_MAX_REWIRED_PER_LAYER = 8


@dataclass(frozen=True)
class Preset:
    name: str
    gamma: float
    rewire_layers: str | list[str]
    max_rewired_per_layer: int | None

    def to_dict(self) -> dict:
        return asdict(self)

    def rewire_layers_for(self, analysed: str | list[str]) -> str | list[str]:
        """The preset's rewire layers when the analysed layers (``layers``: 'all', names or
        globs) include them; otherwise AUTO_REWIRE, so that restricting the analysis to other
        layers rewires where pairs are found there instead of failing on layers never analysed."""
        if isinstance(self.rewire_layers, str):
            return self.rewire_layers
        patterns = [analysed] if isinstance(analysed, str) else list(analysed)
        if "all" in patterns or all(any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns)
                                    for n in self.rewire_layers):
            return list(self.rewire_layers)
        return AUTO_REWIRE


def _cifar_blocks(model: str) -> int | None:
    rest = model[len("cifar_resnet"):] if model.startswith("cifar_resnet") else ""
    if not rest.isdigit() or int(rest) not in CIFAR_RESNET_DEPTHS:
        return None
    return (int(rest) - 2) // 6


# Blocks of the last ConvNeXt stage (every torchvision variant) and encoder layers per ViT size.
CONVNEXT_LAST_STAGE_BLOCKS = 3
VIT_DEPTHS = {"vit_b": 12, "vit_l": 24, "vit_h": 32}


def _vit_depth(model: str) -> int | None:
    return next((d for prefix, d in VIT_DEPTHS.items() if model.startswith(prefix + "_")), None)


def preset_for(model: str) -> Preset:
    """The preset of registry name ``model``."""
    blocks = _cifar_blocks(model)
    if blocks is not None:
        last = f"layer3.{blocks - 1}"
        return Preset("cifar10", CIFAR_GAMMA, [f"{last}.conv1", f"{last}.conv2"], None)
    if model.startswith("convnext_"):
        return Preset("convnext", defaults.GAMMA,
                      [f"features.7.{b}.block.3" for b in range(CONVNEXT_LAST_STAGE_BLOCKS - 2, CONVNEXT_LAST_STAGE_BLOCKS)],
                      AUTO_MAX_REWIRED_PER_LAYER)
    depth = _vit_depth(model)
    if depth is not None:
        return Preset("vit", defaults.GAMMA,
                      [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in (depth - 2, depth - 1)],
                      AUTO_MAX_REWIRED_PER_LAYER)
    return Preset("paper", defaults.GAMMA, AUTO_REWIRE, AUTO_MAX_REWIRED_PER_LAYER)
