"""Stubs generated from proto/rz/v1/inference.proto by `python -m rz.server.stubs`; do not edit."""
