"""Small HTTP helpers on the standard library: JSON requests and server-sent event streams."""

import json
import time
import urllib.error
import urllib.request
from typing import Iterator
from urllib.parse import urlparse

from rz.bench.errors import BenchError, PreflightError


def check_url(url: str, engine: str) -> str:
    """The URL without a trailing slash, or a PreflightError when it is not an http(s) URL."""
    parsed = urlparse(url or "")
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise PreflightError(f"{engine} needs an http:// URL, got {url!r} (write {engine}=http://HOST:PORT)")
    return url.rstrip("/")


def get_json(url: str, timeout: float = 10.0) -> dict:
    """GET a JSON document; HTTPError for a status >= 400, URLError/OSError when nothing answers."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read().decode("utf-8"))


def post_json(url: str, body: dict, timeout: float = 600.0) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        raise BenchError(f"{url} answered {error.code}: {_error_text(error)}") from None
    except (urllib.error.URLError, OSError) as error:
        raise BenchError(f"{url} did not answer: {getattr(error, 'reason', error)}") from None


def post_stream(url: str, body: dict, timeout: float = 600.0) -> Iterator[tuple[float, dict]]:
    """POST and yield (arrival time, event) for each server-sent `data:` event until [DONE]."""
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", "Accept": "text/event-stream"}
    )
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise BenchError(f"{url} answered {error.code}: {_error_text(error)}") from None
    except (urllib.error.URLError, OSError) as error:
        raise BenchError(f"{url} did not answer: {getattr(error, 'reason', error)}") from None
    with response:
        for raw in response:
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            payload = line[len("data:"):].strip()
            if payload == "[DONE]":
                return
            yield time.perf_counter(), json.loads(payload)


def reachable(url: str, path: str, engine: str, timeout: float = 5.0) -> dict:
    """GET url+path as JSON, or a PreflightError saying the server does not answer."""
    try:
        return get_json(url + path, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise PreflightError(f"{engine} at {url} answered {error.code} for {path}: is it the right kind of server?") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise PreflightError(f"{engine} at {url} does not answer ({getattr(error, 'reason', error)}): start it or fix the URL") from None


def _error_text(error: urllib.error.HTTPError) -> str:
    try:
        return error.read().decode("utf-8", "replace")[:300]
    except OSError:
        return error.reason
