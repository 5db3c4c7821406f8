"""Checkpoints: one safetensors file, written atomically, read without ever unpickling.

A checkpoint holds a *state tree*: nested dicts, lists and tuples whose leaves are tensors or
JSON values, such as ::

    {"config": policy.config, "policy": policy.state_dict(), "optimizer": opt.state_dict(),
     "scheduler": sched.state_dict(), "rng": rng_state(), "epoch": 3}

Tensors are stored bit for bit in the safetensors body, named by their path in the tree
(``optimizer/state/0/exp_avg``); everything else (an optimizer's step sizes and betas, a
config) goes to the header as JSON, with a format tag, the checkpoint's kind, the format
version and a SHA-256 of the contents. Loading returns the same tree (integer dict keys and
tuples included), so ``module.load_state_dict`` and ``optimizer.load_state_dict`` take its
parts as they are and a resumed run continues exactly. A file is written to a temporary file
beside the target, synced and renamed over it: a crash never leaves a half-written checkpoint
and never destroys the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

__all__ = [
    "FORMAT",
    "VERSION",
    "CheckpointError",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

FORMAT = "adasmooth-checkpoint"
VERSION = 1

# JSON stand-ins for what JSON lacks: a tensor (by name), a tuple, a dict with non-str keys.
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_TAGS = (_TENSOR, _TUPLE, _ITEMS)
_SCALARS = (type(None), bool, int, float, str)


class CheckpointError(ValueError):
    """The file is not a sound adasmooth checkpoint of the expected kind."""


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], kind: str) -> None:
    """Write ``state`` (see the module docstring) to ``path`` atomically, tagged with ``kind``.

    ``kind`` names what the file holds (``"policy"``, ``"base-model"``, ``"trainer"``, ...) so
    that :func:`load_checkpoint` can refuse a checkpoint of another kind. Values that are
    neither tensors nor JSON scalars, lists, tuples or dicts raise ``TypeError`` before any
    file is touched. Missing parent folders are created.
    """
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"kind must be a non-empty string, got {kind!r}")
    if not isinstance(state, Mapping):
        raise TypeError(f"a checkpoint's state must be a dict, got {type(state).__name__}")
    tensors: dict[str, Tensor] = {}
    tree = json.dumps(_encode(state, "", tensors))
    header = {
        "format": FORMAT,
        "version": str(VERSION),
        "kind": kind,
        "state": tree,
        "sha256": _digest(tree, tensors),
    }
    _write_atomically(os.fspath(path), safetensors_bytes(tensors, metadata=header))


def load_checkpoint(
    path: str | os.PathLike,
    expected_kind: str | None = None,
    required: Iterable[str] = (),
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """The state tree saved at ``path``, its tensors on ``device``.

    Raises ``FileNotFoundError`` for a missing file and :class:`CheckpointError` for anything
    that is not an intact adasmooth checkpoint: a ``torch.save`` pickle or other foreign file,
    a truncated or modified one, one of a newer format version, one whose kind is not
    ``expected_kind`` (when given) or that lacks a top-level entry named in ``required``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt", device=str(device)) as file:
            header = file.metadata() or {}
            kind = _check_header(path, header, expected_kind)
            tensors = {name: file.get_tensor(name) for name in file.keys()}
    except SafetensorError as err:
        raise CheckpointError(_not_safetensors(path, err)) from err
    if _digest(header["state"], tensors) != header["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its contents do not match their checksum")
    used: set[str] = set()
    try:
        state = _decode(json.loads(header["state"]), tensors, used)
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path} is corrupt: its state cannot be decoded ({err})") from err
    if set(tensors) != used:
        raise CheckpointError(f"{path} is corrupt: it holds tensors its state does not name")
    missing = [key for key in required if key not in state]
    if missing:
        raise CheckpointError(
            f"{path} ({kind}) lacks {', '.join(map(repr, missing))}; "
            f"it holds {', '.join(map(repr, state)) or 'nothing'}"
        )
    return state


def rng_state() -> dict[str, Any]:
    """The random states a resumed run restores to continue exactly: torch (CPU, CUDA), Python."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# The state tree <-> JSON with tensor names.


def _encode(value: Any, path: str, tensors: dict[str, Tensor]) -> Any:
    def child(key: Any) -> str:
        return f"{path}/{key}" if path else str(key)

    if isinstance(value, Tensor):
        if path in tensors:
            raise ValueError(f"two entries of the checkpoint share the name {path!r}")
        # A private contiguous CPU copy: safetensors refuses views and shared storage.
        tensors[path] = value.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
        return {_TENSOR: path}
    if isinstance(value, _SCALARS):
        return value
    if isinstance(value, tuple):
        return {_TUPLE: [_encode(v, child(i), tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, child(i), tensors) for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        if all(isinstance(key, str) and key not in _TAGS for key in value):
            return {key: _encode(v, child(key), tensors) for key, v in value.items()}
        for key in value:
            if not isinstance(key, _SCALARS):
                raise TypeError(f"cannot save the dict key {key!r} at {path!r}: not a JSON scalar")
        return {_ITEMS: [[key, _encode(v, child(key), tensors)] for key, v in value.items()]}
    raise TypeError(
        f"cannot save a {type(value).__name__} at {path!r}: a checkpoint holds tensors, "
        "None, bool, int, float, str, and lists, tuples and dicts of them"
    )


def _decode(value: Any, tensors: dict[str, Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        ((tag, inner),) = value.items()
        if tag == _TENSOR:
            used.add(inner)
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(_decode(v, tensors, used) for v in inner)
        return {key: _decode(v, tensors, used) for key, v in inner}
    return {key: _decode(v, tensors, used) for key, v in value.items()}


def _digest(tree: str, tensors: dict[str, Tensor]) -> str:
    sha = hashlib.sha256(tree.encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        sha.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return sha.hexdigest()


# ---------------------------------------------------------------------------------------------
# Files.


def _check_header(path: str, header: dict[str, str], expected_kind: str | None) -> str:
    if header.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is a safetensors file but not an adasmooth checkpoint "
            f"(its metadata lacks the {FORMAT!r} tag)"
        )
    for key in ("version", "kind", "state", "sha256"):
        if key not in header or (key == "version" and not header[key].isdigit()):
            raise CheckpointError(f"{path} is corrupt: its header lacks a valid {key!r}")
    version, kind = int(header["version"]), header["kind"]
    if version > VERSION:
        raise CheckpointError(
            f"{path} has format version {version}; this adasmooth reads versions up to {VERSION}"
        )
    if expected_kind is not None and kind != expected_kind:
        raise CheckpointError(f"{path} holds a {kind!r} checkpoint, expected {expected_kind!r}")
    return kind


def _not_safetensors(path: str, err: Exception) -> str:
    with open(path, "rb") as file:
        start = file.read(4)
    if start.startswith(b"PK\x03\x04") or start.startswith(b"\x80"):
        return (
            f"{path} is a pickle (torch.save output?), not a safetensors checkpoint; "
            "adasmooth never unpickles checkpoints, as unpickling can run code"
        )
    return f"{path} is corrupt or truncated, or not a safetensors file: {err}"


def _write_atomically(path: str, data: bytes) -> None:
    """Write to a temporary file in the target's folder, sync it, then rename it over ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 is not a new file's mode
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    folder_fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
