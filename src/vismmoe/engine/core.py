"""The Engine: a loaded model whose routed experts run out of a byte-budgeted device cache.

    Engine(model, store, budget, rc)   slot pool (offload/cache.py) + runtime (offload/runtime.py) attached to
                                       the model's experts modules; forks share weights and store
    generate / generate_requests       a batch of requests -> prefill -> decode steps -> finish (step/loop.py)
    statistics                         offload counters of each request

Loading a checkpoint is loading.py's (`load`), sizing the expert budget budget.py's. How experts are moved and
computed is the runtime's business, which experts to evict the policy's (offload/policies.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

import torch
from jinja2 import TemplateError

from ..config import RuntimeConfig, runtime_options
from ..errors import UserError
from ..offload.cache import CacheCounters, ExpertCache
from ..offload.links import get_link
from ..profiles import get_profile
from ..profiles.clock import attach_profile
from ..offload.policies import make_policy
from ..offload.predict import make_predictor
from ..offload.prefetch import Prefetcher
from ..offload import hooks
from ..offload.runtime import OffloadRuntime
from ..offload.trace import RoutingTrace
from ..offload.transfer import TransferEngine
from ..protocols import StepObserver
from ..step import loop
from ..step.decode import EagerStep, cut_at_eos
from ..tools.timeline import Timeline
from .budget import resolve_budget
from .compress import VisualContext, keep_count, make_compressor, prune
from .visual_topk import VisualTopK, check as check_visual_top_k
from .inputs import load_image
from .request import GenerationRequest, RequestRows, batch_inputs
from .sampling import Sampler


log = logging.getLogger("vismmoe")
_CHUNK_REFUSED: set[str] = set()        # families whose refusal of --prefill-chunk was logged


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    stats: dict = field(default_factory=dict)


class Engine:
    """A loaded model whose routed experts run out of a byte-budgeted device cache.

    `fork()` gives another engine over the same weights and store with its own budget/policy (benchmarks compare
    several in one process); the engine that generates attaches its runtime to the experts modules first.
    """

    def __init__(self, *, model_dir, family, config, model, tokenizer, image_processor, store, device, dtype,
                 geometry, layout, nonexpert_bytes, budget_bytes: int, rc: RuntimeConfig, pool=None):
        self.model_dir = model_dir
        self.family = family
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.store = store
        self.device = device
        self.dtype = dtype
        self.geometry = geometry
        self.layout = layout
        self.nonexpert_bytes = nonexpert_bytes
        self.budget_bytes = budget_bytes
        self.rc = rc
        slots = min(budget_bytes // layout.nbytes, len(geometry.moe_layers) * geometry.num_experts)
        policy = make_policy(rc.policy, moe_layers=geometry.moe_layers, num_experts=geometry.num_experts)
        self.cache = ExpertCache(layout, int(slots), device, policy, pool=pool)
        profile = get_profile(rc.device_profile) if rc.device_profile else None
        link = profile.link() if profile is not None else get_link(rc.link)
        self.runtime = OffloadRuntime(self.cache, TransferEngine(device, store, link),
                                      geometry.moe_layers, geometry.num_experts, geometry.top_k)
        predictor = make_predictor(rc.prefetch, self, rc.lookahead, rc.calibration)
        if predictor is not None:
            self.runtime.prefetcher = Prefetcher(predictor, rc.lookahead, link_gbps=link.rate_gbps(device.type),
                                                 copy_s=link.seconds(layout.nbytes, device.type),
                                                 adaptive=not rc.fixed_lookahead,
                                                 waited=self.runtime.transfer.host_waited)
            self.runtime.observers.append(self.runtime.prefetcher)
        if rc.cpu_experts != "off":            # cpu/: misses computed on the host's cores (eager layer calls)
            from ..cpu.hybrid import CpuSide
            self.runtime.cpu = CpuSide(rc.cpu_experts, layout, store, device, self.runtime.layer_pos, link=link)
        self.clock = attach_profile(self, profile) if profile is not None else None   # profiles/clock.py
        self.trace: RoutingTrace | None = None
        self.step_observers: list = []          # protocols.StepObserver: told where each forward step starts
        if rc.trace:
            self.record_trace(RoutingTrace())
        self.compressor = make_compressor(rc.compress) if rc.compress != "none" else None
        check_visual_top_k(rc.visual_top_k, family, geometry.top_k)   # every engine: loaded, forked, random
        self._set_trim(rc.visual_top_k)         # visual_topk.py: visual tokens keep fewer experts (changes outputs)
        self.eos_ids: set[int] = set()
        if tokenizer is not None:
            self.eos_ids = {i for i in family.token_ids(tokenizer)["eos"] if i is not None and i >= 0}
        self.progress = None                    # (message) -> None: told when the fast step compiles and captures
        self._fast = None                       # fast_step.FastStep, made on first use (fast_step())
        # one request at a time per model: forks share the model (its experts hooks, compiled step, graphs)
        self._lock = model.__dict__.setdefault("_vismmoe_lock", threading.RLock())
        # one hook per experts module (offload/hooks.py), attached before each request; the implementation that
        # reads them registered with transformers (explicitly, once)
        self.hooks = {layer: hooks.ExpertsHook(self.runtime, layer) for layer in geometry.moe_layers}
        hooks.register()
        self.attach()
        model.set_experts_implementation(hooks.IMPLEMENTATION)

    def fork(self, rc: RuntimeConfig | None = None, *, share_pool: bool = False, **overrides) -> Engine:
        """Same weights and store, a new cache under `rc` (default: this engine's options, routing trace off) with
        `overrides` replacing fields, e.g. `fork(expert_budget="10%", policy="lfu")`. `share_pool` reuses this
        engine's device pool (same budget; the two engines must not be used interleaved without clearing)."""
        base = rc if rc is not None else replace(self.rc, trace=False)
        if overrides.get("expert_budget") is not None:
            overrides.setdefault("device_memory", None)
        rc = runtime_options(base, **overrides)
        if rc.expert_format != self.rc.expert_format:
            raise UserError(f"a fork keeps its engine's expert format ({self.layout.spec()})",
                            "load the checkpoint again with the other --expert-format")
        budget = resolve_budget(rc, self.layout, self.geometry, self.nonexpert_bytes, self.config, self.device)
        return Engine(model_dir=self.model_dir, family=self.family, config=self.config, model=self.model,
                      tokenizer=self.tokenizer, image_processor=self.image_processor, store=self.store,
                      device=self.device, dtype=self.dtype, geometry=self.geometry, layout=self.layout,
                      nonexpert_bytes=self.nonexpert_bytes, budget_bytes=budget, rc=rc,
                      pool=self.cache.pool if share_pool else None)

    def fast_step(self):
        """The fast decode step (fast_step.py) when this engine decodes on it, else None (the eager decode).

        `--decode fast` asks for it (an error where it cannot run), `eager` never uses it, `auto` uses it on CUDA
        where it can run; `native` is its books with the body in C on the CPU (cpu/native/decoder.py; an error
        where that cannot run). Built once per engine; compiled code is shared by every engine of the process."""
        if self.rc.decode == "eager" or self.clock is not None:     # a device profile times the eager path
            return None
        if self._fast is not None:
            return self._fast
        from ..step.fast_step import FastStep, unsupported_reason
        if self.rc.decode == "native":
            from ..cpu.native.decoder import unsupported_reason as native_reason
            why = unsupported_reason(self) or native_reason(self)
            if why is not None:
                raise UserError(f"--decode native cannot run here: {why}", "use --decode eager (or fast)")
            self._fast = FastStep(self, graphs=False, compiled=False, progress=self._progress, native=True)
            return self._fast
        why = unsupported_reason(self)
        # `auto` keeps the eager step for the disk tier: the fast step's staging re-runs are exact (CPU tests, and
        # the H100's -m gpu tests) but not yet timed against the eager step there (`--decode fast` asks for them)
        auto_eager = self.device.type != "cuda" or getattr(self.store, "tier", "host") == "disk"
        if why is not None or (self.rc.decode == "auto" and auto_eager):
            if why is not None and self.rc.decode == "fast":
                raise UserError(f"--decode fast cannot run here: {why}", "use --decode eager")
            self.rc = replace(self.rc, decode="eager")
            return None
        cuda = self.device.type == "cuda"
        compiled = self.rc.compile if self.rc.compile is not None else cuda
        fuse = self.rc.fuse_kernels if self.rc.fuse_kernels is not None else cuda
        self._fast = FastStep(self, graphs=cuda, compiled=compiled, fuse=fuse, progress=self._progress)
        return self._fast

    def _progress(self, msg: str) -> None:
        if self.progress is not None:
            self.progress(msg)

    def record_timeline(self, on: bool = True) -> None:
        """Record each following request's compute and copy spans into `self.last_timeline` (timeline.py)."""
        self._timeline_on = on

    def _start_timeline(self, t0: float):
        if not getattr(self, "_timeline_on", False):
            return None
        tl = Timeline(t0=t0)
        self.runtime.timeline = self.runtime.transfer.timeline = tl
        self.last_timeline = tl
        inner = getattr(self.model, "model", None)
        method = getattr(type(inner), "get_image_features", None) if inner is not None else None
        if method is not None:                  # the vision encoder's span: every family calls this method
            encode = method.__get__(inner)

            def timed(*args, **kwargs):
                self._sync()
                start = time.perf_counter()
                out = encode(*args, **kwargs)
                self._sync()
                tl.add_vision(start, time.perf_counter())
                return out

            inner.get_image_features = timed
        if self.device.type == "cuda":
            anchor = torch.cuda.Event(enable_timing=True)
            anchor.record()
            return anchor
        return None

    def _end_timeline(self, anchor) -> None:
        if not getattr(self, "_timeline_on", False):
            return
        if anchor is not None:
            self.runtime.transfer.resolve_timeline(anchor, self.last_timeline.t0)
        self.runtime.timeline = self.runtime.transfer.timeline = None
        inner = getattr(self.model, "model", None)
        if inner is not None:
            inner.__dict__.pop("get_image_features", None)              # the class's method again

    def warm_up(self, with_image: bool = False) -> float:
        """One short untimed request (the text "Hello", after a small grey image when `with_image`; two new
        tokens), then the cache emptied and its counters and peak zeroed: first-call costs (allocations, lazy
        initialisation, compilation on CUDA) stay out of the next request's statistics. The routing trace and the
        timeline, when on, leave it out. Returns the seconds it took."""
        from PIL import Image
        trace, timeline = self.trace, getattr(self, "_timeline_on", False)
        self.record_trace(None)
        self._timeline_on = False
        t0 = time.perf_counter()
        try:
            image = Image.new("RGB", (64, 64), (128, 128, 128)) if with_image else None
            self.generate_requests([GenerationRequest.from_prompt(image, "Hello", max_new_tokens=2,
                                                                  ignore_eos=True)])
        finally:
            self.record_trace(trace)
            self._timeline_on = timeline
        seconds = time.perf_counter() - t0
        self.cache.clear()
        self.transfer_stalls()
        self.cache.counters = CacheCounters()
        self.cache.peak_resident = 0
        return seconds

    def set_compression(self, name: str, keep_ratio: float, visual_top_k: int | None = None) -> None:
        """Switch this engine's pruning of visual work (no new cache): the visual-token compressor `name` keeping
        `keep_ratio` of them, and `visual_top_k` experts per visual token (0: the model's top-k; None: as it is)."""
        self.compressor = make_compressor(name) if name != "none" else None
        if visual_top_k is None:
            visual_top_k = self.rc.visual_top_k
        self.rc = replace(self.rc, compress=name, keep_ratio=keep_ratio, visual_top_k=visual_top_k)
        self._set_trim(visual_top_k)

    def _set_trim(self, visual_top_k: int) -> None:
        trim = getattr(self.runtime, "trim", None)
        if trim in self.step_observers:
            self.step_observers.remove(trim)
        self.runtime.trim = VisualTopK(visual_top_k) if visual_top_k else None
        if self.runtime.trim is not None:
            self.step_observers.append(self.runtime.trim)

    def record_trace(self, trace: RoutingTrace | None) -> None:
        """Record routing into `trace` from now on (None stops recording)."""
        if self.trace is not None:
            self.remove_observer(self.trace)
        self.trace = trace
        if trace is not None:
            self.add_observer(trace)

    def add_observer(self, observer) -> None:
        """`observer` (protocols.RoutingObserver) sees every MoE layer call's routing from now on; a
        protocols.StepObserver is also told where each forward step starts. Undone by `remove_observer`."""
        self.runtime.observers.append(observer)
        if isinstance(observer, StepObserver):
            self.step_observers.append(observer)

    def remove_observer(self, observer) -> None:
        self.runtime.observers.remove(observer)
        if observer in self.step_observers:
            self.step_observers.remove(observer)

    def attach(self) -> None:
        """The model's experts modules run through this engine's runtime until `detach` or until another engine
        over the same model attaches (forks share the model: every request attaches its engine first; a new
        engine is attached)."""
        for layer, hook in self.hooks.items():
            hooks.attach(self.family.moe_block(self.model, layer).experts, hook)

    def detach(self) -> None:
        """Undo `attach`: the experts modules as they were (a module another engine attached since is left
        alone)."""
        for layer, hook in self.hooks.items():
            hooks.detach(self.family.moe_block(self.model, layer).experts, hook)

    # ---- inputs ----------------------------------------------------------------------------------------------
    def prepare(self, images, prompts: list[str]) -> dict:
        """(image or None, prompt) pairs -> model inputs on the device; None: a text-only prompt."""
        if len(images) != len(prompts):
            raise UserError(f"{len(images)} images for {len(prompts)} prompts", "give one image (or None) per prompt")
        pil = [load_image(im) if im is not None else None for im in images]
        return self._to_device(self.family.build_inputs(self.tokenizer, self.image_processor, pil, prompts))

    def _to_device(self, inputs: dict) -> dict:
        """Inputs on the device; pixels (and local crops' pixels) in the model's dtype."""
        return {k: v.to(self.device, self.dtype if k.startswith("pixel_values") else None) for k, v in inputs.items()}

    # ---- generation ------------------------------------------------------------------------------------------
    def _now(self) -> float:
        """Request time: the device profile's virtual clock, else the host's."""
        return self.clock.now() if self.clock is not None else time.perf_counter()

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def forward_logits(self, inputs: dict) -> torch.Tensor:
        """Logits of every prompt position (for tests and analysis; no KV cache kept)."""
        with self._lock:
            self.attach()
            rows = loop.visual_rows(inputs["mm_token_type_ids"].cpu(), inputs["attention_mask"].cpu())
            for s in self.step_observers:       # a prefill step, as the generation loop announces it
                s.begin_step("prefill", rows)
            pos, _ = self.family.prefill_positions(self.model, inputs)
            return self.model(**self.family.model_inputs(inputs), position_ids=self.family.position_ids(pos),
                              use_cache=False).logits

    def _check_length(self, prompt_tokens: int | None, max_new_tokens: int) -> None:
        """UserError unless at least one new token is asked for and the prompt plus the new tokens fit the model's
        context (`prompt_tokens` None: before the prompt is tokenized, the new tokens alone must leave room)."""
        if max_new_tokens < 1:
            raise UserError(f"max new tokens must be at least 1 (got {max_new_tokens})", "give a positive number")
        limit = getattr(self.family.text_config(self.config), "max_position_embeddings", None)
        if limit is not None and prompt_tokens is None and max_new_tokens >= limit:
            raise UserError(f"{max_new_tokens} new tokens leave no room for a prompt in the model's context of "
                            f"{limit} tokens", f"ask for fewer than {limit} new tokens")
        if limit is not None and prompt_tokens is not None and prompt_tokens + max_new_tokens > limit:
            raise UserError(f"prompt of {prompt_tokens} tokens + {max_new_tokens} new exceeds the model's context of "
                            f"{limit} tokens", "shorten the prompt, use a smaller image or ask for fewer new tokens")

    @torch.inference_mode()
    def generate_ids(self, inputs: dict, max_new_tokens: int = 32, teacher_tokens: list[int] | None = None
                     ) -> tuple[list[list[int]], dict]:
        """Greedy decoding from prepared inputs: (token ids per row, cut after the first EOS; request stats).
        Calls from several threads are served one after another (an engine runs one request at a time)."""
        self._check_length(inputs["input_ids"].shape[1], max_new_tokens)
        with self._lock:
            return self._generate_ids(inputs, max_new_tokens, teacher_tokens)

    def _generate_ids(self, inputs: dict, max_new_tokens: int, teacher_tokens: list[int] | None,
                      sampler: Sampler | None = None, on_step=None, compressible: bool | None = None):
        """The loop: prefill, decode steps until every row is done or `max_new_tokens` tokens; `on_step(state)`
        after the prefill and after each step (it may mark rows done). The engine's compressor prunes the prompt
        when `compressible` (None: when it has image tokens; compression prunes one image per row). (rows cut at
        EOS, request stats)."""
        if self.clock is None:
            return self._generate_ids_timed(inputs, max_new_tokens, teacher_tokens, sampler, on_step, compressible)
        from ..profiles.clock import span_hooks
        with span_hooks(self, self.clock), self.clock.request():
            return self._generate_ids_timed(inputs, max_new_tokens, teacher_tokens, sampler, on_step, compressible)

    def _generate_ids_timed(self, inputs, max_new_tokens, teacher_tokens, sampler, on_step, compressible):
        before = self._snapshot()
        self._sync()
        t0 = time.perf_counter()
        anchor = self._start_timeline(t0)
        t0 = self._now()
        if compressible is None:
            compressible = bool(inputs["mm_token_type_ids"].any())
        enc = self.pruned_prompt(inputs) if self.compressor is not None and compressible else None
        state = self.prefill(inputs, max_new_tokens, enc=enc, sampler=sampler)
        loop.run(state, max_new_tokens, teacher_tokens, on_step)
        tokens, t_first, steps = state.tokens, state.t_first, state.steps
        self._sync()
        t_end = self._now()
        self._end_timeline(anchor)
        rows = [cut_at_eos(row, self.eos_ids) for row in tokens]
        visual = int(inputs["mm_token_type_ids"].sum())
        kept = int(enc.visual.sum()) if enc is not None else visual
        stats = self._request_stats(before, ttft=t_first - t0, decode_s=t_end - t_first, steps=steps,
                                    e2e=t_end - t0, visual=visual)
        stats.update(visual_tokens_kept=kept, compress=self.rc.compress if enc is not None else "none",
                     keep_ratio=self.rc.keep_ratio if enc is not None else 1.0, batch=len(rows),
                     decode=state.strategy.label)
        return rows, stats

    @property
    def prefill_chunk(self) -> int:
        """Prompt positions per prefill chunk (`--prefill-chunk`), 0: whole prefills (the option is off, or the
        family cannot chunk its prompts: `Family.prefill_chunk_blocker`, said once in the log)."""
        n = self.rc.prefill_chunk
        why = self.family.prefill_chunk_blocker
        if n and why is not None:
            if self.family.model_type not in _CHUNK_REFUSED:
                _CHUNK_REFUSED.add(self.family.model_type)
                log.warning("--prefill-chunk %d: %s prompts prefill whole (%s)", n, self.family.model_type, why)
            return 0
        return n

    @torch.inference_mode()
    def prefill(self, inputs: dict, max_new_tokens: int, enc=None, sampler: Sampler | None = None,
                strategy=None) -> loop.DecodeState:
        """Run a prepared prompt (or `enc`, a pruned one) and return its `loop.DecodeState` with each row's first
        token (argmax, or `sampler`'s pick); the KV cache has room for `max_new_tokens` tokens in all. Drive it
        with `decode_one_token`, then `finish`; one batch at a time per engine. The decode step (strategy) is
        chosen here, once for the batch: `step_strategy` (or `strategy`). The prompt runs whole or in chunks of
        `prefill_chunk` positions."""
        strategy = strategy if strategy is not None else self.step_strategy(max_new_tokens)
        run = self.start_prefill(inputs, enc)
        while not run.run_chunk():
            pass
        return self.finish_prefill(run, max_new_tokens, sampler, strategy)

    def start_prefill(self, inputs: dict, enc=None) -> loop.PrefillRun:
        """A prompt's prefill, not run yet (`loop.PrefillRun`: whole, or in chunks of `prefill_chunk` positions).
        Attach before each `run_chunk` when other work on the model runs in between (`attach`)."""
        self.attach()
        if self.clock is not None:
            self.clock.phase = "prefill"
        return loop.PrefillRun(self.model, self.family, inputs, tuple(self.step_observers), enc, self.prefill_chunk)

    def finish_prefill(self, run: loop.PrefillRun, max_new_tokens: int, sampler: Sampler | None = None,
                       strategy=None) -> loop.DecodeState:
        """After `run`'s last piece: its `loop.DecodeState` (see `prefill`); the prompt-only experts leave."""
        strategy = strategy if strategy is not None else self.step_strategy(max_new_tokens)
        state = run.finish(strategy, self.eos_ids, max_new_tokens, sampler)
        if self.clock is not None:
            state.t_first = self.clock.now()
            self.clock.phase = "decode"
        self.release(self.geometry.prefill_only)
        return state

    def release(self, layers) -> None:
        """Experts of MoE layers `layers` leave the cache (ERNIE's vision banks once the prompt is done: decode
        tokens are text and never use them), leaving their slots to the layers decode uses."""
        layers = set(layers)
        if layers:
            for key in [k for k in self.cache.slot_of if k[0] in layers]:
                self.cache.evict(key)

    @torch.inference_mode()
    def decode_one_token(self, state: loop.DecodeState, teacher_token: int | None = None) -> list[int]:
        """One decode step of `state` (its strategy, chosen at the prefill): a token per row; `teacher_token`
        forces the step's input (benchmarks on random weights)."""
        return loop.decode_one_token(state, teacher_token)

    def finish(self, state: loop.DecodeState) -> None:
        """The last step's books (hits, routing observers, statistics)."""
        loop.finish(state)

    def step_strategy(self, max_new_tokens: int = 2):
        """The decode step of this engine's next batch (step/strategy.py): the fast step when it serves this
        engine (`fast_step`), else the eager step; a batch of one new token never steps."""
        fast = self.fast_step()
        return fast if fast is not None and max_new_tokens > 1 else EagerStep(self.model, self.family)

    @torch.inference_mode()
    def pruned_prompt(self, inputs: dict, compressor=None, keep_ratio: float | None = None):
        """The prompt encoded and pruned by `compressor` (default: this engine's) at `keep_ratio`."""
        comp = compressor or self.compressor
        ratio = self.rc.keep_ratio if keep_ratio is None else keep_ratio
        enc = self.family.encode(self.model, inputs)
        probe, qk = self.family.router_probe(self.model), self.family.query_key(self.model)
        sels = []
        for b in range(enc.embeds.shape[0]):
            vis = enc.embeds[b][enc.visual[b]]
            text = enc.embeds[b][enc.mask[b].bool() & ~enc.visual[b]]
            ctx = VisualContext(embeds=vis, grid=enc.grids[b], text=text, keep=keep_count(vis.shape[0], ratio),
                                probe=probe, query_key=qk, seed=b)
            sels.append(comp.select(ctx))
        return prune(enc, sels)

    def generate_batch(self, images, prompts: list[str], max_new_tokens: int = 32) -> list[Generation]:
        """Answer each prompt about its image (a path, encoded bytes or a PIL image; None: text only), greedily,
        as one batch."""
        if len(images) != len(prompts):
            raise UserError(f"{len(images)} images for {len(prompts)} prompts", "give one image (or None) per prompt")
        reqs = [GenerationRequest.from_prompt(im, p, max_new_tokens=max_new_tokens) for im, p in zip(images, prompts)]
        self.generate_requests(reqs)
        return [Generation(text=r.text, token_ids=r.token_ids, stats=r.stats) for r in reqs]

    def generate(self, image, prompt: str, max_new_tokens: int = 32) -> Generation:
        """Answer `prompt` about `image` (a path or a PIL image; None: a text-only prompt), greedily."""
        return self.generate_batch([image], [prompt], max_new_tokens)[0]

    # ---- requests --------------------------------------------------------------------------------------------
    def prepare_request(self, req: GenerationRequest) -> None:
        """Load `req`'s images, format and tokenize its messages, process its pixels: `req.inputs` (one row, on
        the CPU) and `req.prompt_tokens`. Thread-safe (reads no engine state that generation changes), so a
        server prepares requests while a batch runs. UserError for a bad image, a bad message list, or a prompt
        that does not fit the model's context with `req.max_new_tokens` more tokens."""
        self._check_length(None, req.max_new_tokens)
        t0 = time.perf_counter()
        pil = [load_image(im) for im in req.images]
        try:
            inputs = self.family.build_chat_inputs(self.tokenizer, self.image_processor, [req.messages], [pil])
        except (ValueError, TemplateError) as e:     # TemplateError: the template's own raise_exception
            raise UserError(f"cannot format these messages with the model's chat template ({e})",
                            "give one image per image part, text parts as strings, and the turns in the order "
                            "the model's template takes") from None
        req.prompt_tokens = int(inputs["input_ids"].shape[1])
        self._check_length(req.prompt_tokens, req.max_new_tokens)
        req.inputs, req.prepare_s = inputs, time.perf_counter() - t0

    @torch.inference_mode()
    def generate_requests(self, reqs: list[GenerationRequest], *, row_errors: str = "raise") -> None:
        """Run `reqs` as one batch (prepared here unless already): prefill together, decode together, each row with
        its own sampling, token limit and stop strings, streaming through `on_text`; a cancelled row stops at
        its next token. Fills each request's results; the offload statistics are the batch's. Calls from several
        threads are served one after another.

        A row that fails on its own never fails the others: a row whose preparation fails (UserError: a bad image,
        a prompt over the context; or any other exception) is left out of the batch, and a sampled row whose
        logits hold NaN/Inf (sampling.NonFiniteLogits) stops; either ends with finish reason "error" and its
        `error`. `row_errors` "keep" leaves the errors on the rows (a server answers each row on its own);
        "raise" (default) raises the first one: a preparation error before the batch runs, a sampling error once
        the batch has ended."""
        if row_errors not in ("raise", "keep"):
            raise ValueError(f"row_errors {row_errors!r}: 'raise' or 'keep'")
        live = []
        for r in reqs:
            if r.inputs is None:
                try:
                    self.prepare_request(r)
                except Exception as e:
                    if row_errors == "raise":
                        raise
                    r.error, r.finish_reason = e, "error"
                    continue
            live.append(r)
        if live:
            self._generate_rows(live)
        failed = next((r.error for r in reqs if r.error is not None), None)
        if failed is not None and row_errors == "raise":
            raise failed

    def _generate_rows(self, reqs: list[GenerationRequest]) -> None:
        """generate_requests' batch of prepared rows."""
        pad = self.family.token_ids(self.tokenizer)["pad"]
        with self._lock:
            t0 = self._now()
            inputs = self._to_device(batch_inputs([r.inputs for r in reqs], pad))
            rows = RequestRows(reqs, self.tokenizer, self.eos_ids, now=self._now)
            _, stats = self._generate_ids(inputs, max(r.max_new_tokens for r in reqs), None, rows.sampler,
                                          rows.on_step, compressible=all(len(r.images) == 1 for r in reqs))
            for r in reqs:
                # times from the start of the batch, plus the request's own preprocessing (a row that failed at its
                # first token has none)
                first = r.t_first if r.t_first is not None else r.t_end
                r.stats = dict(stats, ttft_s=r.prepare_s + first - t0, e2e_s=r.prepare_s + r.t_end - t0,
                               preprocess_s=r.prepare_s, new_tokens=len(r.token_ids),
                               prompt_tokens=r.prompt_tokens)

    # ---- statistics ------------------------------------------------------------------------------------------
    def _snapshot(self) -> dict:
        self.transfer_stalls()        # flush stalls of earlier work into the counters
        tot = self.cache.counters.total()
        tr = self.runtime.transfer
        return {"hits": tot.hits, "misses": tot.misses, "bytes": tot.bytes_moved, "stall": tot.stall_s,
                "copy": tr.copy_s, "busy": tr.link_busy_s(), "pf_hits": tot.prefetch_hits,
                "pf_issued": tot.prefetch_issued, "wasted": tot.wasted_bytes,
                "cpu": (cpu.experts, cpu.pairs, cpu.busy_s) if (cpu := self.runtime.cpu) is not None else (0, 0, 0.0)}

    def transfer_stalls(self) -> None:
        for layer, s in self.runtime.transfer.drain().items():
            self.cache.counters.layer(layer).stall_s += s

    def _request_stats(self, before: dict, *, ttft, decode_s, steps, e2e, visual) -> dict:
        after = self._snapshot()
        hits, misses = after["hits"] - before["hits"], after["misses"] - before["misses"]
        moved, copy_s = after["bytes"] - before["bytes"], after["copy"] - before["copy"]
        busy, stall = after["busy"] - before["busy"], after["stall"] - before["stall"]
        pf_hits, pf_issued = after["pf_hits"] - before["pf_hits"], after["pf_issued"] - before["pf_issued"]
        return {
            "expert_budget_bytes": self.budget_bytes,
            "expert_pool_bytes": self.cache.budget_bytes,
            "expert_bytes_peak": self.cache.peak_resident * self.layout.nbytes,
            "expert_bytes": self.layout.nbytes,
            "expert_format": self.layout.spec(),
            "slots": self.cache.num_slots,
            "experts_total": len(self.geometry.moe_layers) * self.geometry.num_experts,
            "nonexpert_bytes": self.nonexpert_bytes,
            "policy": self.rc.policy,
            "expert_tier": self.rc.expert_tier,
            "hits": hits,
            "misses": misses,
            "hit_rate": hits / max(1, hits + misses),
            "prefetch": self.rc.prefetch,
            "prefetch_hits": pf_hits,
            "prefetch_issued": pf_issued,
            "prefetch_precision": pf_hits / pf_issued if pf_issued > 0 else None,
            "prefetch_recall": pf_hits / (pf_hits + misses) if pf_hits + misses > 0 else None,
            "wasted_bytes": after["wasted"] - before["wasted"],
            "cpu_experts": self.rc.cpu_experts,
            "cpu_computed": after["cpu"][0] - before["cpu"][0],      # (layer, expert) computations on the host
            "cpu_pairs": after["cpu"][1] - before["cpu"][1],
            "cpu_busy_s": after["cpu"][2] - before["cpu"][2],
            # observed / calibrated CPU seconds in this process, what `auto` placement now plans with
            "cpu_rate_scale": (self.runtime.cpu.placement.scale if self.runtime.cpu is not None
                               and self.runtime.cpu.placement is not None else None),
            "bytes_moved": moved,
            "copy_s": copy_s,
            "h2d_GBps": moved / copy_s / 1e9 if copy_s > 0 else None,
            "stall_s": stall,
            "link": self.runtime.transfer.link.label(),
            "link_busy_s": busy,
            "overlap_fraction": min(1.0, max(0.0, 1.0 - stall / busy)) if busy > 0 else None,
            "ttft_s": ttft,
            "tpot_s": decode_s / steps if steps else 0.0,
            "e2e_s": e2e,
            "new_tokens": steps + 1,
            "visual_tokens": visual,
            "visual_tokens_kept": visual,
            "visual_top_k": self.rc.visual_top_k if visual else 0,     # experts a visual token kept (0: top-k)
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "time_source": "measured",
            **(self.clock.stats() if self.clock is not None else {}),
        }

    def per_layer_counters(self) -> dict[int, dict]:
        return {l: vars(c).copy() for l, c in sorted(self.cache.counters.per_layer.items())}
