"""Storage: the Zarr layout of the relevance cube, its typed reader/writer and its xarray view."""

from polysemantic_disentangle.storage.cube import CubeReader, CubeWriter, open_cube

__all__ = ["CubeReader", "CubeWriter", "open_cube"]
