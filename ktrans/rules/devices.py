"""Device names in rules, and the device map that re-targets them (e.g. every GPU -> cpu in CI).

Rules may name "cpu", "cuda" (= "cuda:0") or "cuda:N". A device map rewrites those names after
the rules are matched, so a rule file written for two GPUs can be planned and applied on a
machine without one: `{"cuda": "cpu"}` maps every CUDA device, `{"cuda:1": "cuda:0"}` one.
"""

from __future__ import annotations

import re

from ktrans.errors import KtransError

_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")
DEVICE_FORMS = '"cpu", "cuda" or "cuda:N"'


def normalize_device(value, where: str = "") -> str:
    """"cpu" | "cuda:N" for a device name written in a rule or on the command line."""
    text = str(value).strip().lower() if isinstance(value, str) else None
    m = _DEVICE_RE.match(text) if text else None
    if m is None or (m.group(1) == "cpu" and m.group(2) is not None):
        prefix = f"{where}: " if where else ""
        raise KtransError(f"{prefix}invalid device {value!r}; expected {DEVICE_FORMS}")
    if m.group(1) == "cpu":
        return "cpu"
    return f"cuda:{int(m.group(2) or 0)}"


def parse_device_map(device_map, where: str = "device map") -> dict[str, str]:
    """Validated device map. Keys: "cuda" (every CUDA device), "cuda:N" or "cpu"; a plain
    string is shorthand for {"cuda": that device} (`--device cpu`)."""
    if device_map is None:
        return {}
    if isinstance(device_map, str):
        device_map = {"cuda": device_map}
    if not isinstance(device_map, dict):
        raise KtransError(f"{where}: expected a mapping of device -> device, got {type(device_map).__name__}")
    out: dict[str, str] = {}
    for src, dst in device_map.items():
        key = "cuda" if str(src).strip().lower() == "cuda" else normalize_device(src, where)
        out[key] = normalize_device(dst, where)
    return out


def map_device(device: str, device_map: dict[str, str]) -> str:
    """`device` after the map: an exact entry wins over the "cuda" wildcard."""
    if device in device_map:
        return device_map[device]
    if device.startswith("cuda") and "cuda" in device_map:
        return device_map["cuda"]
    return device


def parse_map_flags(items: list[str] | None) -> dict[str, str]:
    """`--map-device SRC=DST` flags (repeatable) as a device map."""
    out: dict[str, str] = {}
    for item in items or []:
        if item.count("=") != 1:
            raise KtransError(f"--map-device '{item}': expected SRC=DST, e.g. cuda:1=cpu")
        src, dst = item.split("=")
        out.update(parse_device_map({src: dst}, where=f"--map-device '{item}'"))
    return out
