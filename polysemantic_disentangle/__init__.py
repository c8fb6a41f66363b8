"""The project's one importable name: ``polysemantic_disentangle.{flows,tasks,storage}``.

The folders stay at the repository's top level, where deployments and readers find them; a
plain ``import tasks`` would be shadowed by any ``tasks.py`` beside a notebook (and PyPI has
distributions named ``flows``, ``tasks`` and ``storage``). A wheel installs the three folders
inside this package (the build backend's source mapping in ``pyproject.toml``); in a checkout,
and in its editable install, this package's path is the checkout's root instead.
"""

from __future__ import annotations

import os

_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, "tasks")):
    __path__ = [os.path.dirname(_here)]
