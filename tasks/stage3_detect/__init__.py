"""Stage 3, detect: channels relevant for several classes whose ARVs point apart."""
