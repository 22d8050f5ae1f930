"""Quantized GGUF text models for `vismmoe export-gguf --type`: which tensors get which GGML type, Q8_0 written
with the `gguf` package's quantizer, Q4_K and Q4_K_M made by llama.cpp's own `llama-quantize`.

    --type q8_0     every weight matrix of the text model in Q8_0: blocks of 32 values along a row, one f16 scale d
                    = max|x| / 127 and 32 int8 (8.5 bits a value). Written directly by export_gguf.write_gguf with
                    `gguf.quants` (bit-exact with ggml's reference quantizer), one tensor at a time.
    --type q4_k     `llama-quantize --pure IN OUT Q4_K_S`: every weight matrix in Q4_K: super-blocks of 256 values
                    along a row (f16 scale and f16 min; 8 sub-blocks of 32, each with a 6-bit scale and 6-bit min;
                    4-bit values: 4.5 bits a value). Not llama-quantize's own type name "Q4_K", which is an alias of
                    its Q4_K_M.
    --type q4_k_m   `llama-quantize IN OUT Q4_K_M`: llama.cpp's mixture, what the Q4_K_M files people download are:
                    Q4_K, but attn_v of the layers i where use_more_bits(i) and every ffn_down tensor (the routed
                    experts' ffn_down_exps, GLM's ffn_down_shexp and dense ffn_down) of those layers in Q6_K
                    (super-blocks of 256, 6.56 bits a value); output.weight (token_embd when the two are tied) in
                    Q6_K. use_more_bits(i) = i < L/8 or i >= 7L/8 or (i - L/8) % 3 == 2 (integer
                    division), for L decoder layers. Models of exactly 8 experts get attn_v and attn_k in Q8_0 and
                    attn_output in Q5_K as well.

The gguf package (0.19) quantizes Q8_0 but has no Q4_K or Q6_K quantizer (it dequantizes them), hence llama-quantize
for the 4-bit types: export_gguf first writes the text model in --dtype (`<name>-<dtype>.gguf`, kept), then this
module runs llama-quantize on it. The binary is --llama-quantize PATH (the file, or a folder holding it), else
`$VISMMOE_LLAMA_CPP_BIN/llama-quantize` (the llama.cpp build's bin folder), else `llama-quantize` on PATH;
scripts/build_llama_cpp.sh builds it.

Which tensors are quantized is llama.cpp's rule (src/llama-quant.cpp, `tensor_allows_quantization`, at
export_gguf.LLAMA_CPP_COMMIT), which the q8_0 path applies too: tensors of two or three dimensions whose name ends
in "weight", except norms and routers (ffn_gate_inp). So token_embd, output, attn_{q,k,v,output},
ffn_{gate,up,down}_exps (the routed experts), and GLM's ffn_*_shexp and dense ffn_* are quantized; norms, biases,
routers and GLM's exp_probs_b stay f32 as export_gguf writes them. A quantized type packs whole blocks along a row
(the torch shape's last dimension, GGML's ne[0]); a tensor whose row length is not a multiple of its type's block
falls back as llama-quantize falls back: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0 (blocks of 32), and to F16
when the row is not a multiple of 32 either (Q8_0 included). The vision projector (mmproj) is never quantized:
it is written in --dtype (convolution kernels f32, or f16 in an f16 file).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections import Counter

import numpy as np
import torch

from ..errors import UserError

QUANT_TYPES = ("q8_0", "q4_k", "q4_k_m")
# --type -> llama-quantize arguments before IN OUT, and its type name after them
LLAMA_QUANTIZE = {"q4_k": (["--pure"], "Q4_K_S"), "q4_k_m": ([], "Q4_K_M")}
CHUNK = 1 << 22                   # float32 values quantized at a time (16 MiB, plus the quantizer's temporaries)


def _gguf():
    import gguf
    return gguf


def is_quantized(qtype) -> bool:
    """True for a block-quantized GGML type (Q8_0, Q4_K, ...), False for F32, F16, BF16."""
    Q = _gguf().GGMLQuantizationType
    return qtype not in (Q.F32, Q.F16, Q.BF16)


def weight_type(shape: tuple[int, ...], qtype):
    """The type a weight matrix of torch shape `shape` is written in when its file asks for `qtype`: `qtype`, or F16
    when a block-quantized `qtype`'s block does not divide the row length `shape[-1]` (llama-quantize's fallback for
    a 32-value block)."""
    g = _gguf()
    if is_quantized(qtype) and shape[-1] % g.GGML_QUANT_SIZES[qtype][0] != 0:
        return g.GGMLQuantizationType.F16
    return qtype


def nbytes(shape: tuple[int, ...], qtype) -> int:
    """Bytes of a tensor of torch shape `shape` in GGML type `qtype` (whole blocks along the last dimension)."""
    block, size = _gguf().GGML_QUANT_SIZES[qtype]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // block) * size


def quantize(t: torch.Tensor, qtype) -> np.ndarray:
    """`t` [..., n] as GGML blocks of `qtype` (n a multiple of the block): uint8 [rows, n / block x type size],
    quantized from float32 by `gguf.quants` in chunks of whole rows (about CHUNK values each), so a layer's expert
    bank never exists in float32 at once. NotImplementedError for a type the gguf package cannot quantize."""
    g = _gguf()
    n = t.shape[-1]
    rows = t.detach().reshape(-1, n)
    block, size = g.GGML_QUANT_SIZES[qtype]
    out = np.empty((rows.shape[0], n // block * size), dtype=np.uint8)
    step = max(1, CHUNK // n)
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = g.quants.quantize(rows[i:i + step].to(torch.float32).numpy(), qtype)
    return out


def find_llama_quantize(given: str | None) -> str:
    """The llama-quantize executable: `given` (the file, or a folder holding it), else
    `$VISMMOE_LLAMA_CPP_BIN/llama-quantize`, else `llama-quantize` on PATH. UserError when none is found."""
    how = ("the gguf package has no Q4_K quantizer; build llama.cpp with scripts/build_llama_cpp.sh and pass "
           "--llama-quantize BUILD/bin/llama-quantize (or set VISMMOE_LLAMA_CPP_BIN=BUILD/bin)")
    if given:
        exe = os.path.join(given, "llama-quantize") if os.path.isdir(given) else given
        if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
            raise UserError(f"--llama-quantize {given}: no llama-quantize executable there", how)
        return exe
    env = os.environ.get("VISMMOE_LLAMA_CPP_BIN")
    if env and os.access(os.path.join(env, "llama-quantize"), os.X_OK):
        return os.path.join(env, "llama-quantize")
    exe = shutil.which("llama-quantize")
    if exe is None:
        raise UserError("--type q4_k/q4_k_m needs llama.cpp's llama-quantize and none was found", how)
    return exe


def llama_quantize(exe: str, src: str, dst: str, quant: str) -> None:
    """Run `exe` on the GGUF file `src`, writing `dst` in `quant` (a LLAMA_QUANTIZE key). UserError with its last
    output line when it fails; a partly written `dst` is removed. `src` is never touched."""
    flags, name = LLAMA_QUANTIZE[quant]
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ValueError(f"llama-quantize would overwrite its input {src}")
    cmd = [exe, *flags, src, dst, name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    except OSError as e:
        raise UserError(f"cannot run {exe}: {e.strerror or e}", "pass a working --llama-quantize") from None
    if proc.returncode != 0:
        if os.path.exists(dst):
            os.remove(dst)
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        last = lines[-1][:300] if lines else "no output"
        raise UserError(f"llama-quantize exited {proc.returncode} on {src}: {last}",
                        "run it by hand for its whole output: " + " ".join(cmd))


def type_counts(path: str) -> dict[str, int]:
    """{GGML type name: tensor count} of the GGUF file at `path`."""
    reader = _gguf().GGUFReader(path)
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))
