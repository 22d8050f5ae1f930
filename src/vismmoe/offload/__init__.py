"""The offload layer: where routed experts live and how they reach the device.

Host and disk tiers (`store`), the device slot pool (`cache`), copies (`transfer`), link profiles (`links`),
eviction policies (`policies`), lookahead predictors (`predict`) and prefetch (`prefetch`), the per-layer wave
plan (`schedule`), per-layer orchestration of the eager path (`runtime`) and routing traces (`trace`). Every part
deals in bytes and slots; what a blob's bytes mean is the expert format's (`vismmoe.formats`).
"""
