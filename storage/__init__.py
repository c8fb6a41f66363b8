"""Storage: the Zarr layout of the relevance cube and its xarray view."""

from polysemantic_disentangle.storage.cube import open_cube

__all__ = ["open_cube"]
