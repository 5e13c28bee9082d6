"""Sampling: per-request parameters, validated on construction, applied on device in one batch.

Letters: B batch, V vocab.

Greedy (temperature 0), temperature, top-k, top-p. Each request has its own seed and draws its
n-th token with key fold_in(key(seed), n), so a request samples the same tokens whatever batch it
shares, whenever it is scheduled, and after a preemption.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "stop_token_ids")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0           # 0: greedy
    top_k: int = 0                     # 0: off
    top_p: float = 1.0                 # 1: off
    seed: int = 0
    stop: tuple[str, ...] = ()         # stop strings (the completion ends before the first match)
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        def need(ok, field, why):
            if not ok:
                raise ValueError(f"sampling field {field}={getattr(self, field)!r}: {why}")
        need(isinstance(self.max_tokens, int) and not isinstance(self.max_tokens, bool) and self.max_tokens > 0,
             "max_tokens", "must be a positive integer")
        need(_number(self.temperature) and self.temperature >= 0, "temperature", "must be a number >= 0")
        need(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
             "top_k", "must be an integer >= 0 (0 = off)")
        need(_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be a number in (0, 1]")
        need(isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed < 2**32,
             "seed", "must be an integer in [0, 2**32)")
        need(isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
             "stop", "must be a list of non-empty strings")
        need(isinstance(self.stop_token_ids, tuple) and all(isinstance(t, int) for t in self.stop_token_ids),
             "stop_token_ids", "must be a list of integers")

    @classmethod
    def from_dict(cls, fields: dict, defaults: SamplingParams | None = None) -> SamplingParams:
        """Request fields over defaults; unknown fields and bad values raise ValueError."""
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise ValueError(f"unknown sampling field(s) {unknown}; known: {list(FIELDS)}")
        given = {k: _as_tuple(v) if k in ("stop", "stop_token_ids") else v for k, v in fields.items()}
        return dataclasses.replace(defaults or cls(), **given)


def _as_tuple(value):
    """A JSON stop field: one value or a list of them (anything else is left for validation)."""
    if isinstance(value, str | int):
        return (value,)
    return tuple(value) if isinstance(value, list | tuple) else value


def _number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x and abs(x) != float("inf")


def sample(logits: Float[Array, "B V"], temperature: Float[Array, " B"], top_k: Int[Array, " B"],
           top_p: Float[Array, " B"], seeds: Array, counters: Int[Array, " B"]) -> Int[Array, " B"]:
    """One token a row: argmax where temperature is 0, else a draw from the filtered softmax."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.lax.cond(jnp.any(temperature > 0), _draw, lambda *_: greedy,
                        logits, temperature, top_k, top_p, seeds, counters, greedy)


def _draw(logits, temperature, top_k, top_p, seeds, counters, greedy):
    order = jnp.argsort(-logits, axis=-1)                                         # [B, V] descending
    ranked = jnp.take_along_axis(logits, order, axis=-1) / jnp.maximum(temperature, 1e-6)[:, None]
    rank = jnp.arange(logits.shape[-1])[None]
    ranked = jnp.where((top_k[:, None] <= 0) | (rank < top_k[:, None]), ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs                                   # mass of higher-ranked tokens
    ranked = jnp.where(before < top_p[:, None], ranked, -jnp.inf)                 # rank 0 always stays
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)
    choice = jax.vmap(jax.random.categorical)(keys, ranked)                       # [B]
    drawn = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    return jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None
