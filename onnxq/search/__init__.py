"""Partially quantized execution for searches: the evaluator, graph tails and sample collection."""
