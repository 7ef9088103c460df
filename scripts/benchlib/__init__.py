"""Pieces of scripts/bench.py: one module per group of measures."""
