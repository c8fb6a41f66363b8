"""Models: the registry of architectures, their weights and identity, safe checkpoint loading."""
