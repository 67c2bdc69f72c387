"""The committed gRPC stubs are what grpcio-tools makes of the proto today."""

import grpc_tools

from support.stubs import PACKAGE_DIR, generate


def test_committed_stubs_match_the_proto(tmp_path):
    for name, text in generate(tmp_path).items():
        assert (PACKAGE_DIR / name).read_text() == text, (
            f"rz/api/v1/{name} is stale (or was made by another grpcio-tools than {grpc_tools.__version__}): "
            "run python tests/support/stubs.py"
        )
