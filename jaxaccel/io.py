"""Files jaxaccel writes: strict JSON (RFC 8259) and atomic replacement.

One policy for every JSON file and JSON line the project writes (`config.json`,
`results.json`, `metrics.jsonl`, `sweep.json`, point files, reports, benchmark JSON, the
record inside a compressed package): non-finite floats become `null` (JSON has no NaN or
Infinity), numpy/jax scalars become Python numbers, tuples become lists. `dumps` refuses
anything else that is not plain JSON, so a strict parser (any language) reads every file.
Whole files are written to a temporary name and renamed into place, so a reader (or a
resumed run) never sees half a file.

Imports nothing from jaxaccel: every other module may use it.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any


def to_jsonable(x: Any) -> Any:
    """`x` as plain JSON values: dict (str keys), list, str, int, float (finite), bool, None."""
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return int(x)
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict) or hasattr(x, "items") and callable(x.items):  # ConfigDicts too
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy / jax scalars and arrays
        return to_jsonable(x.tolist())
    raise TypeError(f"cannot write {type(x).__name__} {x!r} as JSON")


def dumps(obj: Any, *, indent: int | None = 2, sort_keys: bool = True) -> str:
    """Strict JSON text of `obj` (see the module docstring for the policy)."""
    return json.dumps(to_jsonable(obj), indent=indent, sort_keys=sort_keys, allow_nan=False)


def loads(text: str) -> Any:
    """Parse JSON strictly: `NaN`, `Infinity` and `-Infinity` are errors, as in RFC 8259."""
    return json.loads(text, parse_constant=_reject_constant)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (plus a final newline) to `path` atomically, creating parent dirs."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True) -> None:
    """Write `obj` as indented strict JSON to `path` atomically."""
    write_text(path, dumps(obj, sort_keys=sort_keys))


def read_json(path: str | os.PathLike, *, lenient: bool = False) -> Any:
    """The strict JSON content of `path`. `lenient`: also read files written before this
    policy (a `NaN` or `Infinity` there comes back as None, as the writer would put it)."""
    with open(path) as f:
        text = f.read()
    return to_jsonable(json.loads(text)) if lenient else loads(text)
