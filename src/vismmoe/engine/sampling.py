"""Picking the next token from logits: greedy, or sampled with temperature, top-k and top-p (nucleus), seeded.

Owns the sampling parameters of a request, their validation (one-line errors) and the pick itself. Each row of a
batch has its own parameters and its own random generator, so a seeded request gives the same tokens whether it
runs alone or beside others. Temperature 0 is greedy: the argmax, exactly the token the greedy decode picks.
What a token means (text, stop strings) is the request's business (request.py), not this module's.

Order of the filters follows the common convention (Hugging Face `generate`, vLLM): logits / temperature, then
top-k, then top-p over what is left, then one draw from the renormalised distribution.

Every temperature and top_p in range is computed as asked, however small (1e-30, a float64 subnormal): a row's
logits are shifted so that their maximum is exactly 0 before they are divided by the temperature, in float64, so
the likeliest token keeps weight exp(0) = 1 and no division or exponent can give NaN; a tiny temperature or top_p
then leaves the argmax (and its exact ties), which is what the arithmetic of the distribution asks for. Logits
that hold NaN or +Inf (broken weights, an activation that overflowed) cannot be sampled: that row alone fails
with `NonFiniteLogits` and the others of its batch go on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import UserError


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens.

    temperature: 0 is greedy (argmax); otherwise logits are divided by it, in (0, 2].
    top_p: keep the smallest set of tokens whose probability sums to at least `top_p`, in (0, 1].
    top_k: keep the `top_k` most likely tokens; 0 keeps all.
    seed: seeds this request's own generator (None: drawn from the process's generator, not repeatable).
    """

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self):
        check_sampling(self)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(p: SamplingParams) -> None:
    """UserError (one line) for a parameter out of range."""
    if not (isinstance(p.temperature, (int, float)) and math.isfinite(p.temperature) and 0 <= p.temperature <= 2):
        raise UserError(f"temperature {p.temperature!r} is out of range", "give a temperature from 0 (greedy) to 2")
    if not (isinstance(p.top_p, (int, float)) and 0 < p.top_p <= 1):
        raise UserError(f"top_p {p.top_p!r} is out of range", "give top_p in (0, 1]")
    if not (isinstance(p.top_k, int) and p.top_k >= 0):
        raise UserError(f"top_k {p.top_k!r} is out of range", "give top_k >= 0 (0 keeps every token)")
    if p.seed is not None and not (isinstance(p.seed, int) and 0 <= p.seed < 2**63):
        raise UserError(f"seed {p.seed!r} is out of range", "give a seed from 0 to 2**63 - 1")


GREEDY = SamplingParams()


class NonFiniteLogits(UserError):
    """A sampled row's logits hold NaN or +Inf, or every token is -Inf: there is no distribution to draw from.
    The model's fault (weights with NaN/Inf, or an activation that overflowed its dtype), not the request's."""


class Sampler:
    """Per-row picks for a batch of B rows. `pick(logits [B, V]) -> [B] long` on the logits' device.

    A batch whose rows are all greedy takes one argmax (no copy of the logits); rows that sample draw from their
    own generator (made on the logits' device on first use, seeded from the row's `seed`). A sampled row whose
    logits cannot be sampled (`NonFiniteLogits`) is recorded in `errors` (row -> error) and given its argmax from
    then on; the caller ends that row, the other rows are unaffected."""

    def __init__(self, params: list[SamplingParams]):
        self.params = list(params)
        self.greedy = all(p.greedy for p in self.params)
        self._gens: list[torch.Generator | None] = [None] * len(self.params)
        self.errors: dict[int, NonFiniteLogits] = {}
        self._steps = 0

    def take(self, keep: list[int]) -> Sampler:
        """A sampler of rows `keep` (indices into this one, in their new order): their parameters, generators and
        errors."""
        out = Sampler([self.params[i] for i in keep])
        out._gens = [self._gens[i] for i in keep]
        out.errors = {j: self.errors[i] for j, i in enumerate(keep) if i in self.errors}
        out._steps = self._steps
        return out

    def joined(self, other: Sampler) -> Sampler:
        """A sampler of this one's rows, then `other`'s (each keeps its generator and errors)."""
        out = Sampler(self.params + other.params)
        out._gens = self._gens + other._gens
        out.errors = {**self.errors, **{len(self.params) + i: e for i, e in other.errors.items()}}
        out._steps = max(self._steps, other._steps)
        return out

    def _generator(self, r: int, device: torch.device) -> torch.Generator:
        g = self._gens[r]
        if g is None:
            g = torch.Generator(device=device)
            seed = self.params[r].seed
            g.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self._gens[r] = g
        return g

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] (any float dtype) -> next token per row [B] (long)."""
        out = logits.argmax(-1)                                              # [B]
        if self.greedy:
            return out
        step, self._steps = self._steps, self._steps + 1
        for r, p in enumerate(self.params):
            if p.greedy or r in self.errors:
                continue
            top = float(logits[r].max())                 # NaN when any logit is NaN (max propagates it)
            if not math.isfinite(top):
                self.errors[r] = NonFiniteLogits(
                    f"the model's logits for this request hold NaN or Inf (token {step + 1}): there is nothing to "
                    "sample from", "the checkpoint's weights may hold NaN/Inf, or a float16 activation overflowed: "
                    "check the weights, or run in bfloat16 or float32")
                continue
            out[r] = sample_row(logits[r], p, self._generator(r, logits.device))
        return out


def sample_row(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator) -> torch.Tensor:
    """One draw from logits [V] (finite maximum; -Inf entries are tokens ruled out) under `p` (not greedy): a 0-d
    long tensor. In float64, from logits shifted to a maximum of exactly 0 (see the module docstring)."""
    x = logits.double()
    x = x - x.max()                                                        # [V], <= 0; the argmax is 0
    if 0 < p.top_k < x.shape[0]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    x = x / p.temperature           # 0 stays 0 for any temperature > 0; the rest may go to -inf: exp underflows
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x, descending=True)
        probs = sorted_x.softmax(-1)
        # drop a token when the tokens before it already reach top_p; the first token always stays, whatever
        # top_p (a positive top_p that float arithmetic cannot tell from 0 would otherwise drop it)
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[0] = False
        x = x.index_put((order[drop],), torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))
    probs = x.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen)[0]
