"""The adapters a server has loaded, by name: the export's own at start, more by /v1/load_lora_adapter
(vLLM's name) from inside the export folder or --adapters-dir, each checked as `generate` checks it."""

from __future__ import annotations

from pathlib import Path

from qlora_rt.runtime.session import ADAPTER_SUFFIX, adapter_names, release_memory
from qlora_rt.server.protocol import APIError


class Adapters:
    def __init__(self, folder: Path, adapters_dir: str | Path | None, engine=None, classifier=None) -> None:
        self.folder, self.engine, self.classifier = folder, engine, classifier
        self.roots = [folder.resolve()] + ([Path(adapters_dir).resolve()] if adapters_dir else [])
        self.paths: dict[str, Path] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.paths

    def names(self) -> list[str]:
        return sorted(self.paths)

    def load_own(self) -> None:
        """The export's adapters/*.onnx_adapter, under their file names."""
        for name in adapter_names(self.folder):
            self.load(name, self.folder / "adapters" / f"{name}{ADAPTER_SUFFIX}")

    def resolve(self, lora_path: str) -> Path:
        """A client's lora_path: an .onnx_adapter file inside one of the roots (or a folder named like it)."""
        if "\x00" in lora_path:
            raise APIError(400, "lora_path: a path cannot hold a NUL character", "lora_path")
        path = Path(lora_path)
        path = (path if path.is_absolute() else self.roots[-1] / path).resolve()
        if not any(path.is_relative_to(r) for r in self.roots):
            raise APIError(400, "lora_path must be inside the export folder or --adapters-dir "
                                f"({', '.join(map(str, self.roots))})", "lora_path", "path_not_allowed")
        if path.is_dir() and (path / f"{path.name}{ADAPTER_SUFFIX}").is_file():  # a folder named like its file
            path = path / f"{path.name}{ADAPTER_SUFFIX}"
        if path.suffix != ADAPTER_SUFFIX or not path.is_file():
            raise APIError(400, f"lora_path: no {ADAPTER_SUFFIX} file at {lora_path} (make one with "
                                "`qlora-rt export-adapter`)", "lora_path")
        return path

    def load(self, name: str, path: Path) -> None:
        """Read and check the file (QloraError says what is wrong with it), then serve it under name."""
        if self.engine is not None:
            self.engine.add_adapter(name, path)
        else:
            self.classifier.labels(path)  # reads and checks it
        self.paths[name] = path

    def unload(self, name: str) -> None:
        if name not in self.paths:
            raise APIError(404, f"no adapter named {name!r} is loaded", "lora_name", "model_not_found",
                           "not_found_error")
        path = self.paths.pop(name)
        if self.engine is not None:
            self.engine.remove_adapter(name)  # requests using it finish with it; then its memory is freed
        else:
            self.classifier.forget(path)
            release_memory()

    def path(self, name: str) -> Path:
        return self.paths[name]

