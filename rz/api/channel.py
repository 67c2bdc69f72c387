"""The client's side of the server's API key and TLS: a channel that carries both."""

import collections
from pathlib import Path

import grpc


def open_channel(target: str, api_key: str | None = None, tls: bool = False, tls_ca: str | Path | None = None) -> grpc.Channel:
    """A channel to target: over TLS when tls or tls_ca (a PEM certificate to trust) is given,
    each call carrying `authorization: Bearer <api_key>` when api_key is given."""
    if tls or tls_ca is not None:
        root = Path(tls_ca).read_bytes() if tls_ca is not None else None
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))
    else:
        channel = grpc.insecure_channel(target)
    if api_key:
        channel = grpc.intercept_channel(channel, _BearerToken(api_key))
    return channel


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
    grpc.ClientCallDetails,
):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the API key to every call's metadata (call credentials would need TLS)."""

    def __init__(self, api_key: str):
        self._metadata = (("authorization", f"Bearer {api_key}"),)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._with_key(client_call_details), request)

    def _with_key(self, details) -> _CallDetails:
        return _CallDetails(
            details.method, details.timeout, tuple(details.metadata or ()) + self._metadata,
            details.credentials, details.wait_for_ready, details.compression,
        )
