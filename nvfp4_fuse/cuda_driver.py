"""The few CUDA driver API calls the GPU decode's own lanes make, through ctypes: no torch, no Triton.

The GPU decode process (:mod:`~nvfp4_fuse.decode_worker`) used to import torch before it could run
anything: 3.3-3.7 s on the H200 host, longer than verify's whole pass over a 4 GB checkpoint. With the
compare kernel's compiled binary kept from an earlier run (:mod:`~nvfp4_fuse.kernel_cache`), all it
needs is ``libcuda``: start the device's primary context (what torch's runtime uses too), pinned host
memory, device memory, streams and events, copies, and one kernel launch a batch. Every call releases
the GIL while it runs (ctypes does).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass

import numpy as np

CU_DEVICE_ATTRIBUTE_CC_MAJOR = 75
CU_DEVICE_ATTRIBUTE_CC_MINOR = 76
CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
CU_STREAM_NON_BLOCKING = 1
CU_EVENT_DISABLE_TIMING = 2
STATIC_SHARED_LIMIT = 48 * 1024  # past this a kernel's shared memory must be allowed first


class CudaError(RuntimeError):
    """A CUDA driver call that failed, with the driver's name for the error."""


class CudaUnavailable(CudaError):
    """No usable CUDA driver or device here."""


@dataclass(frozen=True)
class Function:
    """A loaded kernel: its handle, and the dynamic shared memory each launch asks for."""

    handle: ctypes.c_void_p
    shared: int
    threads: int


class CudaDriver:
    """The driver library and the primary context of one device, current on every thread that calls
    :meth:`use` (each lane thread does, once)."""

    def __init__(self, device: int = 0):
        try:
            self.lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise CudaUnavailable(f"no usable CUDA device (the driver library cannot be loaded: {e})") from None
        self._check(self.lib.cuInit(0), "cuInit", unavailable=True)
        count = ctypes.c_int()
        self._check(self.lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount", unavailable=True)
        if count.value <= device:
            raise CudaUnavailable(f"no usable CUDA device (device {device} asked for, the driver sees {count.value})")
        dev = ctypes.c_int()
        self._check(self.lib.cuDeviceGet(ctypes.byref(dev), device), "cuDeviceGet", unavailable=True)
        self.device = dev.value
        ctx = ctypes.c_void_p()
        self._check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain", unavailable=True)
        self.ctx = ctx
        self.capability = (self._attribute(CU_DEVICE_ATTRIBUTE_CC_MAJOR), self._attribute(CU_DEVICE_ATTRIBUTE_CC_MINOR))
        self._lock = threading.Lock()
        self._modules: list[ctypes.c_void_p] = []
        self.use()
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        for name in ("cuMemcpyHtoDAsync_v2", "cuMemcpyDtoHAsync_v2"):
            getattr(self.lib, name).argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]

    # -- errors ------------------------------------------------------------------------------------
    def _name(self, code: int) -> str:
        s = ctypes.c_char_p()
        if self.lib.cuGetErrorName(code, ctypes.byref(s)) == 0 and s.value:
            return s.value.decode()
        return f"CUDA error {code}"

    def _check(self, code: int, call: str, unavailable: bool = False) -> None:
        if code and unavailable:
            raise CudaUnavailable(f"no usable CUDA device ({call} failed: {self._name(code)})")
        if code:
            raise CudaError(f"{call} failed: {self._name(code)}")

    def _attribute(self, attr: int) -> int:
        v = ctypes.c_int()
        self._check(self.lib.cuDeviceGetAttribute(ctypes.byref(v), attr, self.device), "cuDeviceGetAttribute")
        return v.value

    # -- context, memory ---------------------------------------------------------------------------
    def use(self) -> None:
        """Make the primary context current on the calling thread."""
        self._check(self.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")

    def alloc(self, nbytes: int) -> int:
        """Device memory (freed with :meth:`free`)."""
        p = ctypes.c_uint64()
        self._check(self.lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(max(nbytes, 1))), "cuMemAlloc")
        return p.value

    def free(self, ptr: int) -> None:
        self.lib.cuMemFree_v2(ctypes.c_uint64(ptr))

    def host_alloc(self, nbytes: int) -> tuple[int, np.ndarray]:
        """Pinned host memory as (address, uint8 array over it); freed with :meth:`host_free`."""
        p = ctypes.c_void_p()
        self._check(self.lib.cuMemHostAlloc(ctypes.byref(p), ctypes.c_size_t(max(nbytes, 1)), 0), "cuMemHostAlloc")
        arr = np.ctypeslib.as_array((ctypes.c_uint8 * nbytes).from_address(p.value)) if nbytes else np.empty(0, np.uint8)
        return p.value, arr

    def host_free(self, ptr: int) -> None:
        self.lib.cuMemFreeHost(ctypes.c_void_p(ptr))

    # -- streams, events, copies -------------------------------------------------------------------
    def stream(self) -> ctypes.c_void_p:
        s = ctypes.c_void_p()
        self._check(self.lib.cuStreamCreate(ctypes.byref(s), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
        return s

    def event(self) -> ctypes.c_void_p:
        e = ctypes.c_void_p()
        self._check(self.lib.cuEventCreate(ctypes.byref(e), CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        return e

    def record(self, event: ctypes.c_void_p, stream: ctypes.c_void_p) -> None:
        self._check(self.lib.cuEventRecord(event, stream), "cuEventRecord")

    def wait_event(self, event: ctypes.c_void_p) -> None:
        self._check(self.lib.cuEventSynchronize(event), "cuEventSynchronize")

    def sync(self, stream: ctypes.c_void_p) -> None:
        self._check(self.lib.cuStreamSynchronize(stream), "cuStreamSynchronize")

    def upload(self, dst: int, src: int, nbytes: int, stream: ctypes.c_void_p) -> None:
        self._check(self.lib.cuMemcpyHtoDAsync_v2(dst, src, nbytes, stream), "cuMemcpyHtoDAsync")

    def download(self, dst: int, src: int, nbytes: int, stream: ctypes.c_void_p) -> None:
        self._check(self.lib.cuMemcpyDtoHAsync_v2(dst, src, nbytes, stream), "cuMemcpyDtoHAsync")

    # -- kernels -----------------------------------------------------------------------------------
    def load(self, binary: bytes, name: str, shared: int, threads: int) -> Function:
        """Load a compiled kernel (a cubin) and find its entry point ``name``."""
        mod = ctypes.c_void_p()
        self._check(self.lib.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(binary)), "cuModuleLoadData")
        with self._lock:
            self._modules.append(mod)
        fn = ctypes.c_void_p()
        self._check(self.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()), f"cuModuleGetFunction({name})")
        if shared > STATIC_SHARED_LIMIT:
            self._check(self.lib.cuFuncSetAttribute(fn, CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, shared), "cuFuncSetAttribute")
        return Function(fn, shared, threads)

    def launch(self, fn: Function, grid: tuple[int, int, int], params: list, stream: ctypes.c_void_p | int) -> None:
        """Launch ``fn`` on ``grid`` with ``params`` (ctypes values, in the kernel's order)."""
        if not all(grid):
            return
        ptrs = (ctypes.c_void_p * len(params))(*[ctypes.cast(ctypes.pointer(p), ctypes.c_void_p) for p in params])
        code = self.lib.cuLaunchKernel(fn.handle, grid[0], grid[1], grid[2], fn.threads, 1, 1, fn.shared, ctypes.c_void_p(int(stream.value or 0) if isinstance(stream, ctypes.c_void_p) else stream), ptrs, None)
        self._check(code, "cuLaunchKernel")
