"""Reproducible experiments (``nlprune synthetic``: the paper's Figure 2 on synthetic data)."""
