"""The native CPU decode step (`--decode native`): the fast step's books (step/fast_step.py) with the whole step body
(every decoder layer, the final norm, lm_head, argmax) in one call of decoder.c, on the host's cores.

    unsupported_reason(engine) -> str | None   why an engine's model cannot decode natively (None: it can)
    native_decoder(engine) -> NativeDecoder     one per model and expert format
    NativeDecoder.run(bucket, addr)             one step of a fast-step bucket (step/graphs.py `Bucket`) in one C
                                                call: its mask column, the rows' positions and rotary (the family
                                                adapter's, checked once: `_rotary_reason`), every layer over the
                                                bucket's KV cache with the experts read at `addr [moe layers, E]` (a
                                                cache slot or the host store's blob); routing, logits and the next
                                                token written where the graph body writes them
    TeamSize                                    how many threads a step asks for (torch's count, or one where that
                                                has been faster in this process)

Why: on the CPU a decode step of a small model is per-operator overhead, not arithmetic (the bundled model: about
18 ms a token through transformers' modules, for 19 MB of float32 weights). The C step is the same arithmetic as
transformers' eager forward in float32, in another summation order: numerically equivalent, not bit-exact
(tests/test_native_step.py states the tolerance). Lossless across budgets: a slot and the host store hold the same
bytes and the same code reads them, so every budget gives the tokens of every expert resident.

Supported: decoders of Qwen3-MoE layers (`qwen3_vl_moe`, `qwen3_moe`, `internvl` with a `qwen3_moe` text model):
RMSNorm, attention with per-head q/k RMSNorm and rotate-half rotary (M-RoPE reduces to it in decode, where a
token's three rope rows are equal), grouped-query heads, softmax top-k routers, SiLU-gated experts in any blob
format the expert kernel reads (dense float32/bf16, fp8, int4), dense MLP layers. Everything else is refused by
`unsupported_reason` with its cause. Float32 weights only (the CPU's default dtype).
"""

from __future__ import annotations

import collections
import ctypes
import os
import time

import numpy as np
import torch

from . import BF16, F32, SILU, SOURCE, VmLayout, _activation_of, activation, library, params
from . import failure as _failure

DECODER_SOURCE = os.path.join(os.path.dirname(SOURCE), "decoder.c")

# the transformers classes whose arithmetic decoder.c repeats (a subclass may change it: exact names only)
_LAYERS = {"Qwen3VLMoeTextDecoderLayer", "Qwen3MoeDecoderLayer"}
_ATTENTION = {"Qwen3VLMoeTextAttention", "Qwen3MoeAttention"}
_NORMS = {"Qwen3VLMoeTextRMSNorm", "Qwen3MoeRMSNorm"}
_ROUTERS = {"Qwen3VLMoeTextTopKRouter", "Qwen3MoeTopKRouter"}
_MOE_BLOCKS = {"Qwen3VLMoeTextSparseMoeBlock", "Qwen3MoeSparseMoeBlock"}
_MLPS = {"Qwen3VLMoeTextMLP", "Qwen3MoeMLP"}


class DecLayer(ctypes.Structure):
    """decoder.c's `vm_dec_layer`."""

    _fields_ = [(n, ctypes.c_void_p) for n in ("in_norm", "post_norm", "q_norm", "k_norm", "wq", "wk", "wv", "wo",
                                                "bq", "bk", "bv", "bo", "router", "w_gate", "w_up", "w_down",
                                                "kc", "vc")] + [("moe", ctypes.c_int32), ("inter", ctypes.c_int32)]


class DecModel(ctypes.Structure):
    """decoder.c's `vm_dec_model`."""

    _fields_ = [(n, ctypes.c_int32) for n in ("layers", "hidden", "heads", "kv_heads", "head_dim", "vocab",
                                              "experts", "top_k", "norm_topk", "act", "wfmt")] + \
               [("eps", ctypes.c_float), ("scaling", ctypes.c_float), ("rope_scale", ctypes.c_float),
                ("final_norm", ctypes.c_void_p), ("embed", ctypes.c_void_p), ("inv_freq", ctypes.c_void_p),
                ("lm_head", ctypes.c_void_p)]


class _Lib:
    """The loaded decoder library."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.vm_decode_scratch.restype = ctypes.c_int64
        lib.vm_decode_scratch.argtypes = [ctypes.POINTER(DecModel), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                          ctypes.c_int]
        lib.vm_decode.restype = ctypes.c_int
        lib.vm_decode.argtypes = [ctypes.POINTER(DecModel), ctypes.POINTER(DecLayer), ctypes.POINTER(VmLayout),
                                  ctypes.c_int, ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 5 + \
            [ctypes.c_int64] + [ctypes.c_void_p] * 6 + [ctypes.c_int]
        self.lib, self.path = lib, path


def decoder_library() -> _Lib | None:
    """This process's decoder library (built at first use, as the expert kernel is), or None: `failure()` says why."""
    return library(DECODER_SOURCE, _Lib)


def failure() -> str | None:
    """Why `decoder_library()` gave None."""
    return _failure(DECODER_SOURCE)


def _bf16_exact(w: torch.Tensor) -> bool:
    """Every value of float32 `w` is a bfloat16 (its low 16 bits are zero)."""
    return bool((w.detach().view(torch.int32) & 0xFFFF).eq(0).all())


def _name(m) -> str:
    return type(m).__name__


def _rotary_reason(fam, lm) -> str | None:
    """None when the family's decode positions and the decoder's rotary are what decoder.c computes: one rope
    position per row, its attended columns - 1 + its rope delta, and cos/sin = cos/sin(position * inv_freq) (both
    halves) * attention_scaling, checked against the module itself at two positions."""
    rot = lm.rotary_emb
    kind = str(getattr(rot, "rope_type", "default"))
    if "dynamic" in kind or "longrope" in kind or getattr(rot, "inv_freq", None) is None:
        return f"its rotary embedding ({kind}) changes with the sequence length"
    inv = rot.inv_freq.float()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, :2] = False                                     # a left-padded row
    deltas = torch.tensor([[3], [-1]])
    pos = fam.decode_positions(mask, deltas)
    want = (mask.long().sum(-1) - 1 + deltas[:, 0]).float()                      # [2]
    h = torch.zeros(2, 1, inv.numel() * 2)
    cos, sin = rot(h, fam.rotary_positions(pos))
    f = want[:, None] * inv[None]
    scale = float(getattr(rot, "attention_scaling", 1.0))
    ok = all(torch.allclose(got.reshape(2, -1).float(), torch.cat([ref, ref], -1) * scale, atol=1e-5, rtol=1e-5)
             for got, ref in ((cos, f.cos()), (sin, f.sin())))
    return None if ok else "its rotary embedding is not the rotate-half one the native step computes"


def _spec_reason(engine) -> str | None:
    """Why the model's decoder is not one decoder.c computes (None: it is)."""
    from ...families.base import Family
    fam, model = engine.family, engine.model
    if engine.device.type != "cpu":
        return "it runs on the CPU (use --decode fast on CUDA)"
    if engine.dtype != torch.float32:
        return f"it computes float32 weights, and this model is loaded in {str(engine.dtype).replace('torch.', '')}"
    if getattr(engine.store, "tier", "host") == "disk":
        return "the disk tier stages misses by re-running the step, which the native step does not do yet"
    if type(fam).decode_logits is not Family.decode_logits or type(fam).decode_masks is not Family.decode_masks:
        return f"{fam.model_type} changes the decode logits or masks (soft caps, sliding windows)"
    lm = fam.language_model(model)
    if type(fam).decode_inputs is not Family.decode_inputs or type(lm.embed_tokens) is not torch.nn.Embedding:
        return f"{fam.model_type} feeds its decode layers more than a token embedding and one rotary"
    if lm.embed_tokens.num_embeddings != model.lm_head.out_features:
        return "its token embedding and lm_head have different vocabularies"
    if _name(lm.norm) not in _NORMS:
        return f"its final norm ({_name(lm.norm)}) is not one the native step computes"
    norms = [lm.norm] + [m for layer in lm.layers for m in
                         (layer.input_layernorm, layer.post_attention_layernorm,
                          getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None))
                         if m is not None]
    if len({float(getattr(m, "variance_epsilon", -1.0)) for m in norms}) != 1:
        return "its RMSNorms do not share one epsilon"
    for i, layer in enumerate(lm.layers):
        att = layer.self_attn
        if _name(layer) not in _LAYERS or _name(att) not in _ATTENTION:
            return f"decoder layer {i} ({_name(layer)}) is not a Qwen3-MoE layer"
        if getattr(att, "sliding_window", None):
            return "sliding-window attention"
        for nm in ("input_layernorm", "post_attention_layernorm"):
            if _name(getattr(layer, nm)) not in _NORMS:
                return f"decoder layer {i}'s {nm} is not an RMSNorm the native step computes"
        mlp = layer.mlp
        if _name(mlp) in _MOE_BLOCKS:
            if _name(mlp.gate) not in _ROUTERS:
                return f"decoder layer {i}'s router ({_name(mlp.gate)}) is not a softmax top-k router"
            gate = getattr(mlp.experts, "_apply_gate", None)
            if gate is None or activation(gate) != SILU:
                return f"decoder layer {i}'s experts are not SiLU-gated"
        elif _name(mlp) in _MLPS:
            if _activation_of(getattr(mlp, "act_fn", None)) != SILU:
                return f"decoder layer {i}'s MLP is not SiLU-gated"
        else:
            return f"decoder layer {i}'s MLP ({_name(mlp)}) is not one the native step computes"
    if params(engine.layout) is None:
        return f"the native expert kernel does not read {engine.layout.spec()} experts in this dtype"
    return _rotary_reason(fam, lm)          # last: it runs the decoder's rotary, known now to be a Qwen3 one


def unsupported_reason(engine) -> str | None:
    """Why `--decode native` cannot run for `engine` (None: it can): the model, device, dtype or tier (above), or
    the library (no C compiler, a failed build)."""
    why = _spec_reason(engine)
    if why is None and decoder_library() is None:
        why = f"the native library cannot be built ({failure()})"
    return why


class TeamSize:
    """How many threads a native step asks for: torch's thread count, or one thread where that has been faster in
    this process (a machine whose other work takes a core makes a team wait at every barrier: 2-core machine, one
    core kept busy, 11 ms a step with two threads). Each choice is judged per batch size and per phase:

    - the first `early` steps after a pause between steps (a prefill, any torch work: a gap of PAUSE_S or more, and
      PAUSE_TIMES the median of the last 16 gaps between steps, so a model whose books take long between every two
      steps has no pauses) are judged apart, each by the mean of its last EARLY_WINDOW steps, the slower choice
      probed every EARLY_PROBE steps of that phase. Only a team beside torch's OpenMP threads needs it (a library
      built without OpenMP, or a second OpenMP runtime in the process: `one_openmp_runtime`; NativeDecoder gives
      early = EARLY there, 0 otherwise): its pool runs beside torch's OpenMP threads, which spin after a
      prefill, and may wait milliseconds for a core (2-core machine, bundled model: that pool's two threads gave
      steps 0-2 a mean of 2.9 / 2.2 / 1.7 ms against 1.7 / 1.6 / 1.4 on one: docs/cpu-experts.md);
    - the steps after those by the fastest of its last WINDOW: a step the machine's other work slowed must not
      decide.

    Both choices are tried EXPLORE times first, then the slower one again every PROBE steps of that phase, so a
    machine that quiets down gets its team back (a probe costs a step on the slower team: every 256th step, about
    0.4% on an idle machine; every 32nd cost about 3%). The choice changes no bit of the result (each output value
    is one thread's work: tests/test_native_step.py). `clock`: seconds (time.perf_counter; tests give their own)."""

    PROBE = 256
    WINDOW = 4
    EXPLORE = 3
    EARLY = 3                   # steps after a pause judged apart by default (0: none)
    EARLY_WINDOW = 8
    EARLY_PROBE = 8
    PAUSE_S = 0.002             # a gap between two steps this long (and PAUSE_TIMES the usual) starts them again
    PAUSE_TIMES = 5.0

    def __init__(self, clock=time.perf_counter, early: int | None = None):
        self.clock = clock
        self.early = self.EARLY if early is None else early
        self.seen: dict[tuple[int, int, int], collections.deque] = {}   # (rows, phase, threads) -> step seconds
        self.picks: dict[tuple[int, int], int] = {}                     # (rows, phase) -> steps picked
        self.since = 0                  # steps since the last pause
        self.last: float | None = None  # when the last step ended
        self.gaps: collections.deque = collections.deque(maxlen=16)   # the last gaps between steps (seconds)
        self.phase = 0                  # the phase of the step being picked, for observe

    def _phase(self) -> int:
        if self.early == 0:             # every step one phase
            return 0
        if self.last is None:
            self.since = 0
        else:
            gap = self.clock() - self.last
            usual = sorted(self.gaps)[len(self.gaps) // 2] if self.gaps else 0.0
            if gap >= max(self.PAUSE_S, self.PAUSE_TIMES * usual):
                self.since = 0
            self.gaps.append(gap)
        return min(self.since, self.early)

    def _score(self, phase: int, steps) -> float:
        return min(steps) if phase == self.early else sum(steps) / len(steps)

    def pick(self, rows: int, threads: int) -> int:
        self.phase = ph = self._phase()
        if threads <= 1:
            return 1
        n = self.picks[rows, ph] = self.picks.get((rows, ph), 0) + 1
        seen = {c: self.seen.get((rows, ph, c), ()) for c in (threads, 1)}
        if min(len(seen[threads]), len(seen[1])) < self.EXPLORE:
            return threads if len(seen[threads]) <= len(seen[1]) else 1
        fast, slow = sorted((threads, 1), key=lambda c: self._score(ph, seen[c]))
        return slow if n % (self.PROBE if ph == self.early else self.EARLY_PROBE) == 0 else fast

    def observe(self, rows: int, threads: int, seconds: float) -> None:
        """The step just picked (by `pick`) took `seconds` with `threads` threads."""
        window = self.WINDOW if self.phase == self.early else self.EARLY_WINDOW
        self.seen.setdefault((rows, self.phase, threads), collections.deque(maxlen=window)).append(seconds)
        self.since += 1
        self.last = self.clock()


def one_openmp_runtime(maps: str = "/proc/self/maps") -> bool | None:
    """Whether this process has loaded one OpenMP runtime (libgomp, libiomp or libomp), so that decoder.c's OpenMP
    team runs on torch's own threads; False when there are several (a torch build whose bundled runtime has another
    file name than the one the library was linked with: two thread pools again), None where it cannot be told."""
    try:
        with open(maps) as f:
            files = {line.split()[-1] for line in f if line.rstrip().endswith(".so") or ".so." in line}
    except OSError:
        return None
    names = {p for p in files if os.path.basename(p).startswith(("libgomp", "libiomp", "libomp"))}
    return len(names) == 1


class NativeDecoder:
    """decoder.c over one model's weights (module docstring). Weight pointers are taken once: the model's
    non-expert parameters never move (the runtime never reallocates them)."""

    def __init__(self, engine):
        fam, model = engine.family, engine.model
        self.family, self.model = fam, model
        self.lib = decoder_library()
        lm = fam.language_model(model)
        tc = fam.text_config(model.config)
        self.H = int(tc.hidden_size)
        geo = engine.geometry
        moe_pos = {fam.decoder_index(l): p for p, l in enumerate(geo.decode_layers)}
        att0 = lm.layers[0].self_attn
        heads = att0.q_proj.out_features // att0.head_dim
        kv_heads = att0.k_proj.out_features // att0.head_dim
        self.keep = []                                  # tensors whose pointers the C structs hold
        # the matrices (projections, routers, dense MLPs, lm_head) in bfloat16 where every one of them holds only
        # bfloat16 values (a bf16 checkpoint loaded in float32): the same numbers, half the bytes a step reads
        mats = [m.weight for layer in lm.layers for m in
                (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                 *((layer.mlp.gate,) if _name(layer.mlp) in _MOE_BLOCKS else
                   (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)))] + [model.lm_head.weight]
        self.wdtype = torch.bfloat16 if all(_bf16_exact(w) for w in mats) else torch.float32
        layers = []
        self.dense_inter = 0
        norm_topk = 1
        eps = float(lm.norm.variance_epsilon)
        for i, layer in enumerate(lm.layers):
            att, mlp = layer.self_attn, layer.mlp
            d = DecLayer()
            for nm, t in (("in_norm", layer.input_layernorm.weight),
                          ("post_norm", layer.post_attention_layernorm.weight),
                          ("q_norm", getattr(getattr(att, "q_norm", None), "weight", None)),
                          ("k_norm", getattr(getattr(att, "k_norm", None), "weight", None)),
                          ("bq", att.q_proj.bias), ("bk", att.k_proj.bias), ("bv", att.v_proj.bias),
                          ("bo", att.o_proj.bias)):
                setattr(d, nm, self._hold(t))
            for nm, t in (("wq", att.q_proj.weight), ("wk", att.k_proj.weight), ("wv", att.v_proj.weight),
                          ("wo", att.o_proj.weight)):
                setattr(d, nm, self._hold(t, self.wdtype))
            if _name(mlp) in _MOE_BLOCKS:
                d.router, d.moe = self._hold(mlp.gate.weight, self.wdtype), moe_pos[i]
                norm_topk = int(bool(getattr(mlp.gate, "norm_topk_prob", True)))
            else:
                d.moe, d.inter = -1, mlp.gate_proj.out_features
                d.w_gate, d.w_up, d.w_down = (self._hold(m.weight, self.wdtype)
                                              for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
                self.dense_inter = max(self.dense_inter, d.inter)
            layers.append(d)
        self.layers = (DecLayer * len(layers))(*layers)
        lm_head = model.lm_head.weight
        self.V = lm_head.shape[0]
        rot = lm.rotary_emb
        self.M = DecModel(len(layers), self.H, heads, kv_heads, att0.head_dim, self.V, geo.num_experts, geo.top_k,
                          norm_topk, SILU, BF16 if self.wdtype == torch.bfloat16 else F32, eps,
                          float(att0.scaling), float(rot.attention_scaling), self._hold(lm.norm.weight),
                          self._hold(lm.embed_tokens.weight), self._hold(rot.inv_freq.float()),
                          self._hold(lm_head, self.wdtype))
        self.xl = params(engine.layout)
        self.ex_inter = engine.layout.inter
        self._scratch: dict[tuple[int, int], torch.Tensor] = {}
        self._held: dict[int, tuple] = {}                 # id(bucket) -> (bucket, its layer array)
        # a team on torch's OpenMP threads has no early phase to judge apart (TeamSize); any other team has
        shared = bool(self.lib.lib.vm_info() & 1) and one_openmp_runtime() is True
        self.team = TeamSize(early=0 if shared else None)

    def _hold(self, t: torch.Tensor | None, dtype=torch.float32) -> int | None:
        """The address of `t` in `dtype` (a copy when it is not already that, contiguous), kept alive here."""
        if t is None:
            return None
        t = t.detach()
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise ValueError("the native decode step reads float32 weights on the host")
        t = t.to(dtype).contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _bucket_layers(self, b):
        """The layer array with this bucket's KV cache pointers (made once per bucket)."""
        held = self._held.get(id(b))
        if held is None or held[0] is not b:
            arr = (DecLayer * len(self.layers))()
            ctypes.memmove(arr, self.layers, ctypes.sizeof(self.layers))
            for i, kv in enumerate(b.kv):
                if not (kv.k.is_contiguous() and kv.v.is_contiguous() and kv.k.dtype == torch.float32):
                    raise ValueError("the native decode step needs contiguous float32 KV buffers")
                arr[i].kc, arr[i].vc = kv.k.data_ptr(), kv.v.data_ptr()
            held = self._held[id(b)] = (b, arr)
        return held[1]

    def _scratch_for(self, B: int, L: int) -> torch.Tensor:
        s = self._scratch.get((B, L))
        if s is None:
            n = self.lib.lib.vm_decode_scratch(ctypes.byref(self.M), B, L, self.dense_inter, self.ex_inter)
            s = self._scratch[(B, L)] = torch.empty(int(n), dtype=torch.float32)
        return s

    def run(self, b, addr: np.ndarray) -> None:
        """One decode step of bucket `b`'s first `b.rows` rows (its other rows are not computed), the experts of MoE
        position p read at `addr[p, e]` (int64 [moe layers, E], every routed one non-zero). Writes what the graph
        body writes: the mask column, KV at `pos`, the routing (into `b.out_host`), `route_h`, `logits`, `ids` (and
        its host copy), `pos + 1`. RuntimeError when the library refuses the call."""
        addr = np.ascontiguousarray(addr, dtype=np.int64)
        scratch = self._scratch_for(b.rows, b.L)
        out = b.out_host
        threads = self.team.pick(b.rows, torch.get_num_threads())
        t0 = time.perf_counter()
        rc = self.lib.lib.vm_decode(
            ctypes.byref(self.M), self._bucket_layers(b), ctypes.byref(self.xl) if self.xl is not None else None,
            b.rows, b.B, b.L, b.pos.data_ptr(), b.mask.data_ptr(), b.deltas.data_ptr(), addr.ctypes.data,
            scratch.data_ptr(), scratch.numel(), out["route_idx"].data_ptr(), out["route_w"].data_ptr(),
            b.route_h.data_ptr(), b.logits.data_ptr(), b.ids.data_ptr(), out["ids"].data_ptr(), threads)
        if rc != 0:
            raise RuntimeError(f"the native decode step refused its arguments ({rc})")
        self.team.observe(b.rows, threads, time.perf_counter() - t0)


def native_decoder(engine) -> NativeDecoder:
    """The `NativeDecoder` of `engine`'s model (one per model and expert format, shared by its forks)."""
    store = engine.model.__dict__.setdefault("_vismmoe_native_decoder", {})
    key = engine.layout.spec()
    nd = store.get(key)
    if nd is None:
        nd = store[key] = NativeDecoder(engine)
    return nd
