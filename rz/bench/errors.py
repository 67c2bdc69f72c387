"""The errors rz.bench reports as one line and a non-zero exit, never as a stack trace."""

from rz.errors import RzError


class BenchError(RzError):
    """A benchmark cannot run as asked: bad settings, unknown engine, unreadable result file."""


class PreflightError(BenchError):
    """Something a benchmark needs is missing or differs: a model file, a server, the same model, threads."""


class EngineUnsupported(BenchError):
    """An engine cannot run one test (an HTTP server cannot be given a KV-cache depth): that test is skipped."""
