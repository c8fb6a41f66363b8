"""Stage 6, report: one self-contained HTML page and its figures."""
