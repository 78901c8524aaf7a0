"""Benchmarks: speed and memory of every backend against transformers 4.57 and the compute floor."""
