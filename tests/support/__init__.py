"""Helpers shared by the tests and the benchmarks, kept out of the runtime packages: random and real
quantized tensors (kernels), llama.cpp's ggml matmul through ctypes (ggml_oracle), and the gRPC
stub generator (stubs). tests/conftest.py puts tests/ on sys.path, so tests import `support.*`."""
