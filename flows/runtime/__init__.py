"""What the flows run on: Dask clusters, output URLs, locks, the temporary Prefect API, stop points."""
