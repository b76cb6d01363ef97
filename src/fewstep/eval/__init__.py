"""Evaluation: Fréchet distances with pluggable features, digit fidelity, quality-vs-steps reports."""
