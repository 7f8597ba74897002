"""Pickle-free storage of nested training state: tensors in safetensors, the rest in JSON.

Optimizer, scheduler and RNG states are nested dicts / lists / tuples of tensors, numbers,
strings and numpy arrays. :func:`save_state` writes ``<name>.safetensors`` (every tensor,
under a generated key) and ``<name>.json`` (the structure, with ``{"__tensor__": key}`` where
a tensor was). Loading parses JSON and safetensors only, so a planted file can corrupt a
value but can never run code (unlike ``torch.load`` of a pickle).

Encoded forms (only these are accepted when reading back)::

    tensor          {"__tensor__": "t12"}
    numpy array     {"__ndarray__": [...], "dtype": "uint32"}
    tuple           {"__tuple__": [...]}
    dict whose keys are not all strings (e.g. optimizer state keyed by parameter index)
                    {"__items__": [[key, value], ...]}
    str / int / float (NaN, inf kept) / bool / None, list, dict with string keys: as is
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

_MARKERS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class StateFormatError(ValueError):
    """A state file that does not decode (corrupt, truncated, or not written by posttrain)."""


def _encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _MARKERS for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint state")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise StateFormatError(f"the state refers to tensor {key!r}, which the .safetensors file lacks")
            return tensors[key]
        if "__ndarray__" in obj:
            try:
                return np.asarray(obj["__ndarray__"], dtype=np.dtype(str(obj.get("dtype"))))
            except (TypeError, ValueError) as e:
                raise StateFormatError(f"bad array in state: {e}") from None
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__items__" in obj:
            items = obj["__items__"]
            if not isinstance(items, list) or not all(isinstance(i, list) and len(i) == 2 for i in items):
                raise StateFormatError("bad mapping in state")
            return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in items}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def _hashable(key: Any) -> Any:
    if isinstance(key, (list, dict, torch.Tensor, np.ndarray)):
        raise StateFormatError("a mapping key in the state is not a plain value")
    return key


def save_state(obj: Any, directory: Path, name: str) -> list[Path]:
    """Write ``obj`` as ``directory/name.json`` + ``directory/name.safetensors``; returns both paths."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    directory = Path(directory)
    st_path, js_path = directory / f"{name}.safetensors", directory / f"{name}.json"
    save_file(tensors, str(st_path))
    js_path.write_text(json.dumps(tree) + "\n")
    return [js_path, st_path]


def load_state(directory: Path, name: str) -> Any:
    """Read back what :func:`save_state` wrote; ``StateFormatError`` if it does not decode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    try:
        tree = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateFormatError(f"{name}.json is not valid JSON ({e})") from None
    try:
        tensors = load_file(str(directory / f"{name}.safetensors"))
    except Exception as e:  # safetensors raises SafetensorError (and OSError) for bad files
        raise StateFormatError(f"{name}.safetensors cannot be read ({type(e).__name__}: {e})") from None
    return _decode(tree, tensors)
