"""Judging a model by its answers: generation, scores, and comparisons of runs."""
