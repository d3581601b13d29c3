"""Networks that carry their own architecture: the constructor arguments travel inside the state dict.

A network using :class:`RecordedNetwork` stores ``{"class", "arguments", "metadata", "version"}`` as its PyTorch
*extra state* (the ``_extra_state`` entry of ``state_dict()``, a plain dict that ``torch.load(..., weights_only=True)``
reads). So every file written from its state dict -- ``models/model.pt``, ``cmgan.pt``, ``selector.pt`` and the
resume checkpoints, whether by this project's handlers or by MONAI's and ignite's -- says how to rebuild the network,
and loading weights into a network built differently fails with a message that names the differing arguments
instead of a wall of missing keys. ``metadata`` holds facts about the training run that are not architecture (the
profile, the input image size, what it was trained on) for the tools that build the network from the file.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from her2_monai import __version__

__all__ = ["ArchitectureMismatchError", "RecordedNetwork", "plain"]


class ArchitectureMismatchError(ValueError):
    """Saved weights were made by a network with other constructor arguments (or of another class)."""


def plain(value: Any) -> Any:
    """``value`` as JSON-like Python data (tuples become lists), so records compare and serialise the same way."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class RecordedNetwork:
    """Mixin for ``nn.Module`` subclasses whose state dict records their architecture (see the module docstring).

    A subclass calls :meth:`record_architecture` at the end of ``__init__`` with the arguments that determine its
    weights' shapes and meaning (not run-time settings such as a pretrained-weights path or freezing).
    """

    _architecture: dict[str, Any]
    metadata: dict[str, Any]

    def record_architecture(self, metadata: Mapping[str, Any] | None = None, **arguments: Any) -> None:
        """Remember the constructor arguments (and free-form metadata) that :meth:`get_extra_state` saves.

        Args:
            metadata: facts about the training run (profile, image size, ...), saved alongside.
            arguments: keyword arguments that rebuild an identical network with ``type(self)(**arguments)``.
        """
        self._architecture = plain(arguments)
        self.metadata = plain(dict(metadata or {}))

    @property
    def architecture(self) -> dict[str, Any]:
        """The recorded constructor arguments (a copy)."""
        return dict(self._architecture)

    def get_extra_state(self) -> dict[str, Any]:
        """The record saved under ``_extra_state`` in the state dict."""
        return {
            "class": type(self).__name__,
            "arguments": dict(self._architecture),
            "metadata": dict(self.metadata),
            "version": __version__,
        }

    def set_extra_state(self, state: Any) -> None:
        """Check a loaded record against this network and adopt its metadata.

        Args:
            state: the ``_extra_state`` entry of a state dict.

        Raises:
            ArchitectureMismatchError: if the record is not a record, names another class, or holds other arguments.
        """
        if not isinstance(state, Mapping) or "arguments" not in state:
            raise ArchitectureMismatchError(
                f"the weights carry no architecture record for {type(self).__name__} (got {type(state).__name__}); "
                "they were written by another program or an older version"
            )
        if state.get("class") != type(self).__name__:
            raise ArchitectureMismatchError(
                f"the weights are those of a {state.get('class')}, not of a {type(self).__name__}"
            )
        saved = plain(state["arguments"])
        # An argument added after the file was written is read as its default (the behaviour the file was made with).
        defaults = {
            name: plain(p.default)
            for name, p in inspect.signature(type(self).__init__).parameters.items()
            if p.default is not inspect.Parameter.empty
        }
        saved = {**{k: v for k, v in defaults.items() if k in self._architecture and k not in saved}, **saved}
        differences = [
            f"{key}={saved.get(key)!r} in the file, {self._architecture.get(key)!r} here"
            for key in sorted(set(saved) | set(self._architecture))
            if saved.get(key) != self._architecture.get(key)
        ]
        if differences:
            raise ArchitectureMismatchError(
                f"the weights were trained with another {type(self).__name__} architecture: " + "; ".join(differences)
            )
        self.metadata = plain(dict(state.get("metadata") or {}))
