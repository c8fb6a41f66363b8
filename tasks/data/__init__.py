"""Data: images per class, class names, local or downloaded assets, WordNet, statistics classes."""
