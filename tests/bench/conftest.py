"""Fixtures of the rz.bench tests: the small real model, engine registration, a free port."""

import socket
from pathlib import Path

import pytest

from rz.bench import engines as engines_module
from rz.errors import RzError


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    from rz.model_files import smollm2_135m_path

    try:
        return smollm2_135m_path()
    except RzError as error:
        pytest.skip(f"model package not installed: {error}")


@pytest.fixture
def register(monkeypatch):
    """Register engine classes under their names for the length of a test."""
    def add(*classes):
        for engine_class in classes:
            monkeypatch.setitem(engines_module.ENGINES, engine_class.name, engine_class)
        return classes
    return add


@pytest.fixture
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
