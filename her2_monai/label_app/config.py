"""The app's settings, read from MONAI Label's ``--conf key value`` pairs.

==================  =======================================================================================
key                 meaning (default)
==================  =======================================================================================
``bundle_path``     the bundle folder: ``configs/`` and ``models/`` (the repository's ``bundle/``)
``overrides``       JSON object of bundle-config overrides used for inference and training, e.g.
                    ``'{"batch_size": 4}'``; none is needed for the architecture (``model.pt`` records it)
``refer_threshold`` confidence below which ``refer`` is true (the bundle's ``refer_threshold``)
``device``          ``cpu``, ``cuda`` or ``cuda:N`` (the bundle's choice: CUDA when available)
``max_upload_mb``   largest upload in MB (64)
``max_pixels``      largest patch in pixels (8192 * 8192)
``preload``         load the model at start-up instead of on the first request (``true``)
``zoo_source``      accepted for compatibility and ignored: this app never contacts a model zoo
==================  =======================================================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from her2_monai.label_app.uploads import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from her2_monai.utils import as_bool

__all__ = ["AppConfig", "ConfigError", "default_bundle_path"]

_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")
_KNOWN = {
    "bundle_path",
    "overrides",
    "refer_threshold",
    "device",
    "max_upload_mb",
    "max_pixels",
    "preload",
    "zoo_source",
}
#: Keys MONAI Label itself may put into the app conf.
_MONAI_LABEL_KEYS = {"server_mode", "models", "skip_trainers", "skip_strategies", "skip_scoring"}


class ConfigError(ValueError):
    """A ``--conf`` value is invalid; the message names the key."""


def default_bundle_path() -> Path:
    """The repository's ``bundle/`` folder (an editable install or a source checkout)."""
    return Path(__file__).resolve().parents[2] / "bundle"


def _reject_expressions(value: Any, where: str) -> None:
    """Bundle configs evaluate strings starting with ``$`` (Python) and ``@``/``%`` (references); refuse them."""
    if isinstance(value, str) and value[:1] in ("$", "@", "%"):
        raise ConfigError(f"{where}: config expressions ('$...', '@...', '%...') are not accepted here, got {value!r}")
    if isinstance(value, Mapping):
        for k, v in value.items():
            _reject_expressions(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _reject_expressions(v, f"{where}[{i}]")


@dataclass(frozen=True)
class AppConfig:
    """Validated app settings (see the module docstring)."""

    bundle_path: Path
    overrides: dict[str, Any] = field(default_factory=dict)
    refer_threshold: float | None = None
    device: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    preload: bool = True

    @classmethod
    def from_conf(cls, conf: Mapping[str, str] | None, base_dir: str | Path | None = None) -> AppConfig:
        """Read and check MONAI Label's ``conf`` mapping.

        Args:
            conf: ``--conf`` pairs (all values are strings).
            base_dir: folder that a relative ``bundle_path`` is resolved against (default: the current folder).

        Returns:
            The settings.

        Raises:
            ConfigError: naming the key, for an unknown key, a bad value or a bundle folder without ``models/`` and
                ``configs/``.
        """
        conf = dict(conf or {})
        unknown = sorted(set(conf) - _KNOWN - _MONAI_LABEL_KEYS)
        if unknown:
            raise ConfigError(f"unknown --conf key(s) {unknown}; known: {sorted(_KNOWN)}")
        raw_path = conf.get("bundle_path")
        bundle = Path(raw_path).expanduser() if raw_path else default_bundle_path()
        if not bundle.is_absolute():
            bundle = Path(base_dir or Path.cwd()) / bundle
        bundle = bundle.resolve()
        if not (bundle / "configs" / "inference.json").is_file():
            raise ConfigError(
                f"--conf bundle_path: '{bundle}' is not a bundle folder (no configs/inference.json); give the folder "
                "that holds configs/ and models/, e.g. --conf bundle_path bundle"
            )
        overrides: dict[str, Any] = {}
        if conf.get("overrides"):
            try:
                overrides = json.loads(conf["overrides"])
            except json.JSONDecodeError as err:
                raise ConfigError(f"--conf overrides must be a JSON object: {err}") from None
            if not isinstance(overrides, dict):
                raise ConfigError("--conf overrides must be a JSON object, e.g. '{\"batch_size\": 4}'")
            _reject_expressions(overrides, "--conf overrides")
            reserved = sorted({"bundle_root", "device", "refer_threshold"} & set(overrides))
            if reserved:
                raise ConfigError(f"--conf overrides must not set {reserved}; use the --conf keys of the same name")
        threshold = None
        if conf.get("refer_threshold") not in (None, ""):
            try:
                threshold = float(conf["refer_threshold"])
            except ValueError:
                raise ConfigError(f"--conf refer_threshold must be a number, got {conf['refer_threshold']!r}") from None
            if not 0.0 <= threshold <= 1.0:
                raise ConfigError(f"--conf refer_threshold must be in [0, 1], got {threshold}")
        device = conf.get("device") or None
        if device is not None and not _DEVICE.match(device):
            raise ConfigError(f"--conf device must be cpu, cuda or cuda:N, got {device!r}")
        return cls(
            bundle_path=bundle,
            overrides=overrides,
            refer_threshold=threshold,
            device=device,
            max_upload_bytes=_positive_int(conf, "max_upload_mb", DEFAULT_MAX_BYTES // (1024 * 1024)) * 1024 * 1024,
            max_pixels=_positive_int(conf, "max_pixels", DEFAULT_MAX_PIXELS),
            preload=as_bool(conf.get("preload", "true"), "--conf preload"),
        )

    def predictor_overrides(self) -> dict[str, Any]:
        """Keyword overrides for :func:`her2_monai.inference.load_predictor` (device as a config expression)."""
        out = dict(self.overrides)
        if self.refer_threshold is not None:
            out["refer_threshold"] = self.refer_threshold
        if self.device is not None:  # validated against _DEVICE above, so the expression is a constant
            out["device"] = f"$torch.device('{self.device}')"
        return out


def _positive_int(conf: Mapping[str, str], key: str, default: int) -> int:
    value = conf.get(key)
    if value in (None, ""):
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"--conf {key} must be a positive integer, got {value!r}") from None
    if number < 1:
        raise ConfigError(f"--conf {key} must be a positive integer, got {number}")
    return number
