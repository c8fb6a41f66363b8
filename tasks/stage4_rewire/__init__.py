"""Stage 4, rewire: each selected channel split into two, the network's function unchanged."""
