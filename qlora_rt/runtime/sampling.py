"""How the next token is chosen from a row's logits: greedy, or seeded sampling with temperature, top-k and
top-p, after OpenAI's logit bias and presence/frequency penalties; and stop strings. One module for the
runtime's generate/stream, the serving engine and the HTTP API (whose request fields take these ranges)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from qlora_rt.errors import QloraError

PENALTY = (-2.0, 2.0)  # presence_penalty, frequency_penalty (OpenAI's range)
LOGIT_BIAS = (-100.0, 100.0)  # each token's bias (OpenAI's range)
SEED_LIMIT = 2**63  # a seed is in [0, SEED_LIMIT)


@dataclass
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) cut to top_k, then to top_p mass.
    Before either, as OpenAI's API defines them: logit_bias {token: b} added, and for each token already
    generated presence_penalty subtracted once and frequency_penalty once per time it was generated."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    def check(self, vocab: int | None = None) -> None:
        """The one range check of every knob (the CLI, the Python API and the server all come here)."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise QloraError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:  # NaN fails this too
            raise QloraError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise QloraError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise QloraError(f"seed must be in [0, 2**63), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not PENALTY[0] <= getattr(self, name) <= PENALTY[1]:  # NaN fails this too
                raise QloraError(f"{name} must be in [{PENALTY[0]:g}, {PENALTY[1]:g}], got {getattr(self, name)}")
        bias = self.logit_bias or {}
        if any(not LOGIT_BIAS[0] <= b <= LOGIT_BIAS[1] for b in bias.values()):
            raise QloraError(f"logit_bias: each bias must be in [{LOGIT_BIAS[0]:g}, {LOGIT_BIAS[1]:g}]")
        if vocab is not None and any(not 0 <= t < vocab for t in bias):
            raise QloraError(f"logit_bias: token ids must be in [0, {vocab})")

    @property
    def adjusts(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)

    def adjust(self, logits: np.ndarray, generated: list[int]) -> np.ndarray:
        """One row's logits (V,) with the bias and penalties applied (a copy), or the row itself without any."""
        if not self.adjusts:
            return logits
        z = logits.astype(np.float32, copy=True)
        if self.logit_bias:
            z[np.fromiter(self.logit_bias, np.int64)] += np.fromiter(self.logit_bias.values(), np.float32)
        if generated and (self.presence_penalty or self.frequency_penalty):
            ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
            z[ids] -= self.frequency_penalty * counts + self.presence_penalty
        return z

    def pick(self, logits: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One token per row of logits (B, V)."""
        if self.temperature == 0:
            return logits.argmax(-1)
        z = logits.astype(np.float64) / self.temperature
        if 0 < self.top_k < z.shape[-1]:
            kth = np.partition(z, -self.top_k, axis=-1)[:, -self.top_k][:, None]
            z = np.where(z < kth, -np.inf, z)
        p = np.exp(z - z.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        if self.top_p < 1:
            order = np.argsort(-p, axis=-1)
            sorted_p = np.take_along_axis(p, order, -1)
            drop = np.cumsum(sorted_p, -1) - sorted_p >= self.top_p  # keep the smallest set reaching top_p
            np.put_along_axis(p, order, np.where(drop, 0.0, sorted_p), -1)
            p /= p.sum(-1, keepdims=True)
        return np.array([rng.choice(p.shape[-1], p=row) for row in p])


def stop_strings(stop) -> tuple[str, ...]:
    """Stop strings: one string, or several (a str is one stop string, not its characters)."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if not all(isinstance(s, str) for s in stops):
        raise QloraError(f"stop: expected a string or a list of strings, got {stop!r:.60}")
    return stops
