"""Test helpers for onnxq and for plugin packages: small models and contract tests."""
