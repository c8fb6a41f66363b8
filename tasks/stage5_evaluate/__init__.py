"""Stage 5, evaluate and explain: Table 1, scores, exemplars, feature visualisations, formulas."""
