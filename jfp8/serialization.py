"""safetensors IO that understands FP8, and QArray <-> named tensors.

The `safetensors` package writes F8_E4M3 / F8_E5M2 tensors but (0.8) cannot read them back into
numpy (it looks for `numpy.float8_e4m3fn`, which lives in ml_dtypes). The format is simple (an
8-byte little-endian header length, a JSON header, raw little-endian bytes), so reading is done
here with a memory map: tensors are read lazily, one at a time, which keeps peak host memory near
one tensor when a loader streams a checkpoint.

A QArray named `w` is stored as two tensors, `w` (FP8 data) and `w.scale` (f32), plus its format
and granularity in the file's string metadata under `jfp8.w`.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from jfp8.formats import as_format
from jfp8.qarray import QArray, from_parts
from jfp8.scaling import PerBlock, PerChannel, PerTensor

_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """A safetensors file opened for lazy reads: `names()`, `shape(name)`, `dtype(name)`,
    `get(name)` -> numpy array (a copy), `metadata`."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"{self.path}: header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: header is not JSON ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._entries = header
        self._offset = 8 + n
        self._size = size
        self._mmap = None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._entry(name)["dtype"]
        if code not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {code}, which jfp8 cannot read "
                             f"(expected one of {sorted(_DTYPES)})")
        return _DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        entry = self._entry(name)
        dtype, shape = self.dtype(name), tuple(entry["shape"])
        start, end = entry["data_offsets"]
        if end - start != int(np.prod(shape)) * dtype.itemsize or self._offset + end > self._size:
            raise ValueError(f"{self.path}: tensor {name!r} byte range {start}..{end} does not match "
                             f"shape {shape} {dtype} (file truncated?)")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._offset + start:self._offset + end]
        return np.array(raw.view(dtype).reshape(shape))

    def _entry(self, name: str) -> dict:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names():
            yield name, self.get(name)


def read_safetensors(path) -> dict[str, np.ndarray]:
    """All tensors of a file as numpy arrays (FP8 as ml_dtypes arrays)."""
    return dict(SafetensorsFile(path))


def write_safetensors(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors atomically: a temp file in the same folder, then os.replace, so an
    interrupted save never leaves a half-written file under `path`."""
    path = os.fspath(path)
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, arrays = 0, []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(np.asarray(arr))
        if arr.dtype not in _NAMES:
            raise TypeError(f"tensors[{name!r}]: dtype {arr.dtype} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)  # align the data section to 8 bytes
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for arr in arrays:
                f.write(arr.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# QArray <-> tensors

def granularity_to_str(g) -> str:
    if isinstance(g, PerTensor):
        return "tensor"
    if isinstance(g, PerChannel):
        return f"channel:{g.axis}"
    if isinstance(g, PerBlock):
        return "block:" + "x".join(str(b) for b in g.block)
    raise TypeError(f"granularity: cannot serialise {g!r}")


def granularity_from_str(s: str):
    kind, _, arg = s.partition(":")
    if kind == "tensor":
        return PerTensor()
    if kind == "channel":
        return PerChannel(int(arg))
    if kind == "block":
        return PerBlock(tuple(int(b) for b in arg.split("x")))
    raise ValueError(f"granularity: cannot parse {s!r}")


def qarray_to_tensors(name: str, q: QArray) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) for one QArray stored under `name`."""
    meta = json.dumps({"format": q.format.name, "granularity": granularity_to_str(q.granularity)})
    return ({name: np.asarray(q.data), f"{name}.scale": np.asarray(q.scale, np.float32)},
            {f"jfp8.{name}": meta})


def qarray_from_tensors(name: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> QArray:
    try:
        info = json.loads(metadata[f"jfp8.{name}"])
    except KeyError:
        raise KeyError(f"metadata: no jfp8 entry for tensor {name!r}") from None
    return from_parts(tensors[name], tensors[f"{name}.scale"], as_format(info["format"]),
                      granularity_from_str(info["granularity"]))


def _flatten(tree, prefix=""):
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            yield from _flatten(v, f"{prefix}{k}/")
    else:
        yield prefix[:-1], tree


def save_params(path, params, metadata: Mapping[str, str] | None = None) -> None:
    """Save a nested dict of arrays and QArrays (e.g. from jfp8.quantize_params) to one file."""
    tensors, meta = {}, dict(metadata or {})
    for name, leaf in _flatten(params):
        if isinstance(leaf, QArray):
            t, m = qarray_to_tensors(name, leaf)
            tensors.update(t)
            meta.update(m)
        else:
            tensors[name] = np.asarray(leaf)
    write_safetensors(path, tensors, meta)


def load_params(path) -> dict:
    """Inverse of save_params: the nested dict, QArrays rebuilt (as jax arrays)."""
    import jax.numpy as jnp
    f = SafetensorsFile(path)
    quantized = {k[len("jfp8."):] for k in f.metadata if k.startswith("jfp8.")}
    tree: dict = {}
    for name in f.names():
        if name.endswith(".scale") and name[:-len(".scale")] in quantized:
            continue
        if name in quantized:
            leaf = qarray_from_tensors(name, {name: f.get(name), f"{name}.scale": f.get(f"{name}.scale")},
                                       f.metadata)
        else:
            leaf = jnp.asarray(f.get(name))
        node = tree
        *parents, last = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    return tree
