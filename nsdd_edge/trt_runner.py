"""TensorRT plan runner (TensorRT 10/11 Python API) with pycuda or cuda-python.

- ``trt.Runtime(logger).deserialize_cuda_engine(plan)``; named I/O tensors (``num_io_tensors``,
  ``get_tensor_name``, ``get_tensor_mode``, ``set_input_shape``, ``set_tensor_address``);
  ``execute_async_v3(stream)`` on one CUDA stream.
- Host buffers are page-locked; on Jetson (``/etc/nv_tegra_release`` or the device's ``integrated``
  attribute) they are *mapped* (zero-copy): the GPU reads and writes the host memory directly, no copies.
- With cuda-python, the execute call (plus copies) is captured into a CUDA graph after one warm-up run and
  replayed (pycuda has no graph API, so it runs the plain stream path).
- A plan of a spectra-input graph (``nsdd-export onnx --spectra-input``) has more inputs than ``y``: the
  pseudo-inverse spectra (static shapes). :meth:`TrtRunner.set_inputs` stages new values from any thread; the
  next :meth:`TrtRunner.infer` copies them into their bindings before it enqueues the frame (stream-ordered
  ``cudaMemcpyAsync`` outside the captured graph; with mapped memory a plain host write between frames), so
  a frame in flight never sees half-written spectra.

TensorRT, pycuda and cuda-python are optional: importing this module never needs them, and using the
runner without them raises :class:`TrtUnavailable` with the reason. The pure decisions (which CUDA
binding, zero-copy or not, graph or not) are plain functions so they can be tested anywhere.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

TEGRA_RELEASE = Path("/etc/nv_tegra_release")


class TrtUnavailable(RuntimeError):
    """TensorRT or a CUDA binding is missing, or the plan cannot run here; the message says which."""


# ------------------------------------------------------------------------------------------------
# Pure decisions
# ------------------------------------------------------------------------------------------------


def module_available(name: str) -> tuple[bool, str]:
    """``(True, version)`` if ``name`` imports, else ``(False, why)``."""
    try:
        mod = importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install raising something else
        return False, f"{name} not importable ({type(exc).__name__}: {exc})"
    return True, str(getattr(mod, "__version__", "unknown version"))


def _cuda_python_module():
    """cuda-python's runtime API: ``cuda.bindings.runtime`` (12.6+) or the older ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        from cuda import cudart  # type: ignore[import-not-found,no-redef]
    return cudart


def available_cuda_bindings() -> dict[str, tuple[bool, str]]:
    """Which CUDA Python bindings import here: ``{"cuda-python": (ok, why), "pycuda": (ok, why)}``."""
    try:
        _cuda_python_module()
        cp = (True, "cuda-python runtime API")
    except Exception as exc:
        cp = (False, f"cuda-python not importable ({type(exc).__name__}: {exc})")
    try:
        import pycuda.driver  # type: ignore[import-not-found]  # noqa: F401

        pc = (True, "pycuda driver API")
    except Exception as exc:
        pc = (False, f"pycuda not importable ({type(exc).__name__}: {exc})")
    return {"cuda-python": cp, "pycuda": pc}


def choose_cuda_binding(available: dict[str, tuple[bool, str]], prefer: str | None = None) -> str:
    """Pick ``cuda-python`` (has CUDA graphs) over ``pycuda``; ``prefer`` forces one. Raises if none."""
    order = [prefer] if prefer else ["cuda-python", "pycuda"]
    for name in order:
        if name not in ("cuda-python", "pycuda"):
            raise TrtUnavailable(f"unknown CUDA binding {name!r}; use 'cuda-python' or 'pycuda'")
        if available.get(name, (False, ""))[0]:
            return name
    why = "; ".join(f"{k}: {v[1]}" for k, v in available.items() if not v[0])
    raise TrtUnavailable(f"no CUDA Python binding available ({why}); install cuda-python "
                         "(pip install cuda-python) or pycuda (built on the device)")


def is_jetson(release_file: Path = TEGRA_RELEASE, integrated_attribute: int | None = None) -> bool:
    """Jetson (integrated GPU sharing memory with the CPU): ``/etc/nv_tegra_release`` or the device attribute."""
    if integrated_attribute is not None and int(integrated_attribute) != 0:
        return True
    return Path(release_file).exists()


def plan_memory_mode(integrated: bool, zero_copy: bool | None = None) -> str:
    """``mapped`` (zero-copy host memory) on integrated GPUs, else ``pinned`` (page-locked + copies).

    ``zero_copy`` forces it on or off.
    """
    if zero_copy is None:
        return "mapped" if integrated else "pinned"
    return "mapped" if zero_copy else "pinned"


def use_cuda_graph(binding: str, requested: bool = True) -> bool:
    """CUDA graphs need cuda-python (pycuda has no graph API)."""
    return bool(requested) and binding == "cuda-python"


@dataclass
class TensorSpec:
    name: str
    is_input: bool
    shape: tuple[int, ...]
    dtype: np.dtype


def resolve_shape(engine_shape: tuple[int, ...], wanted: tuple[int, ...], name: str) -> tuple[int, ...]:
    """Concrete input shape from an engine shape with ``-1`` dynamic dims and the wanted shape."""
    if len(engine_shape) != len(wanted):
        raise TrtUnavailable(f"input {name!r}: engine expects rank {len(engine_shape)} {engine_shape}, "
                             f"got {wanted}")
    for e, w in zip(engine_shape, wanted):
        if e != -1 and e != w:
            raise TrtUnavailable(f"input {name!r}: engine expects shape {engine_shape}, got {wanted}")
    return tuple(int(w) for w in wanted)


# ------------------------------------------------------------------------------------------------
# CUDA memory backends
# ------------------------------------------------------------------------------------------------


def _check(result):
    """cuda-python calls return ``(err, *values)``; raise on a non-zero error."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise TrtUnavailable(f"CUDA error {err}")
    return values[0] if len(values) == 1 else (values if values else None)


class _CudaPython:
    """Streams, buffers, copies and graphs through cuda-python's runtime API."""

    graphs = True

    def __init__(self, device: int = 0):
        self.rt = _cuda_python_module()
        _check(self.rt.cudaSetDevice(device))
        self.integrated = int(_check(self.rt.cudaDeviceGetAttribute(
            self.rt.cudaDeviceAttr.cudaDevAttrIntegrated, device)))
        self.stream = _check(self.rt.cudaStreamCreate())
        self._allocs: list[tuple[str, int]] = []

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def host_array(self, shape, dtype, mapped: bool) -> tuple[np.ndarray, int | None]:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        flags = self.rt.cudaHostAllocMapped if mapped else self.rt.cudaHostAllocDefault
        ptr = int(_check(self.rt.cudaHostAlloc(nbytes, flags)))
        self._allocs.append(("host", ptr))
        arr = np.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype).reshape(shape)
        dev = int(_check(self.rt.cudaHostGetDevicePointer(ptr, 0))) if mapped else None
        return arr, dev

    def device_alloc(self, nbytes: int) -> int:
        ptr = int(_check(self.rt.cudaMalloc(nbytes)))
        self._allocs.append(("device", ptr))
        return ptr

    def htod(self, dev: int, host: np.ndarray) -> None:
        _check(self.rt.cudaMemcpyAsync(dev, host.ctypes.data, host.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))

    def dtoh(self, host: np.ndarray, dev: int) -> None:
        _check(self.rt.cudaMemcpyAsync(host.ctypes.data, dev, host.nbytes,
                                       self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))

    def synchronize(self) -> None:
        _check(self.rt.cudaStreamSynchronize(self.stream))

    def begin_capture(self) -> None:
        _check(self.rt.cudaStreamBeginCapture(self.stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal))

    def end_capture(self):
        graph = _check(self.rt.cudaStreamEndCapture(self.stream))
        return graph, _check(self.rt.cudaGraphInstantiate(graph, 0))

    def abort_capture(self) -> None:
        """End a failed capture (discarding the partial graph) so the stream is usable again."""
        err, graph = self.rt.cudaStreamEndCapture(self.stream)
        if int(err) == 0 and graph is not None:
            self.rt.cudaGraphDestroy(graph)

    def launch(self, graph_exec) -> None:
        _check(self.rt.cudaGraphLaunch(graph_exec, self.stream))

    def destroy_graph(self, graph, graph_exec) -> None:
        self.rt.cudaGraphExecDestroy(graph_exec)
        self.rt.cudaGraphDestroy(graph)

    def close(self) -> None:
        for kind, ptr in reversed(self._allocs):
            (self.rt.cudaFreeHost if kind == "host" else self.rt.cudaFree)(ptr)
        self._allocs.clear()
        self.rt.cudaStreamDestroy(self.stream)


class _PyCuda:
    """Streams, buffers and copies through pycuda (no CUDA graphs)."""

    graphs = False

    def __init__(self, device: int = 0):
        import pycuda.driver as cuda  # type: ignore[import-not-found]

        self.cuda = cuda
        cuda.init()
        dev = cuda.Device(device)
        self.context = dev.make_context(cuda.ctx_flags.MAP_HOST)  # MAP_HOST: allow mapped (zero-copy) memory
        self.integrated = int(dev.get_attribute(cuda.device_attribute.INTEGRATED))
        self.stream = cuda.Stream()
        self._keep: list[Any] = []

    @property
    def stream_handle(self) -> int:
        return int(self.stream.handle)

    def host_array(self, shape, dtype, mapped: bool) -> tuple[np.ndarray, int | None]:
        cuda = self.cuda
        if mapped:
            arr = cuda.pagelocked_empty(shape, dtype, mem_flags=cuda.host_alloc_flags.DEVICEMAP)
            return arr, int(arr.base.get_device_pointer())
        return cuda.pagelocked_empty(shape, dtype), None

    def device_alloc(self, nbytes: int) -> int:
        buf = self.cuda.mem_alloc(nbytes)
        self._keep.append(buf)
        return int(buf)

    def htod(self, dev: int, host: np.ndarray) -> None:
        self.cuda.memcpy_htod_async(dev, host, self.stream)

    def dtoh(self, host: np.ndarray, dev: int) -> None:
        self.cuda.memcpy_dtoh_async(host, dev, self.stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self._keep.clear()
        self.context.pop()


# ------------------------------------------------------------------------------------------------
# The runner
# ------------------------------------------------------------------------------------------------


class TrtRunner:
    """Run a serialized TensorRT engine on (N, C, H, W) float32 input; see the module docstring."""

    def __init__(self, plan_path: str | os.PathLike, *, binding: str | None = None, cuda_graph: bool = True,
                 zero_copy: bool | None = None, device: int = 0):
        self.plan_path = Path(plan_path)
        ok, why = module_available("tensorrt")
        if not ok:
            raise TrtUnavailable(f"TensorRT engine {self.plan_path}: {why}; TensorRT comes with JetPack on a "
                                 "Jetson (or the tensorrt wheel with an NVIDIA GPU)")
        if not self.plan_path.is_file():
            raise TrtUnavailable(f"{self.plan_path}: TensorRT plan file does not exist")
        import tensorrt as trt  # type: ignore[import-not-found]

        self.trt = trt
        self.binding = choose_cuda_binding(available_cuda_bindings(), binding)
        self.cuda = _CudaPython(device) if self.binding == "cuda-python" else _PyCuda(device)
        self.integrated = is_jetson(integrated_attribute=self.cuda.integrated)
        self.memory = plan_memory_mode(self.integrated, zero_copy)
        self.graph_requested = use_cuda_graph(self.binding, cuda_graph)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise TrtUnavailable(f"{self.plan_path}: TensorRT could not deserialize the plan (built for another "
                                 f"TensorRT version {trt.__version__} or another GPU? build engines on the device)")
        self.context = self.engine.create_execution_context()
        self.tensors: list[TensorSpec] = []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            self.tensors.append(TensorSpec(
                name=name, is_input=self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT,
                shape=tuple(self.engine.get_tensor_shape(name)),
                dtype=np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))))
        inputs = [t for t in self.tensors if t.is_input]
        outputs = [t for t in self.tensors if not t.is_input]
        measured = [t for t in inputs if t.name == "y"] or inputs[:1]  # export.onnx_graph.INPUT_NAME
        if not measured or not outputs:
            raise TrtUnavailable(f"{self.plan_path}: expected the input y and at least one output, got "
                                 f"{[t.name for t in inputs]} / {[t.name for t in outputs]}")
        self.input, self.output = measured[0], outputs[0]
        # the other inputs (a spectra-input graph's spectra): static shapes, values from set_inputs
        self.extra_inputs = {t.name: t for t in inputs if t.name != self.input.name}
        for t in self.extra_inputs.values():
            if any(d < 0 for d in t.shape):
                raise TrtUnavailable(f"{self.plan_path}: input {t.name} has a dynamic shape {t.shape}; only y may")
        self._extra_values: dict[str, np.ndarray] = {}
        self._pending: dict[str, np.ndarray] | None = None
        self._pending_lock = threading.Lock()
        self._shape: tuple[int, ...] | None = None
        self._graph = self._graph_exec = None
        self.graph_error: str | None = None
        self._buffers: dict[str, tuple[np.ndarray, int]] = {}

    def describe(self) -> str:
        return (f"TensorRT {self.trt.__version__} plan {self.plan_path.name} via {self.binding}, "
                f"{self.memory} host memory{', CUDA graph' if self.graph_requested else ''}")

    def _allocate(self, shape: tuple[int, ...]) -> None:
        shape = resolve_shape(self.input.shape, shape, self.input.name)
        if not self.context.set_input_shape(self.input.name, shape):
            raise TrtUnavailable(f"{self.plan_path}: input shape {shape} outside the engine's optimisation profile")
        self._drop_graph()  # a graph holds the old buffer addresses
        self._buffers.clear()
        mapped = self.memory == "mapped"
        for t in self.tensors:
            tshape = tuple(self.context.get_tensor_shape(t.name))
            host, dev = self.cuda.host_array(tshape, t.dtype, mapped)
            if dev is None:
                dev = self.cuda.device_alloc(host.nbytes)
            self._buffers[t.name] = (host, dev)
            self.context.set_tensor_address(t.name, dev)
        self._shape = shape
        self._runs = 0
        self._buffers_have_extra = not self.extra_inputs

    def set_inputs(self, values: dict[str, np.ndarray]) -> None:
        """Stage new values of the extra inputs (all of them, each of its binding's shape); they are copied in
        before the next frame (see the module docstring). Safe to call from another thread."""
        if set(values) != set(self.extra_inputs):
            raise TrtUnavailable(f"{self.plan_path}: the plan's extra inputs are {sorted(self.extra_inputs)}, got "
                                 f"{sorted(values)}")
        staged = {}
        for name, t in self.extra_inputs.items():
            a = np.ascontiguousarray(values[name], dtype=t.dtype)
            if tuple(a.shape) != tuple(t.shape):
                raise TrtUnavailable(f"{self.plan_path}: input {name} has shape {t.shape}, got {a.shape}")
            staged[name] = a
        with self._pending_lock:
            self._pending = staged

    def _apply_pending(self) -> None:
        """Copy staged extra inputs into their bindings (between frames, on the inference thread)."""
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            self._extra_values = pending
        elif not self._buffers_have_extra:
            pending = self._extra_values  # new buffers (first frame, new batch size): fill them again
        else:
            return
        missing = sorted(set(self.extra_inputs) - set(self._extra_values))
        if missing:
            raise TrtUnavailable(f"{self.plan_path}: no values for the inputs {missing} (set_inputs first)")
        for name, value in self._extra_values.items():
            host, dev = self._buffers[name]
            np.copyto(host, value)
            if self.memory != "mapped":
                self.cuda.htod(dev, host)  # stream-ordered before the frame's own copies and execution
        self._buffers_have_extra = True

    def _enqueue(self) -> None:
        """Copies in, execute, copies out (copies skipped with mapped memory)."""
        copies = self.memory != "mapped"
        host_in, dev_in = self._buffers[self.input.name]
        if copies:
            self.cuda.htod(dev_in, host_in)
        if not self.context.execute_async_v3(self.cuda.stream_handle):
            raise RuntimeError(f"{self.plan_path}: TensorRT execute_async_v3 failed")
        if copies:
            for t in self.tensors:
                if not t.is_input:
                    host, dev = self._buffers[t.name]
                    self.cuda.dtoh(host, dev)

    def infer(self, y: np.ndarray) -> np.ndarray:
        if self._shape != tuple(y.shape):
            self._allocate(tuple(y.shape))
        host_in, _ = self._buffers[self.input.name]
        np.copyto(host_in, y, casting="same_kind")
        if self.extra_inputs:
            self._apply_pending()
        if self._graph_exec is not None:
            self.cuda.launch(self._graph_exec)
        elif self.graph_requested and self._runs >= 1:  # warm-up done: capture the whole enqueue once
            try:
                self.cuda.begin_capture()
                self._enqueue()
                self._graph, self._graph_exec = self.cuda.end_capture()
            except (TrtUnavailable, RuntimeError) as exc:  # e.g. a layer that cannot be captured
                self.cuda.abort_capture()
                self.graph_requested = False
                self.graph_error = f"CUDA graph capture failed ({exc}); running without a graph"
                self._enqueue()
            else:
                self.cuda.launch(self._graph_exec)
        else:
            self._enqueue()
        self.cuda.synchronize()
        self._runs += 1
        return np.array(self._buffers[self.output.name][0], dtype=np.float32, copy=True)

    def _drop_graph(self) -> None:
        if self._graph_exec is not None:
            self.cuda.destroy_graph(self._graph, self._graph_exec)
        self._graph = self._graph_exec = None

    def close(self) -> None:
        self._drop_graph()
        self._buffers.clear()
        self.context = None  # TensorRT objects go before the CUDA context/stream they live in
        self.engine = None
        self.runtime = None
        self.cuda.close()
