"""The model snapshot format: data only, checked whole before anything is built from it.

Snapshots travel through the model registry (Redis) to every tier worker, so reading one must
never run code (the first format, ``CSNAP1``, was a pickle) and a corrupt or hostile one must fail
as :class:`SnapshotError`, which callers can catch, and as nothing else.

Layout, integers big-endian::

    magic        6 bytes   b"CSNAPD"
    schema       u16       SCHEMA_VERSION: of this layout and of the manifest's conventions
    body length  u64       exactly the number of bytes after the header
    sha256       32 bytes  of the body
    body         manifest length (u32), manifest (UTF-8 JSON), payloads (concatenated)

The manifest is ``{"kind", "version", "state", "payloads"}``: ``payloads`` lists each payload's
``[offset, length]`` in the payload area. ``state`` is the data tree a tier or policy hands over
(dicts with str keys, lists, str, int, float, bool, None), where a numpy array is written as
``{"$npy": i}`` (payload i is its ``.npy`` file, read with ``allow_pickle=False``) and a bytes value
as ``{"$bytes": i}``. State dict keys may not start with ``$``, so no state reads as a reference.

The restore functions read the tree through :func:`field`, :func:`count`, :func:`number` and
:func:`array`, which raise :class:`SnapshotError` on a missing field or a wrong type.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import struct
from typing import Any, TypeVar

import numpy as np

SCHEMA_VERSION = 1
_MAGIC = b"CSNAPD"
_PICKLE_MAGIC = b"CSNAP1"
_HEADER = struct.Struct(">6sHQ32s")
_MANIFEST_LENGTH = struct.Struct(">I")
MAX_BODY_BYTES = 512 * 2**20  # Redis's largest string: no registry can hold a larger snapshot
_MAX_DEPTH = 32  # far deeper than any state; bounds the recursion over a hostile manifest
_ARRAY_KINDS = "biuf"  # bool, signed and unsigned int, float: the only dtypes a model state has
_REFS = ("$npy", "$bytes")

T = TypeVar("T")


class SnapshotError(ValueError):
    """A snapshot that cannot be read, or cannot restore this object; it changed nothing."""


# -- writing ----------------------------------------------------------------------------------


def encode_snapshot(kind: str, version: int, state: Any) -> bytes:
    """``state`` as a snapshot of a ``kind`` model at ``version``; TypeError names what is not data."""
    payloads: list[bytes] = []
    tree = _to_tree(state, payloads, "state")
    spans, offset = [], 0
    for p in payloads:
        spans.append([offset, len(p)])
        offset += len(p)
    manifest = json.dumps(
        {"kind": kind, "version": version, "state": tree, "payloads": spans}, separators=(",", ":")
    ).encode("utf-8")
    body = b"".join([_MANIFEST_LENGTH.pack(len(manifest)), manifest, *payloads])
    if len(body) > MAX_BODY_BYTES:
        raise SnapshotError(f"snapshot of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}")
    return _HEADER.pack(_MAGIC, SCHEMA_VERSION, len(body), hashlib.sha256(body).digest()) + body


def _to_tree(value: Any, payloads: list[bytes], path: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in _ARRAY_KINDS or value.dtype.fields is not None:
            raise TypeError(f"{path}: arrays of dtype {value.dtype} are not snapshot data")
        buf = io.BytesIO()
        np.save(buf, value, allow_pickle=False)
        payloads.append(buf.getvalue())
        return {"$npy": len(payloads) - 1}
    if isinstance(value, bytes):
        payloads.append(value)
        return {"$bytes": len(payloads) - 1}
    if isinstance(value, (list, tuple)):
        return [_to_tree(v, payloads, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or k.startswith("$"):
                raise TypeError(f"{path}: key {k!r} is not a str without a leading '$'")
            out[k] = _to_tree(v, payloads, f"{path}.{k}")
        return out
    raise TypeError(f"{path}: a {type(value).__name__} is not snapshot data")


# -- reading ----------------------------------------------------------------------------------


def decode_snapshot(blob: bytes, kind: str) -> tuple[int, Any]:
    """(version, state) of a snapshot of a ``kind`` model; SnapshotError for anything else."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise SnapshotError(f"a snapshot is bytes, not {type(blob).__name__}")
    view = memoryview(blob)
    if view[: len(_PICKLE_MAGIC)] == _PICKLE_MAGIC:
        raise SnapshotError("refusing a pickled snapshot (format CSNAP1): republish it with this version's learner")
    if view[: len(_MAGIC)] != _MAGIC:
        raise SnapshotError("not a cascade snapshot")
    if len(view) < _HEADER.size:
        raise SnapshotError(f"snapshot truncated within its {_HEADER.size}-byte header")
    _, schema, length, digest = _HEADER.unpack_from(view)
    if schema != SCHEMA_VERSION:
        raise SnapshotError(f"snapshot schema version {schema} is not the one this code reads ({SCHEMA_VERSION})")
    if length > MAX_BODY_BYTES:
        raise SnapshotError(f"snapshot declares {length} bytes, over the limit of {MAX_BODY_BYTES}")
    body = view[_HEADER.size :]
    if len(body) != length:
        raise SnapshotError(f"snapshot body is {len(body)} bytes, its header says {length}: truncated or padded")
    if hashlib.sha256(body).digest() != digest:
        raise SnapshotError("snapshot body does not match its sha256: corrupt")
    if length < _MANIFEST_LENGTH.size:
        raise SnapshotError("snapshot body too short for a manifest")
    (manifest_length,) = _MANIFEST_LENGTH.unpack_from(body)
    area = body[_MANIFEST_LENGTH.size :]
    if manifest_length > len(area):
        raise SnapshotError(f"snapshot manifest of {manifest_length} bytes overruns the body")
    try:
        manifest = json.loads(bytes(area[:manifest_length]).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise SnapshotError(f"snapshot manifest is not JSON: {e}") from e
    if not isinstance(manifest, dict) or set(manifest) != {"kind", "version", "state", "payloads"}:
        raise SnapshotError("snapshot manifest lacks kind, version, state or payloads")
    if manifest["kind"] != kind:
        raise SnapshotError(f"snapshot of a {manifest['kind']!r} cannot restore a {kind!r}")
    version = manifest["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise SnapshotError(f"snapshot version {version!r} is not a count")
    payloads = _payloads(manifest["payloads"], area[manifest_length:])
    return version, _from_tree(manifest["state"], payloads, 0)


def _payloads(spans: Any, area: memoryview) -> list[memoryview]:
    if not isinstance(spans, list):
        raise SnapshotError("snapshot payload table is not a list")
    out = []
    for span in spans:
        if (
            not isinstance(span, list)
            or len(span) != 2
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in span)
            or span[0] + span[1] > len(area)
        ):
            raise SnapshotError(f"snapshot payload span {span!r} is not within the body")
        out.append(area[span[0] : span[0] + span[1]])
    return out


def _from_tree(node: Any, payloads: list[memoryview], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise SnapshotError("snapshot state nests too deep")
    if isinstance(node, list):
        return [_from_tree(v, payloads, depth + 1) for v in node]
    if not isinstance(node, dict):
        return node  # JSON scalars: str, int, float, bool, None
    ref = [k for k in node if k.startswith("$")]
    if not ref:
        return {k: _from_tree(v, payloads, depth + 1) for k, v in node.items()}
    index = node.get(ref[0])
    if len(node) != 1 or ref[0] not in _REFS or not isinstance(index, int) or not 0 <= index < len(payloads):
        raise SnapshotError(f"snapshot state has a malformed reference {node!r}")
    data = bytes(payloads[index])
    return _read_npy(data) if ref[0] == "$npy" else data


def _read_npy(data: bytes) -> np.ndarray:
    """A .npy payload, its header checked against its length before numpy allocates anything."""
    f = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(f)
        if major not in (1, 2):
            raise SnapshotError(f".npy format version {major} is not one np.save writes for numbers")
        read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        if dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
            raise SnapshotError(f"snapshot array of dtype {dtype} is not numeric")
        if math.prod(shape) * dtype.itemsize != len(data) - f.tell():
            raise SnapshotError(f"snapshot array of shape {shape} does not fit its {len(data)}-byte payload")
        f.seek(0)
        return np.load(f, allow_pickle=False)
    except SnapshotError:
        raise
    except Exception as e:  # numpy's header parser raises various types on hostile bytes
        raise SnapshotError(f"snapshot array payload is not a .npy file: {e}") from e


# -- typed access for restore functions ------------------------------------------------------


def field(tree: Any, key: str, kind: type[T]) -> T:
    """``tree[key]``, which must be a ``kind``."""
    if not isinstance(tree, dict) or key not in tree:
        raise SnapshotError(f"snapshot state has no field {key!r}")
    value = tree[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise SnapshotError(f"snapshot field {key!r} is a {type(value).__name__}, not a {kind.__name__}")
    return value


def count(tree: Any, key: str) -> int:
    value = field(tree, key, int)
    if value < 0:
        raise SnapshotError(f"snapshot field {key!r} is negative")
    return value


def number(tree: Any, key: str) -> float:
    """A float field; JSON may write an integral one as an int."""
    value = tree.get(key) if isinstance(tree, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return field(tree, key, float)


def array(tree: Any, key: str, kinds: str, shape: tuple[int | None, ...]) -> np.ndarray:
    """An array field of a dtype kind in ``kinds`` and ``shape`` (None: any length on that axis)."""
    value = field(tree, key, np.ndarray)
    if value.dtype.kind not in kinds:
        raise SnapshotError(f"snapshot array {key!r} has dtype {value.dtype}")
    if value.ndim != len(shape) or any(s is not None and s != n for s, n in zip(shape, value.shape)):
        raise SnapshotError(f"snapshot array {key!r} has shape {value.shape}, not {shape}")
    return value
