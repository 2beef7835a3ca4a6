"""Writing safetensors files without holding them in memory: the header first, then tensor by tensor.

``safetensors.torch.save_file`` first turns every tensor into bytes, so writing a file costs its size
twice in memory; here each tensor is written as it comes (the layer-by-layer pipeline writes factors
while later layers are still being computed). The layout is the safetensors format exactly (8-byte
little-endian header length, JSON header padded to 8 bytes, tensors back to back in header order)."""

from __future__ import annotations

import json
import os
import struct
import tempfile

import torch

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsStreamWriter:
    """Write a safetensors file tensor by tensor: shapes are declared up front (the header), data is
    appended in declaration order, so the file never needs to fit in memory. The file appears under
    its final name only when complete (atomic rename, with the permissions a plain ``open`` gives)."""

    def __init__(self, path: str, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = None):
        self.path = path
        self.order = list(specs)
        header: dict = {"__metadata__": metadata or {}}
        offset = 0
        for name, (shape, dtype) in specs.items():
            if dtype not in SAFETENSORS_DTYPES:
                raise TypeError(f"{name}: safetensors has no dtype for {dtype}.")
            nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.specs = specs
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
        self.f = os.fdopen(fd, "wb")
        self.f.write(struct.pack("<Q", len(raw)))
        self.f.write(raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.order[self.next] if self.next < len(self.order) else None
        if name != expected:
            raise RuntimeError(f"SafetensorsStreamWriter: expected {expected}, got {name} (write in declaration order).")
        shape, dtype = self.specs[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise RuntimeError(f"{name}: declared {tuple(shape)} {dtype}, got {tuple(tensor.shape)} {tensor.dtype}.")
        if tensor.numel():
            self.f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.next += 1

    def close(self) -> None:
        from .files import _umask

        self.f.close()
        if self.next != len(self.order):
            os.remove(self.tmp)
            raise RuntimeError(f"SafetensorsStreamWriter: {len(self.order) - self.next} tensors were never written.")
        os.chmod(self.tmp, 0o666 & ~_umask())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self) -> "SafetensorsStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_streaming(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    """``safetensors.torch.save_file`` without the second in-memory copy, atomically."""
    specs = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
    with SafetensorsStreamWriter(path, specs, metadata) as writer:
        for k, t in tensors.items():
            writer.write(k, t)
