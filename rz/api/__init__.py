"""rz's gRPC API (proto/rz/v1): the generated stubs (v1) and the conversions between its messages and
rz's own request types (messages), shared by the server (rz.server) and the client (rz.client)."""
