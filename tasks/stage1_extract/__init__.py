"""Stage 1, extract: one forward and one backward pass per batch, every conv layer at once."""
