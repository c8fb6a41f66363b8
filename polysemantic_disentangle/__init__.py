"""Find and disentangle polysemantic channels in CNNs (Hesse et al. 2025).

The names a notebook needs, on any ``nn.Module`` (``help(name)`` shows each one's parameters)::

    import polysemantic_disentangle as pdis

    spec = pdis.ModelSpec(net, class_names, trained=True)
    cube = pdis.extract(spec, pdis.ImageFolder("data/train"), "memory://train.zarr", layers="layer3.*")
    detections = pdis.detect(spec, cube)
    rewiring = pdis.rewire(spec, detections, cube)
    evaluation, figures = pdis.evaluate(spec, rewiring, pdis.extract(spec, pdis.ImageFolder("data/test"),
                                                                      "memory://test.zarr", layers="layer3.*"))

``polysemantic_disentangle.flows``, ``.tasks`` and ``.storage`` are symbolic links to the
repository's top-level folders: a reader finds the code where the design card puts it, and the
import system, editors and type checkers see one ordinary package (one module object per file).
"""

import os as _os

# Idle OpenMP threads sleep instead of spinning (unless the user chose otherwise). torch's CPU
# kernels use every core; on a machine that other work keeps busy, spinning threads wait for a
# descheduled sibling and burn its time: a feature-visualisation step of EfficientNet-Lite0 at
# load 8 on 2 cores took 16-30 CPU s with spinning threads, 3.2 CPU s with sleeping ones (1
# thread: 3.3). It must be set before torch loads its OpenMP runtime, so here, first.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what editors and type checkers resolve; at run time ``__getattr__`` imports them
    from polysemantic_disentangle.api import (DatasetSource, ImageFolder, ModelSpec, Rewiring, class_statistics,
                                              detect, evaluate, explain, extract, load_disentangled, open_cube, rewire)

__all__ = ["DatasetSource", "ImageFolder", "ModelSpec", "Rewiring", "class_statistics", "detect", "evaluate", "explain",
           "extract", "load_disentangled", "open_cube", "rewire"]


def __getattr__(name: str) -> object:
    # Imported on first use: the command line's help and parameter checks import this package
    # too, and must not wait for torch.
    if name in __all__:
        from polysemantic_disentangle import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
