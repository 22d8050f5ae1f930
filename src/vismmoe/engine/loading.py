"""Loading a checkpoint: `load(model_dir, rc) -> Engine`.

    config.json -> family adapter (families/) -> model skeleton on `meta`
        non-expert weights -> device (read tensor by tensor from safetensors)
        routed experts     -> store (host RAM or disk), never materialised on the device
    budget (budget.py) -> Engine (core.py: slot pool, runtime, generation)

Owns everything that reads a checkpoint before the engine exists: the device and dtype, the config and its
checks, tokenizer and image processor, the non-expert weights, the expert store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoTokenizer

from ..config import RuntimeConfig, check_runtime
from ..errors import UserError
from ..families import get_family
from ..families.checks import check_config, check_tokenizer, check_unused, check_weights
from ..formats import make_format
from ..formats.checkpoint import dequantized_tensors, expert_source, run_format, stored_format
from ..offload.store import CheckpointReader, DiskStore, HostStore
from ..paths import input_file, read_json
from .budget import resolve_budget
from .core import Engine
from .visual_topk import check as check_visual_top_k
from .weights_check import FiniteCheck

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def _resolve_device(name: str) -> torch.device:
    """--device: cpu or cuda[:N]; a UserError for anything else (a malformed name too) or a CUDA device not there."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for but no CUDA device is visible", "use --device cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}", "use --device cpu or cuda")
    return dev


def _resolve_dtype(name: str | None, config, device: torch.device) -> torch.dtype:
    if name is not None:
        try:
            return _DTYPES[name]
        except KeyError:
            raise UserError(f"unknown dtype {name!r}", f"use one of {', '.join(sorted(_DTYPES))}") from None
    if device.type == "cpu":
        return torch.float32
    d = getattr(config, "dtype", None) or getattr(getattr(config, "text_config", config), "dtype", None)
    d = _DTYPES.get(str(d).replace("torch.", ""), None) if d is not None else None
    return d if d in (torch.bfloat16, torch.float16) else torch.bfloat16

def read_model_type(model_dir: str) -> str | None:
    """The `model_type` of the checkpoint in `model_dir`; UserError for a missing folder, a file in its place, or an
    unreadable, special or malformed config.json."""
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise UserError(f"{model_dir} is a file, not a model directory",
                        "a model is a directory holding config.json and the weights: give --model that directory")
    if not os.path.isdir(model_dir):
        raise UserError(f"model directory not found: {model_dir}", "give --model a checkpoint directory "
                        "(vismmoe make-tiny --family qwen3_vl_moe --out DIR makes one)")
    for name in sorted(os.listdir(model_dir)):        # the loaders open these files: a FIFO would block them
        if name.endswith((".json", ".jinja", ".safetensors", ".txt", ".model", ".npz")):
            entry = os.path.join(model_dir, name)
            if os.path.isdir(entry):
                raise UserError(f"{entry} is a directory where the checkpoint needs a file",
                                "restore the checkpoint's files")
            input_file(entry, "checkpoint file", "restore the checkpoint's files")
    path = os.path.join(model_dir, "config.json")
    if not os.path.lexists(path):
        raise UserError(f"no config.json in {model_dir}", "point --model at a Hugging Face checkpoint directory")
    config = read_json(path, f"config.json in {model_dir}", "restore the checkpoint's config.json")
    if not isinstance(config, dict):
        raise UserError(f"config.json in {model_dir} is not a JSON object", "restore the checkpoint's config.json")
    model_type = config.get("model_type")
    return model_type if isinstance(model_type, str) else None

try:                                    # transformers' typed config fields (huggingface_hub's strict dataclasses)
    from huggingface_hub.errors import StrictDataclassError
except ImportError:                     # an older huggingface_hub: transformers raised TypeError/ValueError itself
    class StrictDataclassError(Exception):
        pass

_JSON_TYPES = {"int": "a whole number", "float": "a number with a decimal point or exponent (e.g. 1e-06)",
               "bool": "true or false", "str": "a string", "NoneType": "null", "dict": "a JSON object",
               "a list": "a list", "a tuple": "a list", "list": "a list"}
_CONFIG_FIX = "correct config.json (or restore the checkpoint's own)"
_UNKNOWN = object()


def _json_paths(value, field: str, path: str = ""):
    """Dotted paths of every key `field` in a JSON value (objects nested)."""
    if isinstance(value, dict):
        for k, v in value.items():
            p = f"{path}{k}"
            if k == field:
                yield p, v
            yield from _json_paths(v, field, p + ".")


def _config_type_error(e: StrictDataclassError, model_dir: str) -> UserError:
    """transformers' validation error of a config.json field -> one line naming the field (as a path in the
    file), its value and the types transformers takes."""
    cause = e.__cause__ if e.__cause__ is not None else e
    text = str(cause)
    m = re.search(r"for field '([^']+)'", str(e)) or re.search(r"Field '([^']+)'", text)
    if m is None:                       # a class validator (e.g. layer_types): its own message
        first = (text.splitlines() or [type(cause).__name__])[0]
        return UserError(f"config.json in {model_dir} is invalid: {first}", _CONFIG_FIX)
    field = m.group(1)
    expected = []
    for t in re.findall(r"expected (.+?)(?:, got|\)|;|$)", text):
        t = _JSON_TYPES.get(t.strip(), t.strip())
        if t not in expected:
            expected.append(t)
    path, value = field, _UNKNOWN
    try:
        with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
            found = list(_json_paths(json.load(f), field))
        path, value = found[0] if len(found) == 1 else next(
            ((p, v) for p, v in found if f"(value: {v!r})" in text), (field, _UNKNOWN))
    except (OSError, ValueError, RecursionError):
        pass
    shown = "" if value is _UNKNOWN else f" is {json.dumps(value)}"
    want = " or ".join(expected) or "another value"
    return UserError(f"config.json in {model_dir}: {path}{shown}, which transformers takes only as {want}",
                     _CONFIG_FIX)


def read_config(model_dir: str):
    """`AutoConfig.from_pretrained(model_dir)`, every family's config built from config.json; UserError (one line
    naming config.json and the field) for a value transformers refuses: a wrong type (`"hidden_size": "256"`, an
    int where it takes a float), a failed class validator, a malformed file."""
    try:
        return AutoConfig.from_pretrained(model_dir)
    except StrictDataclassError as e:
        raise _config_type_error(e, model_dir) from None
    except (ValueError, OSError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise UserError(f"cannot read config.json in {model_dir}: {(str(e).splitlines() or [type(e).__name__])[0]}",
                        "restore the checkpoint's config.json") from None


def device_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def skeleton(family, config) -> torch.nn.Module:
    """The model with every parameter on `meta` (buffers real): nothing allocated for weights yet."""
    config._attn_implementation = "sdpa"
    with init_empty_weights(include_buffers=False):
        model = family.model_class(config)
    return model.eval()


def _load_processors(family, config, model_dir: str):
    """(tokenizer, image processor) of the checkpoint, checked against config.json and with the chat template
    tried on a one-image question (a text question for a text-only family): read before any weight, so a broken
    one is reported at once."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        image_processor = family.load_image_processor(model_dir)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as e:
        raise UserError(f"cannot load the tokenizer or image processor of {model_dir}: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0]}",
                        "the directory needs tokenizer files and preprocessor_config.json") from None
    check_tokenizer(family, config, tokenizer, model_dir)
    try:
        parts = ([{"type": "image"}] if family.has_vision else []) + [{"type": "text", "text": "?"}]
        family.chat_text(tokenizer, [{"role": "user", "content": parts}])
    except UserError as e:
        raise UserError(f"{e.what.replace('these messages', 'a one-image question')} (checked at load, {model_dir})",
                        e.fix) from None
    return tokenizer, image_processor


def _load_nonexpert(model, family, reader: CheckpointReader, prefixes: list[str], dt, dev, model_dir: str,
                    finite: FiniteCheck | None = None, stored: str | None = None) -> None:
    """Every checkpoint tensor except routed experts (under `prefixes`), converted where the family stores it
    otherwise (`Family.convert_tensor`), straight to the device (params in `dt`); each scanned by `finite`.
    Linears a quantized checkpoint (`stored`: its expert format) stores quantized are dequantized once
    (formats.checkpoint)."""
    params = dict(model.named_parameters())
    expert_pfx = tuple(p + "." for p in prefixes)
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ()) + \
        tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    state = {}
    keys = [k for k in reader.keys() if not k.startswith(expert_pfx)]
    for name, tensor in dequantized_tensors(reader, stored, keys):
        for key, t in family.convert_tensor(name, tensor):
            if finite is not None:
                finite.tensor(key, t)
            if key in params and tuple(t.shape) != tuple(params[key].shape):     # a dequantized linear's shape
                raise UserError(f"weight {key} in {model_dir} has shape {list(t.shape)}, but config.json gives "
                                f"the model {list(params[key].shape)}", "the checkpoint does not match its "
                                "config.json; restore it")
            if key in params and t.is_floating_point() and not any(k in key for k in keep_fp32):
                t = t.to(dt)
            state[key] = t.contiguous().to(dev)
    result = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith(expert_pfx)]
    config = model.config
    if config.tie_word_embeddings or getattr(getattr(config, "text_config", config), "tie_word_embeddings", False):
        missing = [k for k in missing if not k.startswith("lm_head")]
        model.tie_weights()
    if missing:
        raise UserError(f"checkpoint in {model_dir} lacks {len(missing)} weights (e.g. {missing[0]})",
                        "the checkpoint is incomplete or does not match its config.json")
    check_unused(family, config, model, result.unexpected_keys, model_dir)


def strip_experts(model, family, geo, dt, dev) -> None:
    """Replace the fused expert banks by empty placeholders (the runtime serves experts) and move the rest."""
    for layer in geo.moe_layers:
        experts = family.moe_block(model, layer).experts
        for name in ("gate_up_proj", "down_proj"):
            setattr(experts, name, torch.nn.Parameter(torch.empty(0, dtype=dt, device=dev), requires_grad=False))
    model.to(dev)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise UserError(f"no weights for {leftover[0]}", "the checkpoint is incomplete or does not match its config")


check = check_runtime       # every knob of a RuntimeConfig, before any weight is read (config.check_runtime)


def load(model_dir: str | None = None, rc: RuntimeConfig | None = None, *, progress=None, **overrides) -> Engine:
    """Load a VL-MoE checkpoint (a directory; None: the bundled model) with its routed experts offloaded; see the
    module docstring.

    `rc` carries every option (config.RuntimeConfig); keyword `overrides` replace fields of it (or of the
    defaults), e.g. `load(d, expert_budget="25%", policy="predictive")`. UserError for a bad option or checkpoint.
    """
    try:
        rc = replace(rc, **overrides) if rc is not None else RuntimeConfig(**overrides)
    except TypeError as e:
        raise UserError(f"unknown option: {e}", "see vismmoe.config.RuntimeConfig for the options") from None
    from ..checkpoints import default_model, shipped_calibration
    if model_dir is None:
        model_dir = default_model()[0]
    family = get_family(read_model_type(model_dir))
    if rc.compress != "none" and not family.has_vision:
        raise UserError(f"--compress {rc.compress} prunes visual tokens, and {family.model_type} is a text-only model",
                        "drop --compress")
    check_visual_top_k(rc.visual_top_k, family, None)
    shipped = shipped_calibration(model_dir)
    if rc.prefetch in ("trace", "blend") and rc.calibration is None and shipped is not None:
        rc = replace(rc, calibration=shipped)          # tables the checkpoint ships (the bundled model does)
    check(rc)
    dev = _resolve_device(rc.device)
    config = read_config(model_dir)
    dt = _resolve_dtype(rc.dtype, config, dev)
    geo = check_config(family, config, model_dir)       # values that contradict each other, before the model is built
    check_visual_top_k(rc.visual_top_k, family, geo.top_k)
    stored = stored_format(config)
    layout = make_format(run_format(rc.expert_format, stored), geo.hidden, geo.inter, dt)
    if dev.type == "cuda" and layout.kernel < 0:        # a format with no Triton variant (bf16 in a float32 model)
        raise UserError(f"--expert-format {layout.spec()} has no GPU kernel for a {str(dt).replace('torch.', '')} "
                        "model", "on CUDA load the model in bfloat16 (--dtype bfloat16), or use --expert-format dense")
    if rc.device_memory is None:                        # a budget below one layer's top-k, before any weight is read
        resolve_budget(rc, layout, geo, 0, config, dev)
    tokenizer, image_processor = _load_processors(family, config, model_dir)
    try:
        model = skeleton(family, config)
    except (ValueError, TypeError, ZeroDivisionError, IndexError, KeyError, RuntimeError) as e:
        # built from config.json alone, after its checks: a value they do not cover
        raise UserError(f"config.json in {model_dir} does not build a {family.model_type} model "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})", _CONFIG_FIX) from None
    banks = family.expert_banks(config)
    reader = CheckpointReader(model_dir, geo.hidden, geo.inter, rename=family.checkpoint_renamer(model), banks=banks)
    prefixes = [family.expert_prefix(l) for l in geo.moe_layers]
    reader.check_index()                       # index and shards agree, from the headers
    fallbacks = sorted({b.fallback for b in banks.values() if b.fallback is not None})
    check_weights(family, config, model, reader, prefixes + fallbacks, model_dir)
    source = expert_source(config, layout)     # the format, a layout's reader (AWQ) or a quantization on read
    for prefix in prefixes:                    # a broken expert tensor is reported before any weight moves
        source.check(reader, prefix, geo.num_experts)
    finite = FiniteCheck(rc.check_weights, model_dir)
    _load_nonexpert(model, family, reader, prefixes + fallbacks, dt, dev, model_dir, finite, stored)
    strip_experts(model, family, geo, dt, dev)
    nonexpert = device_bytes(model)

    budget = resolve_budget(rc, layout, geo, nonexpert, config, dev)
    pin = dev.type == "cuda"
    if rc.expert_tier == "host":
        store = HostStore.from_checkpoint(reader, prefixes, layout, geo.num_experts, pin=pin, progress=progress,
                                          source=source)
        finite.host_store(store, prefixes)
    else:
        store = DiskStore(reader, prefixes, layout, geo.num_experts, pin=pin, source=source)
        finite.disk_experts(store, prefixes)
    return Engine(model_dir=model_dir, family=family, config=config, model=model, tokenizer=tokenizer,
                  image_processor=image_processor, store=store, device=dev, dtype=dt, geometry=geo, layout=layout,
                  nonexpert_bytes=nonexpert, budget_bytes=budget, rc=rc)
