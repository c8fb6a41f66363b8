"""Find and disentangle polysemantic channels in CNNs (Hesse et al. 2025).

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

