"""What the routes share, typed: the export, its model (a decoder's engine, or a classifier), its adapters."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from qlora_rt.runtime.manifest import Manifest
from qlora_rt.server.adapters import Adapters
from qlora_rt.server.protocol import APIError


@dataclass
class State:
    """What the routes share: the export, its model (a decoder's engine, or a classifier) and its adapters."""
    folder: Path
    meta: Manifest
    base_name: str  # the model name that picks the base
    adapters: Adapters
    engine: object | None = None      # runtime.batching.Engine (decoder exports)
    model: object | None = None       # runtime.decoder.Model
    grammars: object | None = None    # runtime.constrained.Grammars
    classifier: object | None = None  # runtime.classifier.Classifier (encoder exports)
    metrics: object | None = None     # server.metrics.Metrics
    max_prompt_chars: int = 0  # longer text cannot fit the context (check_length); 0 = no limit
    created: int = field(default_factory=lambda: int(time.time()))

    def check_length(self, chars: int, field: str) -> None:
        """Refuse, before tokenizing, text of more characters than the context's tokens could ever cover."""
        if self.max_prompt_chars and chars > self.max_prompt_chars:
            capacity = self.engine.capacity if self.engine is not None else 0
            raise APIError(400, f"{field}: {chars:,} characters cannot fit this server's context of {capacity} tokens "
                                "(--max-seq-len)", field, "context_length_exceeded")

    def resolve_model(self, name: str) -> str | None:
        """The adapter a model name picks (None = the base), or 404."""
        if name == self.base_name:
            return None
        if name in self.adapters:
            return name
        raise APIError(404, f"the model {name!r} does not exist; GET /v1/models lists them ({self.base_name} and "
                            "its adapters)", "model", "model_not_found", "not_found_error")

    def decoder(self):
        if self.engine is None:
            raise APIError(400, f"{self.folder} is a classifier (encoder) export; use /v1/classify", None,
                           "wrong_endpoint")
        return self.engine
