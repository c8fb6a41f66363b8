"""Storage: the Zarr layout of the relevance cube, its typed reader/writer and its xarray view."""

if __name__ != "polysemantic_disentangle.storage":
    # The folder is also importable as a bare top-level name (the checkout root is on the path
    # in an editable install); loaded that way every file would be a second module object.
    raise ImportError(f"import polysemantic_disentangle.storage, not {__name__}")

from polysemantic_disentangle.storage.cube import CubeReader, CubeWriter, open_cube

__all__ = ["CubeReader", "CubeWriter", "open_cube"]
