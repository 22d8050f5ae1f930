"""llama.cpp next to vismmoe, on the same checkpoint bytes, image files, prompts and number of new tokens.

    checkpoint dir (the trained model, or a random-weight shape written by `vismmoe make-shape`)
      -> GGUF text model + mmproj (export_gguf; written once into --gguf DIR, reused when there)
      -> requests: (PNG file, prompt, new tokens, answer or None), the same files for both engines
      -> for each budget B (share of all routed experts on the device), then "all" (every expert on the device):
           vismmoe@B          lossless vismmoe: predictive eviction + gate prefetch, slot pool of B
           llama.cpp-ncmoe@B  -ngl 99 --n-cpu-moe N: the experts of the first N layers stay in host RAM and are
                              computed by the CPU; N = layers - floor(B x layers), so llama.cpp's device-resident
                              experts are at most B (whole layers only: its expert tensors are per layer)
           llama.cpp-fit@B    --fit on --fit-target M: llama.cpp places tensors itself (MoE tensors to the CPU
                              first) into what is free minus M, M chosen so that it gets the device memory vismmoe
                              used at B (CUDA only)
           all: vismmoe@100%, llama.cpp-gpu (-ngl 99, --fit off), and llama.cpp-gpu-T for each --extra-gpu-types T
         warm-up of each system, then repetitions of [A B C] in turn (A B C A B C); per system the median over
         repetitions of the mean over requests
      -> llama_cpp.json (rows, every run, commands, build info), llama_cpp.md (table), llama_cpp.png (plot)

How llama.cpp is measured: one `llama-mtmd-cli` process per request, greedy (--temp 0, --seed 0), the new-token
count fixed with -n (and --ignore-eos on random weights; vismmoe then ignores its end-of-turn ids too, so both make
exactly that many tokens). Its log (--log-verbosity 4, timestamped) gives the request: from the line it prints
once model and projector are loaded to its timings line (image read, preprocessing, encode, prompt, decode; model
load and warm-up excluded, as vismmoe's load is); decode ms/token is its eval timer (N - 1 steps for N tokens, as
vismmoe decodes N - 1); TTFT = request - eval (`parse_run` says why its prompt-eval timer is not used). Process
wall time and load time are reported beside. Device memory: llama.cpp's
process peak in `nvidia-smi` (sampled every 0.1 s, CUDA context included) and the sum of the device buffers it
prints (model, KV, compute); vismmoe: torch's peak allocation during the request (the base engine's one-layer pool
included), and nvidia-smi's figure for this process read once after the request (the caching allocator keeps
its peak, the CUDA context included). None on the CPU. The answer text comes from llama.cpp's stdout; answers are
scored with vismmoe.tools.evaluate.normalize.

Which GGUF llama.cpp runs: --llama-type bf16|f16|f32 (every weight matrix in that type, the projector too) or
q8_0|q4_k|q4_k_m (the text model quantized as `export-gguf --type` does, gguf_quant; the projector in f16, llama.cpp's
fast type, and the f16 text file that llama-quantize reads is left beside). Q8_0 is the peer of vismmoe's fp8 expert
format, Q4_K_M of int4 (`--expert-format`, passed to vismmoe.load). `--extra-gpu-types f16` adds an all-on-device
llama.cpp row on an f16 export, so a bf16 row can be checked against llama.cpp's f16 kernels in the same run.

`--accuracy` instead answers --limit test questions with both engines (every expert resident, greedy) and
reports each accuracy and how often the answers agree.

    python -m vismmoe.bench.llama_cpp --llama-cpp-bin BUILD/bin --model DIR --gguf DIR --out DIR [--device cuda]
        [--llama-type q4_k_m --expert-format int4] [--extra-gpu-types f16]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field

from ..errors import UserError
from ..tools.evaluate import normalize
from .gpu_memory import Nothing, PeakMemory, free_mib, process_mib
from .llama_cpp_report import markdown, plot

_PERF = re.compile(r"llama_perf_context_print:\s+(load time|prompt eval time|eval time|total time)\s*=\s*"
                   r"([\d.]+) ms(?: /\s*(\d+))?")
_ENCODE = re.compile(r"(?:mtmd batch encoding done|image slice encoded) in (\d+) ms")
_STAMP = re.compile(r"^(\d+)\.(\d{2})\.(\d{3})\.(\d{3}) ")
_BUFFER = re.compile(r"(CUDA\d+)\S*\s+(?:model |KV |compute |output |RS )?buffer size\s*=\s*([\d.]+) MiB")


@dataclass
class Request:
    image: str                    # PNG path, read by both engines
    prompt: str
    new_tokens: int
    answer: str | None = None     # None: random weights, nothing to score


@dataclass
class Run:
    """One request served by one system."""

    system: str
    text: str
    ttft_s: float
    tpot_s: float | None
    request_s: float
    new_tokens: int
    device_mib: float | None = None           # nvidia-smi peak of the serving process
    device_mib_alloc: float | None = None     # torch peak allocation (vismmoe) / printed device buffers (llama.cpp)
    wall_s: float | None = None               # llama.cpp: the whole process, load included
    load_s: float | None = None
    correct: bool | None = None
    extra: dict = field(default_factory=dict)


# ---- llama.cpp ----------------------------------------------------------------------------------------------

@dataclass
class Llama:
    """How to run llama.cpp's multimodal CLI on one exported model."""

    bin_dir: str
    text_gguf: str
    mmproj_gguf: str
    ctx: int
    image_tokens: tuple[int, int]       # (min, max) visual tokens, from the checkpoint's image processor
    ignore_eos: bool
    threads: int | None = None

    @property
    def exe(self) -> str:
        return os.path.join(self.bin_dir, "llama-mtmd-cli")

    def command(self, req: Request, placement: list[str]) -> list[str]:
        cmd = [self.exe, "-m", self.text_gguf, "--mmproj", self.mmproj_gguf, "--image", req.image, "-p", req.prompt,
               "-n", str(req.new_tokens), "--temp", "0", "--seed", "0", "-c", str(self.ctx),
               "--image-min-tokens", str(self.image_tokens[0]), "--image-max-tokens", str(self.image_tokens[1]),
               "--log-verbosity", "4", "--log-prefix", "--log-timestamps", *placement]
        if self.ignore_eos:
            cmd.append("--ignore-eos")
        if self.threads:
            cmd += ["-t", str(self.threads)]
        return cmd

    def run(self, system: str, req: Request, placement: list[str], gpu: bool, attempts: int = 3) -> Run:
        """One process serving `req`. A build without scripts/build_llama_cpp.sh's log flush loses its last log
        lines (the timings) at exit now and then: such a run is repeated, at most `attempts` times in all."""
        cmd = self.command(req, placement)
        for attempt in range(1, attempts + 1):
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    errors="replace")
            with PeakMemory(proc.pid) if gpu else Nothing() as mem:
                out, err = proc.communicate()
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                tail = " | ".join(err.strip().splitlines()[-3:])
                raise RuntimeError(f"llama-mtmd-cli exited {proc.returncode}: {tail}\ncommand: {' '.join(cmd)}")
            if _PERF.search(err) or attempt == attempts:
                run = parse_run(system, out, err, wall, getattr(mem, "peak_mib", None), req)
                run.extra["attempts"] = attempt
                return run
        raise AssertionError("unreachable")


def _stamp_s(line: str) -> float | None:
    """Seconds since the process's logger started, from a log line's `M.SS.mmm.uuu` prefix (--log-timestamps)."""
    m = _STAMP.match(line)
    if m is None:
        return None
    mi, se, ms, us = (int(x) for x in m.groups())
    return mi * 60 + se + ms / 1e3 + us / 1e6


def parse_run(system: str, stdout: str, stderr: str, wall_s: float, device_mib: float | None, req: Request) -> Run:
    """A `Run` from one llama-mtmd-cli process's output (log at --log-verbosity 4 with timestamps; the answer on
    stdout).

    Request time is the span between the first log line after the model and projector are loaded ("main: loading
    model", printed once they are) and the timings it prints when the answer is done: image read and preprocessing,
    encode, every prompt chunk, every decode step. Decode time per token is llama.cpp's eval timer (N - 1
    single-token steps, each synchronised by the next sampling); TTFT = request - eval. The prompt-eval timer is
    kept in `extra` only: its lazy synchronisation books the image encode into it. On a CPU build the span also holds
    the one token the CLI decodes after the last one it samples (on CUDA that decode is only launched)."""
    perf = {}
    for name, ms, count in _PERF.findall(stderr):
        perf[name] = (float(ms), int(count) if count else None)
    if "prompt eval time" not in perf or "eval time" not in perf:
        raise RuntimeError("llama-mtmd-cli printed no timings (llama_perf_context_print); is --log-verbosity 4 "
                           "supported by this build?")
    start = end = None
    for line in stderr.splitlines():
        if start is None and "main: loading model" in line:
            start = _stamp_s(line)
        elif end is None and "llama_perf_context_print:" in line:
            end = _stamp_s(line)
    if start is None or end is None:
        raise RuntimeError("llama-mtmd-cli printed no timestamped start and end lines (--log-timestamps "
                           "--log-prefix)")
    encode_ms = sum(float(ms) for ms in _ENCODE.findall(stderr))
    eval_ms, runs = perf["eval time"][0], perf["eval time"][1] or 0
    request_s = end - start
    buffers = {}
    for dev, mib in _BUFFER.findall(stderr):
        buffers[dev] = buffers.get(dev, 0.0) + float(mib)
    text = stdout.strip()
    return Run(system=system, text=text, ttft_s=request_s - eval_ms / 1e3,
               tpot_s=eval_ms / runs / 1e3 if runs else None, request_s=request_s,
               new_tokens=runs + 1, device_mib=device_mib,
               device_mib_alloc=sum(buffers.values()) if buffers else None, wall_s=wall_s,
               load_s=perf.get("load time", (0.0, None))[0] / 1e3,
               correct=None if req.answer is None else normalize(text) == normalize(req.answer),
               extra={"encode_ms": encode_ms, "prompt_eval_ms": perf["prompt eval time"][0],
                      "prompt_tokens": perf["prompt eval time"][1], "eval_ms": eval_ms, "eval_runs": runs})


def n_cpu_moe(budget: float, layers: int) -> int:
    """Layers whose experts llama.cpp keeps in host RAM so that its device-resident experts are at most `budget`
    (a share) of all: whole layers only."""
    return layers - math.floor(budget * layers + 1e-9)


def build_info(bin_dir: str) -> dict:
    path = os.path.join(bin_dir, "build_info.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


# ---- vismmoe ------------------------------------------------------------------------------------------------

def vismmoe_run(eng, system: str, req: Request) -> Run:
    """One request on a vismmoe engine, with torch's peak allocation during it and, read once after it (nothing
    polls while vismmoe runs: its decode step is host-bound), what nvidia-smi says this process holds (the
    caching allocator keeps its peak reserved, the CUDA context included)."""
    import torch
    cuda = eng.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    gen = eng.generate(req.image, req.prompt, max_new_tokens=req.new_tokens)
    st = gen.stats
    alloc = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Run(system=system, text=gen.text, ttft_s=st["ttft_s"], tpot_s=st.get("tpot_s"), request_s=st["e2e_s"],
               new_tokens=len(gen.token_ids), device_mib=process_mib(os.getpid()) if cuda else None,
               device_mib_alloc=alloc,
               correct=None if req.answer is None else normalize(gen.text) == normalize(req.answer),
               extra={"hits": st.get("hits"), "misses": st.get("misses"), "bytes_moved": st.get("bytes_moved"),
                      "expert_budget_bytes": st.get("expert_budget_bytes")})


# ---- requests -----------------------------------------------------------------------------------------------

def vqa_requests(limit: int, new_tokens: int, folder: str) -> list[Request]:
    """The first `limit` type-balanced test questions, images saved as PNG (lossless) for both engines."""
    from ..data import balanced_subset
    reqs = []
    for i, s in enumerate(balanced_subset("test", limit)):
        path = os.path.join(folder, f"q{i:04d}.png")
        s.image.save(path)
        reqs.append(Request(image=path, prompt=s.question, new_tokens=new_tokens, answer=s.answer))
    return reqs


def noise_requests(sides: list[int], new_tokens: int, folder: str, seed: int = 0) -> list[Request]:
    """One random-noise image per side (seeded) with a fixed prompt: requests for random-weight shapes."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    reqs = []
    for side in sides:
        path = os.path.join(folder, f"noise{side}.png")
        Image.fromarray((rng.random((side, side, 3)) * 255).astype(np.uint8)).save(path)
        reqs.append(Request(image=path, prompt="Describe this image in detail.", new_tokens=new_tokens))
    return reqs


def image_token_range(model_dir: str) -> tuple[int, int]:
    """(min, max) visual tokens of the checkpoint's image processor (pixels / (patch x merge)^2), for llama.cpp's
    --image-min-tokens / --image-max-tokens, so both engines resize (or not) alike. GLM-4V's processor counts the
    pixels of both frames of the temporal patch (an image is two identical frames), so per image it allows half."""
    with open(os.path.join(model_dir, "preprocessor_config.json")) as f:
        pp = json.load(f)
    size = pp.get("size") or {}
    lo = size.get("shortest_edge", pp.get("min_pixels", 56 * 56))
    hi = size.get("longest_edge", pp.get("max_pixels", 28 * 28 * 1280))
    unit = (pp.get("patch_size", 14) * pp.get("merge_size", 2)) ** 2
    if str(pp.get("image_processor_type", "")).startswith("Glm4v"):
        unit *= pp.get("temporal_patch_size", 2)
    return max(1, lo // unit), max(1, hi // unit)


# ---- the side-by-side run -----------------------------------------------------------------------------------

def _median_row(system: str, group: str, runs_by_rep: list[list[Run]], **meta) -> dict:
    """Per key, the median over repetitions of the mean over requests."""
    def agg(key):
        reps = [[getattr(r, key) for r in rep if getattr(r, key) is not None] for rep in runs_by_rep]
        means = [statistics.fmean(v) for v in reps if v]
        return statistics.median(means) if means else None

    corr = [r.correct for rep in runs_by_rep for r in rep if r.correct is not None]
    return dict(system=system, group=group, ttft_s=agg("ttft_s"), tpot_s=agg("tpot_s"), request_s=agg("request_s"),
                wall_s=agg("wall_s"), load_s=agg("load_s"), device_mib=agg("device_mib"),
                device_mib_alloc=agg("device_mib_alloc"), new_tokens=agg("new_tokens"),
                accuracy=sum(corr) / len(corr) if corr else None,
                answers=[r.text for r in runs_by_rep[-1]] if runs_by_rep else [], **meta)


def side_by_side(model_dir: str, llama: Llama, requests: list[Request], budgets: list[str], reps: int,
                 device: str, dtype: str | None, compile_flag: bool | None, random_weights: bool,
                 progress=print, on_group=None, extra: dict[str, Llama] | None = None, ignore_eos: bool = False,
                 options: dict | None = None) -> dict:
    """Rows (medians) and every run of each system in each budget group; `on_group(result so far)` after each
    group, so a run cut short keeps the groups it finished. `extra` {name suffix: Llama}: more all-on-device
    llama.cpp rows (other GGUF files); `options`: more vismmoe.load options (expert_format)."""
    import gc

    import torch
    from transformers import AutoConfig

    import vismmoe

    from ..families import get_family
    from ..formats import make_format
    from ..formats.checkpoint import run_format, stored_format
    cuda = device.startswith("cuda")
    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype) or \
        ("bfloat16" if cuda else "float32")
    cfg = AutoConfig.from_pretrained(model_dir)
    geo = get_family(cfg.model_type).geometry(cfg)
    # the base engine keeps the smallest legal pool (one layer's top-k): its memory is in every vismmoe figure
    spec = run_format((options or {}).get("expert_format"), stored_format(cfg))
    least = geo.top_k * make_format(spec, geo.hidden, geo.inter, getattr(torch, dtype)).nbytes
    opts = {"policy": "predictive", "prefetch": "gate", **(options or {})}
    eng0 = vismmoe.load(model_dir, device=device, dtype=dtype, expert_budget=str(least), compile=compile_flag, **opts)
    layers = len(eng0.geometry.moe_layers)
    rows, raw = [], []

    failed: dict[str, str] = {}

    def attempt(name: str, fn, req: Request) -> Run | None:
        """A system that fails (llama.cpp cannot place a model in the memory it is given, a crash) is reported
        with its error and left out of the rest of its group; the other systems go on."""
        if name in failed:
            return None
        try:
            return fn(req)
        except Exception as e:                          # noqa: BLE001 (reported in the row, with the traceback)
            failed[name] = f"{type(e).__name__}: {e}"[:2000] + "\n" + traceback.format_exc()[-2000:]
            progress(f"{name} FAILED: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
            return None

    def serve(systems: dict, group: str, warmed=()) -> dict[str, list[list[Run]]]:
        for name, fn in systems.items():                              # warm-up, not recorded
            if name not in warmed:
                progress(f"[{group}] warm-up {name}")
                attempt(name, fn, requests[0])
        out: dict[str, list[list[Run]]] = {name: [] for name in systems}
        for rep in range(reps):
            for name, fn in systems.items():
                progress(f"[{group}] rep {rep + 1}/{reps} {name}")
                runs = [attempt(name, fn, r) for r in requests]
                if name not in failed:
                    out[name].append(runs)
        return out

    def vis(eng, name):
        return lambda r: vismmoe_run(eng, name, r)

    def lcpp(name, placement, which=llama):
        def fn(r):
            if cuda:
                torch.cuda.empty_cache()
            return which.run(name, r, placement, gpu=cuda)
        return fn

    ggufs = {}                                        # llama.cpp system -> its text GGUF file

    groups = [(b, float(b.rstrip("%")) / 100) for b in budgets] + [("all", 1.0)]
    for group, share in groups:
        eng = eng0.fork(expert_budget="100%" if group == "all" else group)
        if random_weights or ignore_eos:
            eng.eos_ids = set()         # make exactly new_tokens tokens, as llama.cpp does with --ignore-eos
        ours = f"vismmoe@{group}"
        systems = {ours: vis(eng, ours)}
        progress(f"[{group}] warm-up {ours} (every request)")
        warm = [r for r in (attempt(ours, systems[ours], q) for q in requests) if r is not None]
        if group == "all":
            name = "llama.cpp-gpu" if cuda else "llama.cpp-cpu"
            for suffix, which in [("", llama)] + [("-" + k, v) for k, v in (extra or {}).items()]:
                systems[name + suffix] = lcpp(name + suffix, ["-ngl", "99", "--fit", "off"] if cuda else [], which)
                ggufs[name + suffix] = which.text_gguf
        elif cuda:
            ncm = str(n_cpu_moe(share, layers))
            systems[f"llama.cpp-ncmoe@{group}"] = lcpp(f"llama.cpp-ncmoe@{group}",
                                                       ["-ngl", "99", "--fit", "off", "--n-cpu-moe", ncm])
            # llama.cpp --fit gets what vismmoe's requests allocated at this budget (torch's peak, warm-up runs)
            used = max((r.device_mib_alloc or 0.0 for r in warm), default=0.0)
            torch.cuda.empty_cache()
            free = free_mib()
            if free is not None and used > 0:
                systems[f"llama.cpp-fit@{group}"] = lcpp(
                    f"llama.cpp-fit@{group}", ["--fit", "on", "--fit-target", str(max(0, int(free - used)))])
        runs = serve(systems, group, warmed=(ours,))
        for name, by_rep in runs.items():
            meta = {"budget": group}
            if name.startswith("llama.cpp-ncmoe"):
                ncm = n_cpu_moe(share, layers)
                meta.update(n_cpu_moe=ncm, experts_on_device=(layers - ncm) / layers)
            elif name.startswith("vismmoe"):
                meta.update(experts_on_device=eng.cache.num_slots / (layers * eng.geometry.num_experts))
            elif name.startswith("llama.cpp-gpu"):
                meta.update(experts_on_device=1.0)
            if name.startswith("llama.cpp"):
                meta.update(gguf=os.path.basename(ggufs.get(name, llama.text_gguf)))
            if name in failed:
                meta["error"] = failed[name]
            rows.append(_median_row(name, group, by_rep, **meta))
            raw += [dict(asdict(r), rep=i) for i, rep in enumerate(by_rep) for r in rep]
        del eng, systems
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()                # the next group's figures hold only its own pool
        res = {"rows": rows, "runs": raw, "layers": layers, "device": str(eng0.device),
               "dtype": str(eng0.dtype).replace("torch.", ""),
               "decode": eng0.rc.decode if eng0.rc.decode != "auto" else ("fast" if cuda else "eager")}
        if on_group is not None:
            on_group(dict(res, partial=group != "all"))
    return res


def accuracy(model_dir: str, llama: Llama, requests: list[Request], device: str, dtype: str | None,
             progress=print, options: dict | None = None) -> dict:
    """Every request answered by vismmoe (every expert resident; `options`: more vismmoe.load options) and
    llama.cpp (all on its device); per-question answers, each engine's accuracy, and the share of questions where
    the two answers agree."""
    import vismmoe
    eng = vismmoe.load(model_dir, device=device, dtype=dtype, expert_budget="100%", **(options or {}))
    gpu = eng.device.type == "cuda"
    placement = ["-ngl", "99", "--fit", "off"] if gpu else []
    items = []
    for i, r in enumerate(requests):
        a = vismmoe_run(eng, "vismmoe", r)
        b = llama.run("llama.cpp", r, placement, gpu=gpu)
        items.append({"image": os.path.basename(r.image), "question": r.prompt, "answer": r.answer,
                      "vismmoe": a.text, "llama_cpp": b.text, "vismmoe_correct": a.correct,
                      "llama_cpp_correct": b.correct, "agree": normalize(a.text) == normalize(b.text)})
        if progress and (i + 1) % 10 == 0:
            progress(f"{i + 1}/{len(requests)} questions")
    n = len(items)
    return {"n": n, "vismmoe_accuracy": sum(x["vismmoe_correct"] for x in items) / n,
            "llama_cpp_accuracy": sum(x["llama_cpp_correct"] for x in items) / n,
            "agreement": sum(x["agree"] for x in items) / n, "device": str(eng.device),
            "dtype": str(eng.dtype).replace("torch.", ""),
            "disagreements": [x for x in items if not x["agree"]], "items": items}


# ---- command line -------------------------------------------------------------------------------------------

LLAMA_TYPES = ("bf16", "f16", "f32", "q8_0", "q4_k", "q4_k_m")


def _gguf_files(model_dir: str, gguf_dir: str, llama_type: str, llama_bin: str | None = None) -> tuple[str, str]:
    """(text, mmproj) GGUF files of `model_dir` in `llama_type` under `gguf_dir`, exported when either is missing:
    a float type for both files, or a quantized text model (export-gguf --type) with an f16 projector (llama-quantize
    looked for in `llama_bin` first)."""
    from ..tools.export_gguf import DTYPES, export
    name = os.path.basename(os.path.normpath(model_dir))
    dtype = llama_type if llama_type in DTYPES else "f16"
    text = os.path.join(gguf_dir, f"{name}-{llama_type}.gguf")
    mmproj = os.path.join(gguf_dir, f"mmproj-{name}-{dtype}.gguf")
    if not (os.path.exists(text) and os.path.exists(mmproj)):
        quant = None if llama_type in DTYPES else llama_type
        lq = llama_bin if quant in ("q4_k", "q4_k_m") and llama_bin and \
            os.path.exists(os.path.join(llama_bin, "llama-quantize")) else None
        export(model_dir, gguf_dir, dtype=dtype, quant=quant, llama_quantize=lq, force=True)  # the bench's folder
    return text, mmproj


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m vismmoe.bench.llama_cpp", description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp-bin", required=True, metavar="DIR", help="folder with llama-mtmd-cli")
    p.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    p.add_argument("--gguf", required=True, metavar="DIR", help="folder of the GGUF files (exported when missing)")
    p.add_argument("--llama-type", "--gguf-dtype", dest="llama_type", default="bf16", choices=LLAMA_TYPES,
                   help="the GGUF llama.cpp runs (default bf16): a float type, or the text model quantized "
                        "(q8_0 against vismmoe's fp8 experts, q4_k_m against int4) with an f16 projector")
    p.add_argument("--extra-gpu-types", default="", metavar="TYPES",
                   help="comma-separated GGUF types, each one more llama.cpp row with every expert on the device "
                        "(e.g. f16 beside a bf16 run)")
    p.add_argument("--expert-format", default=None, metavar="NAME",
                   help="vismmoe's expert format (vismmoe.load expert_format; default: the checkpoint's dtype)")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="vismmoe's dtype (default: bf16 on cuda, float32 on cpu)")
    p.add_argument("--budgets", default="10%,25%,50%", help="comma-separated shares of experts on the device")
    p.add_argument("--limit", type=int, default=6, help="test questions (trained model)")
    p.add_argument("--image-sides", default="448,1024", help="random-weight shapes: one noise image per side")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 4 (trained model), 64 (shapes)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--compile", default="off", choices=["auto", "on", "off"],
                   help="torch.compile vismmoe's fast decode step (default off: it costs minutes per process)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp -t (default: its own)")
    p.add_argument("--policy", default=None, help="vismmoe's eviction policy (default predictive)")
    p.add_argument("--prefetch", default=None, help="vismmoe's prefetch (default gate; none: no lookahead)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="both engines make exactly --max-new-tokens tokens (a decode timing on a trained model, whose "
                        "answers end after a token or two; answers and accuracy then mean nothing)")
    p.add_argument("--decode", default="auto", choices=["auto", "fast", "eager", "native"],
                   help="vismmoe's decode step (default auto: fast on CUDA, eager on the CPU; native: the CPU's C step)")
    p.add_argument("--cpu-experts", default="off", choices=["off", "on", "auto"],
                   help="vismmoe's --cpu-experts (on: every miss computed by the CPU expert executor from the host "
                        "store, the CPU-only target's setting)")
    p.add_argument("--accuracy", action="store_true", help="answer --limit questions with both engines instead")
    args = p.parse_args(argv)
    args.command = "python -m vismmoe.bench.llama_cpp " + " ".join(shlex.quote(a) for a in
                                                                   (sys.argv[1:] if argv is None else argv))
    try:
        return _main(args)
    except UserError as e:
        sys.stderr.write(f"vismmoe: error: {e}\n")
        return 2


def _main(args) -> int:
    from .make_shape import SHAPE_FILE
    from ..config import RuntimeConfig, check_runtime
    options = {"expert_format": args.expert_format} if args.expert_format else {}
    if args.cpu_experts != "off":                   # cpu/: misses computed from the host store, not copied
        options["cpu_experts"] = args.cpu_experts
    if args.decode != "auto":
        options["decode"] = args.decode
    options.update({k: v for k, v in (("policy", args.policy), ("prefetch", args.prefetch)) if v is not None})
    check_runtime(RuntimeConfig(**options))         # a bad value: one line, before anything runs
    if args.model is None:
        from ..checkpoints import BUNDLED
        args.model = BUNDLED
    exe = os.path.join(args.llama_cpp_bin, "llama-mtmd-cli")
    if not os.path.exists(exe):
        raise UserError(f"no llama-mtmd-cli in {args.llama_cpp_bin}", "build it with scripts/build_llama_cpp.sh")
    random_weights = os.path.exists(os.path.join(args.model, SHAPE_FILE))
    os.makedirs(args.out, exist_ok=True)
    extra_types = [t.strip() for t in args.extra_gpu_types.split(",") if t.strip()]
    bad = [t for t in extra_types if t not in LLAMA_TYPES]
    if bad:
        raise UserError(f"--extra-gpu-types {','.join(bad)}: unknown GGUF type", f"use {', '.join(LLAMA_TYPES)}")
    with open(os.path.join(args.model, "config.json")) as f:
        max_pos = json.load(f)["text_config"].get("max_position_embeddings", 4096)

    def llama_for(llama_type: str) -> Llama:
        text, mmproj = _gguf_files(args.model, args.gguf, llama_type, args.llama_cpp_bin)
        return Llama(args.llama_cpp_bin, text, mmproj, ctx=min(4096, max_pos),
                     image_tokens=image_token_range(args.model), ignore_eos=random_weights or args.ignore_eos,
                     threads=args.threads)

    llama = llama_for(args.llama_type)
    extra = {t: llama_for(t) for t in extra_types if t != args.llama_type}
    fmt = f" experts {args.expert_format}" if args.expert_format else ""
    folder = tempfile.mkdtemp(prefix="vismmoe-llama-")
    compile_flag = {"auto": None, "on": True, "off": False}[args.compile]
    info = build_info(args.llama_cpp_bin)
    what = (f"{os.path.basename(os.path.normpath(args.model))} "
            f"({'RANDOM weights' if random_weights else 'trained'}"
            f"{', EOS ignored: timing only' if args.ignore_eos and not random_weights else ''})")
    if args.accuracy:
        reqs = vqa_requests(args.limit, args.max_new_tokens or 4, folder)
        res = accuracy(args.model, llama, reqs, args.device, args.dtype, options=options)
        res.update(title=f"accuracy, {what}, {res['n']} test questions, {res['device']}, "
                         f"vismmoe {res['dtype']}{fmt} vs llama.cpp GGUF {args.llama_type}", llama_cpp=info,
                   command=args.command,
                   date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count())
        path = os.path.join(args.out, "llama_cpp_accuracy.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps({k: res[k] for k in ("n", "vismmoe_accuracy", "llama_cpp_accuracy", "agreement")}))
        return 0
    if random_weights:
        sides = [int(x) for x in args.image_sides.split(",") if x.strip()]
        reqs = noise_requests(sides, args.max_new_tokens or 64, folder)
    else:
        reqs = vqa_requests(args.limit, args.max_new_tokens or 4, folder)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    def write(res: dict) -> dict:
        title = (f"vismmoe vs llama.cpp {info.get('llama_cpp_commit', '?')[:7]} ({info.get('mode', '?')} build), "
                 f"{what}, {len(reqs)} requests x {reqs[0].new_tokens} new tokens, {res['device']}, GGUF "
                 f"{args.llama_type}{''.join(f' (+{t} row, every expert resident)' for t in extra)}, "
                 f"vismmoe {res['dtype']}{fmt} {res['decode']} decode (compile {args.compile}), "
                 f"medians of {args.reps}")
        res.update(title=title + (" (PARTIAL: the run did not finish)" if res.get("partial") else ""),
                   llama_cpp=info, command=args.command, date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count(),
                   requests=[asdict(r) for r in reqs])
        with open(os.path.join(args.out, "llama_cpp.json"), "w") as f:
            json.dump(res, f, indent=1)
        with open(os.path.join(args.out, "llama_cpp.md"), "w") as f:
            f.write(markdown(res))
        return res

    res = side_by_side(args.model, llama, reqs, budgets, args.reps, args.device, args.dtype, compile_flag,
                       random_weights, progress=lambda m: print(m, file=sys.stderr, flush=True), on_group=write,
                       extra=extra, options=options, ignore_eos=args.ignore_eos)
    res = write(res)
    plot(res, os.path.join(args.out, "llama_cpp.png"))
    print(markdown(res))
    print(json.dumps({"rows": res["rows"], "title": res["title"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
