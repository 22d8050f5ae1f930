"""The engine layer: a loaded model and its requests.

`core` holds the `Engine` (loading, budget sizing, generation); `request` and `sampling` a request's inputs,
stopping, sampling and streaming; `inputs` image checks; `compress` the visual-token compressors (pruning);
`weights_check` NaN/Inf checks at load. `Engine`, `Generation` and `load` are imported on first use, so that
importing a light module of this package does not import transformers.
"""


def __getattr__(name: str):
    if name in ("Engine", "Generation", "load"):
        from . import core
        return getattr(core, name)
    raise AttributeError(f"module 'vismmoe.engine' has no attribute {name!r}")
