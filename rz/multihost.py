"""Several processes (hosts) as one mesh: jax.distributed start-up, and process 0 leading the others
through every compiled step.

A mesh whose devices belong to several processes runs a compiled step only when every process
calls it, in the same order, with the same inputs (JAX's multi-controller model). Process 0 runs
the host scheduler as on one host; each device call of its engine (rz.engine: every step of
rz.steps and the KV cache's allocation) goes through a `Leader`, which broadcasts the call before
making it: the step's name, its static arguments, and its array arguments. An array that a step
made is named by a number (every process numbers the arrays its steps return in the same order,
so each names its own shard of it); one the host made (tokens, positions, sampling settings) is
sent by value. The other processes run `follow`: receive a call, make it with their own arrays,
number its results. The broadcast goes over JAX's own collectives between the processes
(multihost_utils.broadcast_one_to_all: gloo on CPU), so there is no other channel to set up.

Only process 0 serves gRPC and HTTP; the others hold their shards of the weights and KV cache.
"""

import os
import pickle
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import jax
import numpy as np

# Where the start-up flags come from when not given (rz serve --coordinator ...), for launchers
# that set environment variables per process; Slurm's and Kubernetes' own variables are read by
# jax.distributed.initialize itself when none of these is set.
ENV_COORDINATOR = "RZ_COORDINATOR"
ENV_NUM_PROCESSES = "RZ_NUM_PROCESSES"
ENV_PROCESS_ID = "RZ_PROCESS_ID"

# Every call is broadcast in one frame of this many bytes (a length, then the message), and a
# longer message's rest in a second broadcast sized to it (a power of two: few compiled shapes).
FRAME_BYTES = 1 << 14
_LENGTH_BYTES = 8


class MultihostError(RuntimeError):
    """The processes cannot form one mesh as asked."""


@dataclass(frozen=True)
class Distributed:
    """How this process joins the others: None everywhere for one process alone."""

    coordinator: str | None = None  # host:port of process 0's coordination service
    num_processes: int | None = None
    process_id: int | None = None

    @classmethod
    def from_flags(cls, coordinator: str | None, num_processes: int | None, process_id: int | None) -> "Distributed":
        """Flags first, then RZ_COORDINATOR / RZ_NUM_PROCESSES / RZ_PROCESS_ID."""

        def number(value, name):
            if value is not None:
                return value
            text = os.environ.get(name)
            try:
                return int(text) if text else None
            except ValueError:
                raise MultihostError(f"{name}={text!r} is not a whole number") from None

        return cls(
            coordinator or os.environ.get(ENV_COORDINATOR) or None,
            number(num_processes, ENV_NUM_PROCESSES),
            number(process_id, ENV_PROCESS_ID),
        )

    @property
    def asked(self) -> bool:
        return any(value is not None for value in (self.coordinator, self.num_processes, self.process_id)) or _cluster_env()


def _cluster_env() -> bool:
    """A launcher that started several tasks, which jax.distributed finds by itself: Slurm or Open MPI."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def initialize(distributed: Distributed, local_devices: int | None = None) -> int:
    """Join the other processes (jax.distributed.initialize) before JAX starts; the process index.

    On CPU the collectives between processes are gloo's, and `local_devices` CPU devices are
    this process's part of the mesh (one by default)."""
    if not distributed.asked:
        return 0
    if distributed.num_processes is not None and distributed.num_processes < 1:
        raise MultihostError(f"the number of processes must be at least 1, got {distributed.num_processes}")
    if distributed.process_id is not None and distributed.num_processes is not None and not (
        0 <= distributed.process_id < distributed.num_processes
    ):
        raise MultihostError(
            f"process id {distributed.process_id} is outside 0..{distributed.num_processes - 1} "
            f"for {distributed.num_processes} processes"
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_devices:
        jax.config.update("jax_num_cpu_devices", local_devices)
    jax.distributed.initialize(distributed.coordinator, distributed.num_processes, distributed.process_id)
    return jax.process_index()


def spans_processes(mesh) -> bool:
    return len({device.process_index for device in mesh.devices.flat}) > 1


def check_mesh(mesh) -> None:
    """A mesh run by several processes must have devices in all of them: each follows every step."""
    processes = {device.process_index for device in mesh.devices.flat}
    if jax.process_count() > 1 and len(processes) != jax.process_count():
        raise MultihostError(
            f"the mesh's {mesh.devices.size} devices belong to {len(processes)} of the {jax.process_count()} processes; "
            f"with several processes, tensor_parallel must cover the devices of every one ({jax.device_count()} in all)"
        )


# ----- the wire -----


@dataclass(frozen=True)
class _Ref:
    """An array that the numbered step results hold (each process its own)."""

    number: int


@dataclass(frozen=True)
class _Value:
    """An array the host made, replicated: sent whole."""

    data: np.ndarray
    key_impl: str | None = None  # typed PRNG keys travel as their key data


_WEIGHTS = "weights"  # the model's weights pytree, which every process loaded before leading or following
_MODEL_STATIC = "model-static"  # a static argument that is the model's own family, config or plan
_STOP = "stop"


def call(step: Callable, *args, **static):
    """A device call on a mesh this process runs alone."""
    return step(*args, **static)


def launcher(model) -> Callable:
    """How `model`, on a mesh of several processes, makes its device calls here: process 0
    leads; another process's calls come from process 0 only (follow)."""
    return Leader(model) if jax.process_index() == 0 else _refuse


def _refuse(step: Callable, *args, **static):
    raise MultihostError(
        f"process {jax.process_index()} follows process 0 through every step; run rz.multihost.follow(model) "
        "here and drive the model from process 0"
    )


def close(model) -> None:
    """On process 0 of several: tell the followers that no step follows (they return from follow)."""
    if isinstance(model.launch, Leader):
        model.launch.close()


def _steps(model) -> dict[str, Callable]:
    """The device calls an engine makes, by name: every compiled step, and the KV cache's allocation."""
    from rz import steps  # here: rz.steps imports rz.models, which imports this module

    return {**{step.__name__: step for step in steps.ALL}, "init_cache": model.init_cache}


def _function(step: Callable) -> Callable:
    return getattr(step, "__func__", step)


def _model_static(model) -> dict[str, Any]:
    return {"family": model.family, "cfg": model.cfg, "plan": model.plan}


def _result_arrays(result) -> list[jax.Array]:
    return jax.tree.leaves(result)


class Leader:
    """Process 0's way into its compiled steps: each call broadcast to the followers, then made."""

    def __init__(self, model):
        self.model = model
        self._steps = _steps(model)
        self._numbers: dict[int, list[int]] = {}  # id(array) -> its numbers while it lives
        self._next = 0
        self._freed: deque[int] = deque()  # numbers of arrays gone since the last call

    def __call__(self, step: Callable, *args, **static):
        # A model's bound method (init_cache) is known by its function: the engine's model may be a
        # copy of the one this leader was made with (dataclasses.replace), with the same arrays.
        name = next((name for name, known in self._steps.items() if _function(known) is _function(step)), None)
        if name is None:
            raise MultihostError(f"{step!r} is not a step the other processes know (rz.multihost._steps)")
        model_static = _model_static(self.model)
        freed = [self._freed.popleft() for _ in range(len(self._freed))]
        message = (
            freed, name, tuple(_WEIGHTS if arg is self.model.weights else jax.tree.map(self._to_wire, arg) for arg in args),
            {key: _MODEL_STATIC if model_static.get(key, _STOP) is value else value for key, value in static.items()},
        )
        _broadcast(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))
        result = step(*args, **static)
        for array in _result_arrays(result):
            self._number(array)
        return result

    def close(self) -> None:
        """Let the followers return from follow()."""
        _broadcast(pickle.dumps(_STOP))

    def _number(self, array: jax.Array) -> None:
        number, self._next = self._next, self._next + 1
        key = id(array)
        if key not in self._numbers:
            self._numbers[key] = []
            weakref.finalize(array, self._forget, key)
        self._numbers[key].append(number)

    def _forget(self, key: int) -> None:
        # Runs when the array is collected, on whichever thread collects it: deque appends are atomic.
        self._freed.extend(self._numbers.pop(key, ()))

    def _to_wire(self, leaf):
        if not isinstance(leaf, jax.Array):
            return leaf
        numbers = self._numbers.get(id(leaf))
        if numbers:
            return _Ref(numbers[-1])
        if not leaf.is_fully_replicated:
            raise MultihostError(
                f"an array of shape {leaf.shape} split over the mesh reached a step without coming from one; "
                "the other processes cannot have it"
            )
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return _Value(np.asarray(jax.random.key_data(leaf)), str(jax.random.key_impl(leaf)))
        return _Value(np.asarray(leaf))


def follow(model) -> None:
    """Make every compiled call process 0's Leader broadcasts, with this process's shards, until it closes."""
    steps, model_static = _steps(model), _model_static(model)
    arrays: dict[int, jax.Array] = {}
    next_number = 0

    def from_wire(leaf):
        if isinstance(leaf, _Ref):
            return arrays[leaf.number]
        if isinstance(leaf, _Value):
            value = jax.numpy.asarray(leaf.data)
            return value if leaf.key_impl is None else jax.random.wrap_key_data(value, impl=leaf.key_impl)
        return leaf

    def is_wire(leaf):
        return isinstance(leaf, (_Ref, _Value))

    while True:
        message = pickle.loads(_broadcast(None))
        if isinstance(message, str) and message == _STOP:
            return
        freed, name, args, static = message
        for number in freed:
            arrays.pop(number, None)
        args = tuple(model.weights if isinstance(arg, str) and arg == _WEIGHTS else jax.tree.map(from_wire, arg, is_leaf=is_wire) for arg in args)
        static = {key: model_static[key] if isinstance(value, str) and value == _MODEL_STATIC else value for key, value in static.items()}
        try:
            result = steps[name](*args, **static)
        except Exception:  # noqa: BLE001 - it failed on process 0 too, which carries on
            continue
        for array in _result_arrays(result):
            arrays[next_number] = array
            next_number += 1


def _broadcast(payload: bytes | None) -> bytes:
    """Process 0's payload, on every process (None on the others)."""
    from jax.experimental.multihost_utils import broadcast_one_to_all

    leading = payload is not None
    frame = np.zeros(FRAME_BYTES, np.uint8)
    if leading:
        head = len(payload).to_bytes(_LENGTH_BYTES, "little") + payload[: FRAME_BYTES - _LENGTH_BYTES]
        frame[: len(head)] = np.frombuffer(head, np.uint8)
    frame = np.asarray(broadcast_one_to_all(frame, is_source=leading))
    length = int.from_bytes(frame[:_LENGTH_BYTES].tobytes(), "little")
    received = frame[_LENGTH_BYTES : _LENGTH_BYTES + length].tobytes()
    rest = length - len(received)
    if rest > 0:
        tail = np.zeros(1 << (rest - 1).bit_length(), np.uint8)
        if leading:
            tail[:rest] = np.frombuffer(payload[len(received):], np.uint8)
        received += np.asarray(broadcast_one_to_all(tail, is_source=leading))[:rest].tobytes()
    return received
