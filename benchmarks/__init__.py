"""Measured ratios, written to benchmarks/results/*.json and summarised in the README."""
