"""llama.cpp's own CPU matmul (ggml_mul_mat) on a GGUF tensor, through the ggml bundled with
llama-cpp-python: the oracle of the kernel tests and the peer of benchmarks/kernels/bench_qmatmul.py.

    matmul = GGMLMatmul(raw_bytes, ggml_type, n, k, m, threads=2)
    y = matmul(x)          # x f32 [m, k] -> f32 [m, n], timed with matmul.run()

The weight bytes are GGUF's own block layout, which is ggml's, so the tensor is copied in as is.
The graph is a plain ggml context (no llama.cpp weight repacking), the kernel llama.cpp runs for
Q5_0, Q8_0, Q4_1 and Q6_K weights; it quantizes x to Q8_0/Q8_K as llama.cpp does.
"""

import ctypes
import pathlib

import numpy as np

GGML_TYPE_F32 = 0


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


class _ComputePlan(ctypes.Structure):
    """struct ggml_cplan (ggml-cpu.h), with spare room in case a later ggml appends fields."""

    _fields_ = [
        ("work_size", ctypes.c_size_t),
        ("work_data", ctypes.c_void_p),
        ("n_threads", ctypes.c_int),
        ("threadpool", ctypes.c_void_p),
        ("abort_callback", ctypes.c_void_p),
        ("abort_callback_data", ctypes.c_void_p),
        ("use_ref", ctypes.c_bool),
        ("_spare", ctypes.c_uint8 * 64),
    ]


def _libraries():
    import llama_cpp

    lib_dir = pathlib.Path(llama_cpp.__file__).parent / "lib"
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(str(lib_dir / "libggml-cpu.so"), mode=ctypes.RTLD_GLOBAL)
    base.ggml_init.restype = ctypes.c_void_p
    base.ggml_init.argtypes = (_InitParams,)
    base.ggml_new_tensor_2d.restype = ctypes.c_void_p
    base.ggml_new_tensor_2d.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    base.ggml_mul_mat.restype = ctypes.c_void_p
    base.ggml_mul_mat.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    base.ggml_new_graph.restype = ctypes.c_void_p
    base.ggml_new_graph.argtypes = (ctypes.c_void_p,)
    base.ggml_build_forward_expand.argtypes = (ctypes.c_void_p, ctypes.c_void_p)
    base.ggml_get_data.restype = ctypes.c_void_p
    base.ggml_get_data.argtypes = (ctypes.c_void_p,)
    base.ggml_nbytes.restype = ctypes.c_size_t
    base.ggml_nbytes.argtypes = (ctypes.c_void_p,)
    base.ggml_free.argtypes = (ctypes.c_void_p,)
    cpu.ggml_graph_plan.restype = _ComputePlan
    cpu.ggml_graph_plan.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p)
    cpu.ggml_graph_compute.restype = ctypes.c_int
    cpu.ggml_graph_compute.argtypes = (ctypes.c_void_p, ctypes.POINTER(_ComputePlan))
    return base, cpu


def available() -> bool:
    try:
        _libraries()
    except (ImportError, OSError):
        return False
    return True


class GGMLMatmul:
    """y = x @ W.T by ggml_mul_mat for a fixed W (GGUF bytes) and a fixed M."""

    def __init__(self, raw: np.ndarray, ggml_type: int, n: int, k: int, m: int, threads: int):
        self._base, self._cpu = _libraries()
        raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        graph = 16 << 20
        self._ctx = self._base.ggml_init(_InitParams(raw.nbytes + 8 * m * (k + n) + graph, None, False))
        self._w = self._base.ggml_new_tensor_2d(self._ctx, int(ggml_type), k, n)
        self._x = self._base.ggml_new_tensor_2d(self._ctx, GGML_TYPE_F32, k, m)
        if self._base.ggml_nbytes(self._w) != raw.nbytes:
            raise ValueError("the GGUF bytes do not match ggml's size for this type and shape")
        ctypes.memmove(self._base.ggml_get_data(self._w), raw.ctypes.data, raw.nbytes)
        self._y = self._base.ggml_mul_mat(self._ctx, self._w, self._x)
        self._graph = self._base.ggml_new_graph(self._ctx)
        self._base.ggml_build_forward_expand(self._graph, self._y)
        # One plan and work buffer (the quantized x) for all runs.
        self._plan = self._cpu.ggml_graph_plan(self._graph, threads, None)
        self._work = np.empty(max(1, self._plan.work_size), np.uint8)
        self._plan.work_data = self._work.ctypes.data
        self.shape = (m, n, k)

    def run(self) -> None:
        if self._cpu.ggml_graph_compute(self._graph, ctypes.byref(self._plan)) != 0:
            raise RuntimeError("ggml_graph_compute failed")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        m, n, _k = self.shape
        x = np.ascontiguousarray(x, np.float32)
        ctypes.memmove(self._base.ggml_get_data(self._x), x.ctypes.data, x.nbytes)
        self.run()
        y = np.empty((m, n), np.float32)
        ctypes.memmove(y.ctypes.data, self._base.ggml_get_data(self._y), y.nbytes)
        return y

    def __del__(self):
        if getattr(self, "_ctx", None):
            self._base.ggml_free(self._ctx)
            self._ctx = None
