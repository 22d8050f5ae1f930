"""Expert formats: how a routed expert is stored, read and computed (see base.py for the seam).

    dense   weights in the activation dtype                         dense.py
    bf16    dense weights in bfloat16 for a float32 model (the CPU)  bf16.py
    fp8     e4m3, 128 x 128 block scales (Qwen's FP8 releases)      fp8.py
    int4    4-bit, group scales and zero points (compressed-tensors pack-quantized w4a16)   int4.py
How a checkpoint declares its quantization (`quantization_config`) and how its non-expert weights are read:
checkpoint.py. AutoAWQ's GEMM layout, read into (and written from) int4: awq.py.
"""

from .base import ExpertFormat, make_format, names, register
from .dense import DenseFormat
from .bf16 import Bf16Format
from .fp8 import Fp8Format
from .int4 import Int4Format

__all__ = ["ExpertFormat", "DenseFormat", "Bf16Format", "Fp8Format", "Int4Format", "make_format", "names", "register"]
