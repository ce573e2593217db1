"""The sidecar JSON beside a model file (`read_sidecar`) and the check of every description field that a sidecar or an
option gives (`checked_field`, `as_size`, `as_labels`): each value gets the type its field needs, or a ModelError.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from medlens.errors import ModelError


def read_sidecar(path: Path) -> tuple[Optional[dict[str, Any]], Optional[Path]]:
    """The sidecar JSON beside a model file (`model.pt.json`, else `model.json`).

    Args:
        path: the model or weights file.

    Returns:
        (the JSON object, its path), or (None, None) when there is no sidecar.

    Raises:
        ModelError: the sidecar cannot be read or is not a JSON object.
    """
    for candidate in (path.with_name(path.name + ".json"), path.with_suffix(".json")):
        if candidate.is_file() and candidate != path:
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError) as exc:
                raise ModelError(f"{candidate}: the sidecar JSON cannot be read ({exc}); fix it or remove it.") from None
            if not isinstance(data, dict):
                raise ModelError(f"{candidate}: the sidecar JSON must be an object with InputSpec fields (labels, size, ...).")
            return data, candidate
    return None, None


def as_size(value: Any) -> Optional[tuple[int, ...]]:
    """An input size as (H, W) or (D, H, W).

    Args:
        value: None, one number, "H,W"/"HxW"/"D,H,W" text, or a sequence of 1 to 3 numbers.

    Returns:
        The size, or None for None.

    Raises:
        ModelError: the value is not one to three positive whole numbers.
    """
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    given = value
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    try:
        if isinstance(value, bool) or any(isinstance(v, bool) for v in value):
            raise ValueError
        size = tuple(int(str(v).strip()) for v in value)
    except (TypeError, ValueError):
        size = ()
    if len(size) == 1:
        size = (size[0], size[0])
    if len(size) not in (2, 3) or any(s <= 0 for s in size):
        raise ModelError(f"input size {given!r} must be one positive number, H,W or D,H,W (e.g. 224 or 224,224).")
    return size


def as_labels(value: Any) -> Optional[tuple[str, ...]]:
    """Class names from a list or one comma-separated string.

    Args:
        value: None, a string "a,b,c" or a sequence of names (numbers are turned into text).

    Returns:
        The names, or None when there are none.
    """
    if value is None:
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",")]
    labels = tuple(str(v) for v in value)
    return labels or None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def checked_field(key: str, value: Any, where: str) -> Any:
    """An InputSpec field from a sidecar or an option, with the type that field needs (labels normalised).

    Args:
        key: the InputSpec field.
        value: the value given.
        where: where it was given, for the message ("model.pt: the option").

    Returns:
        The value to use, or None when it says nothing (an empty label list).

    Raises:
        ModelError: the value has the wrong type for its field, naming where it came from.
    """
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    if key == "labels":
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(_is_number(v) or isinstance(v, str) for v in value)):
            return as_labels(value)
        expected = "a list of class names or one comma-separated string"
    elif key == "size":
        return value  # as_size says what is wrong with it
    elif key == "channels":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        expected = "a whole number (1 or 3)"
    elif key in ("mean", "std"):
        if _is_number(value) or (isinstance(value, (list, tuple)) and value and all(_is_number(v) for v in value)):
            return value
        expected = "a number or a list of numbers, one per channel"
    elif key == "multi_label":
        if isinstance(value, bool):
            return value
        expected = "true or false"
    elif key == "scale":
        if value in ("minmax", "uint8", "none"):
            return value
        expected = "'minmax', 'uint8' or 'none'"
    elif key == "extra":
        if isinstance(value, dict):
            return value
        expected = "an object"
    else:  # modality, notes, resample (InputSpec checks the mode)
        if isinstance(value, str):
            return value
        expected = "text"
    raise ModelError(f"{where} gives {key} = {shown}; {key} must be {expected}.")
