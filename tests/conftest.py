"""Shared by every test: pytest puts this directory (tests/) on sys.path, so the helper package
tests/support imports as `support`."""
