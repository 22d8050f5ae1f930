"""A bench script's result: written as JSON to `--out` (its folder made when missing) and printed on stdout as one
JSON line, the form the scripts' callers and docs/results/ read."""

from __future__ import annotations

import json
import os


def emit(res: dict, out: str | None) -> dict:
    """Write `res` to the JSON file `out` (None: no file) and print it as one line; returns `res`."""
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res))
    return res
