"""One real server and one rz.LLM, shared by the server tests."""

import pytest

import rz
from rz.model_files import smollm2_135m_path
from server_process import MAX_BATCH, N_CTX, start_server


@pytest.fixture(scope="session")
def server():
    running = start_server("--grace", "5")
    yield running
    assert running.terminate(timeout=60) == 0, "".join(running.log[-20:])


@pytest.fixture(scope="session")
def llm():
    return rz.LLM(smollm2_135m_path(), n_ctx=N_CTX, max_batch=MAX_BATCH)
