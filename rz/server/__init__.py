"""rz's gRPC server (`python -m rz serve`): a thin adapter over the engine, one loop owning the device."""
