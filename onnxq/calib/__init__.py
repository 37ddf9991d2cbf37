"""Calibration layer: data readers, feed validation, streaming statistics and their cache."""
