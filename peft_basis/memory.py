"""Giving memory back to the system as a compression goes, so its peak is not the dense model plus everything made.

Two things keep memory resident after the library is done with it, on Linux:

- A model loaded from safetensors holds its weights in pages mapped from the checkpoint file. Dropping a
  dense weight does not unmap them (the file's mapping stays while any of its tensors lives), so the dense
  model stays resident beside the factors made from it. :func:`release_pages` tells the kernel those pages
  are not needed (``madvise(MADV_DONTNEED)``), only where every page is still the file's own (present and
  never written, checked in ``/proc/self/pagemap``): such a page, if read again, is read back from the
  file, the same bytes, so nothing can be lost; a page the process wrote to (copy-on-write) is kept.
- glibc keeps freed heap memory for reuse, per thread arena: the float64 temporaries of factorisations in
  worker threads stay resident (and RSS creeps up a few MB per layer of a layer-by-layer run). :func:`trim_memory`
  hands it back (``malloc_trim``). What a worker made and the model keeps (the factors) is laid out for good
  in that worker (``in_layer_layout``): copied in the main thread, it would grow that thread's heap while the
  original's memory stayed in the worker's, out of reach of a trim while anything lives near it.

Elsewhere (macOS, Windows, musl) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

__all__ = ["release_pages", "trim_memory"]

_MADV_DONTNEED = 4
_PAGE_PRESENT, _PAGE_FILE = 1 << 63, 1 << 61
_libc = None


def _c_library():
    global _libc
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
                lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                _libc = lib if hasattr(lib, "malloc_trim") else False
            except OSError:
                pass
    return _libc or None


def trim_memory() -> None:
    """Return the heap memory freed so far to the system (glibc's ``malloc_trim``)."""
    lib = _c_library()
    if lib is not None:
        lib.malloc_trim(0)


def _file_mapped(start: int, end: int) -> bool:
    """Whether ``[start, end)`` lies inside one mapping of a file (not anonymous memory, not a device)."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            lo, hi = (int(v, 16) for v in fields[0].split("-"))
            if lo <= start < hi:
                path = fields[5].strip() if len(fields) > 5 else ""
                return end <= hi and path.startswith("/") and not path.startswith("/dev/")
    return False


def release_pages(tensor: torch.Tensor) -> int:
    """Let the kernel drop the resident pages of ``tensor``'s memory that are unmodified pages of a mapped file
    (the whole pages inside it). The tensor stays valid: a page read again is read back from the file. Returns
    the bytes released (0 for memory that is not such a mapping, or off Linux)."""
    lib = _c_library()
    if lib is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return 0
    page = os.sysconf("SC_PAGE_SIZE")
    begin = tensor.data_ptr()
    start = -(-begin // page) * page
    end = (begin + tensor.numel() * tensor.element_size()) // page * page
    if end <= start or not _file_mapped(start, end):
        return 0
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(start // page * 8)
            raw = f.read((end - start) // page * 8)
    except OSError:
        return 0
    import numpy as np

    wanted = np.uint64(_PAGE_PRESENT | _PAGE_FILE)
    ok = np.concatenate([[False], (np.frombuffer(raw, dtype=np.uint64) & wanted) == wanted, [False]])
    edges = np.flatnonzero(np.diff(ok.astype(np.int8)))  # starts (+1) and ends (-1) of runs of such pages
    released = 0
    for first, last in zip(edges[::2], edges[1::2]):
        if lib.madvise(start + int(first) * page, int(last - first) * page, _MADV_DONTNEED) == 0:
            released += int(last - first) * page
    return released
