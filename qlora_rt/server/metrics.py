"""`GET /metrics`: the server's state in Prometheus' text format (prometheus_client), one registry per app.

    qlora_rt_requests_total{model, status}            requests answered, by model name and HTTP status (a name
                                                      that is not the base or a loaded adapter counts as
                                                      "unknown": a client's names never become labels)
    qlora_rt_prompt_tokens_total{model}               prompt tokens taken in
    qlora_rt_generation_tokens_total{model}           tokens generated
    qlora_rt_prefix_cache_tokens_total                prompt tokens taken from the prefix cache, not run
    qlora_rt_rows_running / qlora_rt_rows_waiting     the engine's rows now
    qlora_rt_adapters_loaded                          adapters resident
    qlora_rt_step_seconds                             one decode step of the engine (histogram)
    qlora_rt_time_to_first_token_seconds{model}       from a row's arrival to its first token (histogram)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from qlora_rt.server.state import State

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, state: State) -> None:
        self.state = state
        self.registry = r = CollectorRegistry()
        self.requests = Counter("qlora_rt_requests", "requests answered", ["model", "status"], registry=r)
        self.prompt_tokens = Counter("qlora_rt_prompt_tokens", "prompt tokens taken in", ["model"], registry=r)
        self.generated = Counter("qlora_rt_generation_tokens", "tokens generated", ["model"], registry=r)
        self.ttft = Histogram("qlora_rt_time_to_first_token_seconds", "from a row's arrival to its first token",
                              ["model"], buckets=_SECONDS, registry=r)
        self.step = Histogram("qlora_rt_step_seconds", "one decode step of the engine", buckets=_SECONDS, registry=r)
        Gauge("qlora_rt_adapters_loaded", "adapters resident", registry=r).set_function(
            lambda: len(state.adapters.names()))
        engine = state.engine
        if engine is not None:
            Gauge("qlora_rt_rows_running", "rows decoding or in their prompt", registry=r).set_function(
                lambda: engine.load[0])
            Gauge("qlora_rt_rows_waiting", "rows waiting for a free row", registry=r).set_function(
                lambda: engine.load[1])
            self._cached = Counter("qlora_rt_prefix_cache_tokens", "prompt tokens taken from the prefix cache, "
                                   "not run", registry=r)
            self._engine, self._seen = engine, 0
            engine.on_step = self.step.observe
            engine.on_first_token = lambda adapter, seconds: self.ttft.labels(
                adapter if adapter is not None else state.base_name).observe(seconds)

    _engine = None

    def render(self) -> bytes:
        if self._engine is not None:  # the engine counts; the counter follows it
            now = self._engine.prefix_tokens
            self._cached.inc(now - self._seen)
            self._seen = now
        return generate_latest(self.registry)

    def finished(self, model: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generated.labels(model).inc(completion_tokens)

    def answered(self, scope, status: int) -> None:
        """Guard's callback once a response started: the model the route read from the body, if any, as a label
        only where it names the base or a loaded adapter (each label value is kept for the server's life)."""
        model = scope.get("state", {}).get("model", "")
        self.requests.labels(self.label(model), str(status)).inc()

    def label(self, model) -> str:
        if not model or not isinstance(model, str):
            return ""
        return model if model == self.state.base_name or model in self.state.adapters.names() else "unknown"
