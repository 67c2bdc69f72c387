"""What every call meets before the service: the API key, and requests that do not decode.

gRPC decodes a request before any servicer code runs, and answers bytes that are not the
method's message (corrupt protobuf, a string field holding invalid UTF-8) with INTERNAL and a
traceback in the log. The guard decodes them itself, so such a call gets INVALID_ARGUMENT, is
counted like any other, and logs nothing.

With an API key, a call must carry the metadata `authorization: Bearer <key>` (the header the
HTTP front end reads too), else it gets UNAUTHENTICATED. Health checks stay open, so load
balancers and orchestrators can probe a server without the key.
"""

import hmac
import logging

import grpc

from rz.server.metrics import Metrics

log = logging.getLogger("rz.server")

_OPEN_SERVICES = ("/grpc.health.v1.Health/",)


class _Undecodable:
    """Stands in for a request whose bytes did not decode."""

    def __init__(self, error: Exception):
        self.error = error


class Guard(grpc.ServerInterceptor):
    """Checks the API key (when one is set) and turns undecodable requests into INVALID_ARGUMENT."""

    def __init__(self, metrics: Metrics, api_key: str | None):
        self._metrics = metrics
        self._expected = expected_authorization(api_key)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        name = method.rsplit("/", 1)[-1]
        if self._expected is not None and not method.startswith(_OPEN_SERVICES):
            if not self._authorized(handler_call_details.invocation_metadata):
                self._count(name, grpc.StatusCode.UNAUTHENTICATED)
                return _refusing(
                    handler, grpc.StatusCode.UNAUTHENTICATED,
                    "missing or wrong API key: send the metadata 'authorization: Bearer <key>'",
                )
        if handler.request_streaming or handler.request_deserializer is None:
            return handler
        return _decoding(handler, name, self._count)

    def _authorized(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                return authorization_matches(value, self._expected)
        return False

    def _count(self, name: str, status: grpc.StatusCode) -> None:
        self._metrics.requests.labels(name, status.name).inc()


def expected_authorization(api_key: str | None) -> bytes | None:
    """The authorization value a call must carry with this API key; None when there is no key."""
    return f"Bearer {api_key}".encode() if api_key else None


def authorization_matches(given: str | bytes, expected: bytes) -> bool:
    """Whether an authorization value (gRPC metadata or HTTP header) is the expected one, in constant time."""
    return hmac.compare_digest(given.encode() if isinstance(given, str) else given, expected)


def _decoding(handler, name: str, count):
    deserialize = handler.request_deserializer

    def safe_deserialize(data: bytes):
        try:
            return deserialize(data)
        except Exception as error:  # noqa: BLE001 - any decoding failure is the caller's bytes
            return _Undecodable(error)

    def checked(behavior):
        def run(request, context):
            if isinstance(request, _Undecodable):
                count(name, grpc.StatusCode.INVALID_ARGUMENT)
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request does not decode as this method's message: {request.error}",
                )
            return behavior(request, context)

        return run

    behaviors = {
        field: checked(getattr(handler, field))
        for field in ("unary_unary", "unary_stream")
        if getattr(handler, field) is not None
    }
    return handler._replace(request_deserializer=safe_deserialize, **behaviors)


def _refusing(handler, code: grpc.StatusCode, message: str):
    def refuse(request, context):
        context.abort(code, message)

    behaviors = {
        field: refuse
        for field in ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
        if getattr(handler, field) is not None
    }
    # The bytes of a refused call are never decoded.
    return handler._replace(request_deserializer=None, **behaviors)
