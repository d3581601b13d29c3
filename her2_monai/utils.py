"""Small helpers shared across the package."""

from __future__ import annotations

__all__ = ["as_bool"]

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def as_bool(value: bool | str | int | None, name: str = "flag") -> bool:
    """Read a flag that may arrive from the command line as a string.

    ``python -m monai.bundle run ... --amp false`` passes the *string* ``"false"``, which Python would treat as true.

    Args:
        value: a bool, an int, ``None`` or one of ``true/false/yes/no/on/off/1/0`` (any case).
        name: the flag's name, for the error message.

    Returns:
        The boolean.

    Raises:
        ValueError: for any other string.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"{name} must be a boolean (true/false), got '{value}'")
    return bool(value)
