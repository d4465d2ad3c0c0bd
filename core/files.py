"""Reading the pack's saved files (inversions, P3S adapters, LPIPS weights): one place that turns a damaged or
foreign file into an error naming the input it came from."""
from __future__ import annotations

import os


def read_safetensors(path, input_name: str, error: type[Exception] = ValueError) -> tuple[dict, dict]:
    """(metadata, tensors) of a .safetensors file. A file cut short, or not a safetensors file at all, raises
    `error` naming `input_name` and the file, instead of the library's bare header error."""
    from safetensors import safe_open
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise error(f"{input_name}: '{name}' does not exist ({path})")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {}), {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:   # SafetensorError for a truncated header, OSError, ...
        raise error(f"{input_name}: '{name}' is damaged or not a .safetensors file (it cannot be read: {e}); "
                    f"save or copy it again") from None
