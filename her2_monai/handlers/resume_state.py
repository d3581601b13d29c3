"""What a resume checkpoint holds besides networks and optimizers: random states, and frozen parts by reference.

* :class:`RandomStates` saves the random number generators an epoch draws from (PyTorch, NumPy, Python and every
  MONAI ``Randomizable`` transform of the training data), so a run killed after epoch *k* and resumed draws the same
  shuffles, crops, flips and dropouts as a run that was never interrupted, and ends with the same weights.
* :class:`FrozenByReference` stores the frozen sub-networks of stage 2 (the CM-GAN and the branch selector, loaded
  from ``cmgan.pt`` and ``selector.pt``) as a path and a SHA-256 of their weights instead of a copy of them, and checks
  on resume that those files still hold the weights the checkpoint was written with.

Both are plain objects with ``state_dict``/``load_state_dict``: list them in a stage's ``checkpoint_objects``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Randomizable
from torch import nn

from her2_monai.fileio import ChecksumMismatchError, verify_checksum

__all__ = ["RandomStates", "FrozenByReference", "REFERENCES_KEY", "state_digest"]

logger = logging.getLogger(__name__)

#: Key of the references in the network's entry of a resume checkpoint.
REFERENCES_KEY = "__frozen_by_reference__"


def _numpy_state_to_plain(state: tuple) -> dict[str, Any]:
    """A NumPy ``RandomState.get_state()`` tuple as tensors and numbers (``torch.load(weights_only=True)`` reads it)."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": str(name),
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _numpy_state_from_plain(state: Mapping[str, Any]) -> tuple:
    keys = np.asarray(torch.as_tensor(state["keys"]).numpy(), dtype=np.uint32)
    return (state["name"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))


def _children(obj: Any) -> Iterator[Any]:
    """Where random transforms can hide: list items, mapping values, and a loader's dataset / a dataset's transforms."""
    if isinstance(obj, (list, tuple)):
        yield from obj
    elif isinstance(obj, Mapping):
        yield from obj.values()
    else:
        for attribute in ("dataset", "transform", "transforms"):
            child = getattr(obj, attribute, None)
            if child is not None:
                yield child


class RandomStates:
    """The random states a training epoch draws from, as a checkpointable object.

    Saved: PyTorch's CPU generator (and every CUDA generator when CUDA is used), NumPy's and Python's global
    generators, and the ``R`` generator of every MONAI ``Randomizable`` transform reachable from ``sources`` (data
    loaders, datasets, ``Compose`` chains), in a fixed order. Loading restores them all, so the epochs after a resume
    see exactly the random draws an uninterrupted run would have seen. Data-loader workers are seeded from PyTorch's
    generator each epoch, so they follow too.

    Args:
        sources: objects whose transforms draw random numbers (e.g. the training dataset).
    """

    def __init__(self, sources: Sequence[Any] = ()) -> None:
        self.sources = list(sources)

    def transforms(self) -> list[Randomizable]:
        """The ``Randomizable`` transforms reachable from ``sources``, depth first, each once."""
        found: list[Randomizable] = []
        seen: set[int] = set()
        stack = list(reversed(self.sources))
        while stack:
            obj = stack.pop()
            if id(obj) in seen or isinstance(obj, (str, bytes, torch.Tensor, np.ndarray)):
                continue
            seen.add(id(obj))
            if isinstance(obj, Randomizable):
                found.append(obj)
            stack.extend(reversed(list(_children(obj))))
        return found

    def state_dict(self) -> dict[str, Any]:
        """The current states (tensors, lists and numbers only)."""
        python_version, python_state, gauss = random.getstate()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_plain(np.random.get_state()),
            "python": {"version": python_version, "state": list(python_state), "gauss": gauss},
            "transforms": [_numpy_state_to_plain(t.R.get_state()) for t in self.transforms()],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the states saved by :meth:`state_dict`.

        Raises:
            ValueError: if the number of random transforms differs from the saved one (another pipeline).
        """
        transforms = self.transforms()
        saved = list(state.get("transforms", []))
        if len(saved) != len(transforms):
            raise ValueError(
                f"the checkpoint holds the random states of {len(saved)} transforms, this pipeline has "
                f"{len(transforms)}: it was written by another configuration"
            )
        torch.set_rng_state(torch.as_tensor(state["torch"], dtype=torch.uint8))
        np.random.set_state(_numpy_state_from_plain(state["numpy"]))
        python = state["python"]
        random.setstate((python["version"], tuple(python["state"]), python["gauss"]))
        for transform, transform_state in zip(transforms, saved):
            transform.R.set_state(_numpy_state_from_plain(transform_state))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def _unwrap(network: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` or ``DataParallel`` wrapper."""
    return network.module if isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else network


def _read_state(path: Path) -> dict[str, Any]:
    return dict(torch.load(path, map_location="cpu", weights_only=True))


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a state dict's content (keys, tensor dtypes, shapes and bytes, records), whatever file holds it."""
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{tensor.dtype}{tuple(value.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes())
        else:
            digest.update(json.dumps(value, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
    return a == b


class FrozenByReference:
    """A network's checkpoint entry that refers to the files its frozen sub-networks came from instead of copying them.

    On save, the weights of each sub-network named in ``files`` are left out when they are identical to the file
    they were loaded from (``cmgan.pt``, ``selector.pt``); the entry records that file's path and the SHA-256 of its
    weights (:func:`state_digest`) under :data:`REFERENCES_KEY`. A sub-network that differs from its file (e.g. a
    CM-GAN trained on in stage 2) is kept by copy, with a warning. On load, each referenced file must still hold
    weights with the recorded SHA-256 (rewriting the same weights is fine, other weights are refused); they are put
    back and the complete state dict is loaded strictly. Deployable weights (``model.pt``) are written from the
    network itself and always hold everything.

    Args:
        network: the network (possibly wrapped in DDP).
        files: sub-network attribute name -> the weights file it is loaded from, e.g.
            ``{"cmgan": "models/cmgan.pt", "selector": "models/selector.pt"}``. Names the network does not have
            (no CM-GAN with feature substitution) are ignored.
    """

    def __init__(self, network: nn.Module, files: Mapping[str, str | os.PathLike]) -> None:
        self.network = network
        self.files = {name: Path(path) for name, path in files.items()}
        self._cache: dict[str, tuple[tuple[int, int], str, dict[str, Any]]] = {}
        self._warned: set[str] = set()

    def _file_state(self, name: str) -> tuple[str, dict[str, Any]]:
        """Content digest and state dict of a referenced file (cached while the file is unchanged)."""
        path = self.files[name]
        stat = path.stat()
        key = (stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(name)
        if cached is None or cached[0] != key:
            verify_checksum(path)
            saved = _read_state(path)
            cached = (key, state_digest(saved), saved)
            self._cache[name] = cached
        return cached[1], cached[2]

    def _keep_copy(self, name: str, reason: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            logger.warning("resume checkpoint keeps a copy of '%s': %s", name, reason)

    def state_dict(self) -> dict[str, Any]:
        """The network's state dict with the unchanged frozen parts replaced by references."""
        state = _unwrap(self.network).state_dict()
        references = {}
        for name, path in self.files.items():
            prefix = f"{name}."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if not part:
                continue
            if not path.is_file():
                self._keep_copy(name, f"{path} does not exist")
                continue
            digest, saved = self._file_state(name)
            if set(saved) != set(part) or not all(_same(part[k], saved[k]) for k in part):
                self._keep_copy(name, f"its weights differ from {path}")
                continue
            for key in part:
                del state[prefix + key]
            references[name] = {"path": str(path), "sha256": digest}
        if references:
            state[REFERENCES_KEY] = references
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load a state dict written by :meth:`state_dict`, reading the referenced files.

        Raises:
            FileNotFoundError: if a referenced file is missing.
            her2_monai.fileio.ChecksumMismatchError: if a referenced file changed since the checkpoint was written.
            KeyError: if the checkpoint refers to a sub-network this object has no file for.
        """
        state = dict(state)
        references = state.pop(REFERENCES_KEY, {}) or {}
        for name, reference in references.items():
            if name not in self.files:
                raise KeyError(f"the checkpoint refers to '{name}' ({reference.get('path')}), which has no file here")
            path = self.files[name]
            if not path.is_file():
                raise FileNotFoundError(
                    f"the resume checkpoint needs '{path}' (its '{name}' weights were stored by reference), which "
                    "does not exist: restore it, or start the stage again without --resume"
                )
            digest, saved = self._file_state(name)
            if digest != reference.get("sha256"):
                raise ChecksumMismatchError(
                    f"'{path}' holds other weights than when the resume checkpoint was written (SHA-256 "
                    f"{digest[:16]}... now, {str(reference.get('sha256'))[:16]}... then): the checkpoint cannot resume "
                    f"with other '{name}' weights; restore that file, or start the stage again without --resume"
                )
            state.update({f"{name}.{k}": v for k, v in saved.items()})
        _unwrap(self.network).load_state_dict(state)
