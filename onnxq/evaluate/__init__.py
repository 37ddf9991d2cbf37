"""The evaluation layer: one comparator over runners (fidelity, per-layer error, latency)."""
