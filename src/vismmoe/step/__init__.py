"""The step layer: computing one decode step (and the prefill's experts) on the device.

`decode` runs generation over one batch's `DecodeState`; `fast_step` and `graphs` are the fast decode step
(books on the engine's side; static KV, compiled layers and CUDA graphs on the model's side); `moe_kernel` the
Triton kernels over the address table; `grouped` the eager path's grouped matmul over the slot pool.
"""
