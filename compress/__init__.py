"""Quantization specs, (later) structured pruning and the accuracy-budget search."""
