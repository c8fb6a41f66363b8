"""Find and disentangle polysemantic channels in CNNs (Hesse et al. 2025).

``polysemantic_disentangle.flows``, ``.tasks`` and ``.storage`` are symbolic links to the
repository's top-level folders: a reader finds the code where the design card puts it, and the
import system, editors and type checkers see one ordinary package (one module object per file).
"""
