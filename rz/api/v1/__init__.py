"""Stubs generated from proto/rz/v1/inference.proto by `python tests/api/stubs.py`; do not edit."""
