"""The package's layers are a checked contract: each stage imports only from the stages below it, nothing
imports in a cycle, and the runtime (what ships to devices) cannot reach torch.

Read statically from the source (every import statement, those inside functions too), so a lazy import
that would only fail on a torch-free machine fails here.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lowest first; a module may import from its own layer and the layers below it
LAYERS = [
    ("shared", ["qlora_rt", "qlora_rt.errors", "qlora_rt.files", "qlora_rt.jsonl", "qlora_rt.flags",
                "qlora_rt.families", "qlora_rt.config"]),
    ("runtime", ["qlora_rt.runtime"]),
    ("server", ["qlora_rt.server"]),
    ("base", ["qlora_rt.base"]),
    ("lora", ["qlora_rt.lora"]),
    ("train", ["qlora_rt.train"]),
    ("trained", ["qlora_rt.trained", "qlora_rt.merge"]),
    ("export", ["qlora_rt.export"]),
    ("cli", ["qlora_rt.cli", "qlora_rt.__main__"]),
]
# third-party packages that only the training and export extras install
TORCH_SIDE = {"torch", "transformers", "bitsandbytes", "safetensors", "accelerate", "gguf", "peft", "onnx", "tqdm"}


def _modules() -> dict[str, Path]:
    """Every module of the installed package, under the name it imports as (export/ is qlora_rt.export)."""
    found = {}
    for root, prefix in ((REPO / "qlora_rt", "qlora_rt"), (REPO / "export", "qlora_rt.export")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([prefix, *parts])] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules (of this package, or top-level third-party names) that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub where one exists
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            out.add(t if t.split(".")[0] == "qlora_rt" else t.split(".")[0])
    return out


def _layer(module: str) -> int:
    best, level = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level >= 0, f"{module} belongs to no layer: add it to LAYERS"
    return level


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_stage_imports_a_stage_above_it(graph):
    climbs = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in graph.items() for t in sorted(targets)
              if t.startswith("qlora_rt") and _layer(t) > _layer(m)]
    assert not climbs, "\n".join(climbs)


def test_runtime_and_shared_modules_never_reach_torch(graph):
    low = [m for m in graph if _layer(m) <= 2]  # shared, runtime, server
    assert "qlora_rt.runtime.decoder" in low and "qlora_rt.jsonl" in low and "qlora_rt.server.routes" in low
    bad = [f"{m} imports {t}" for m in low for t in sorted(graph[m]) if t in TORCH_SIDE]
    assert not bad, "\n".join(bad)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> list[str] | None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if t not in graph or t == m or m.startswith(t + "."):  # a package's own __init__ is not a cycle
                continue
            if state.get(t) == 1:
                return path + [m, t]
            if t not in state and (cycle := visit(t, path + [m])):
                return cycle
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]):]))


def test_the_checker_sees_a_climb_and_a_lazy_torch_import(tmp_path):
    """The checks above can fail: a lazy import inside a function is seen, relative imports resolve."""
    src = tmp_path / "qlora_rt" / "runtime"
    src.mkdir(parents=True)
    (src / "x.py").write_text(textwrap.dedent("""
        def f():
            import torch
            from qlora_rt.train import run
            from ..lora import layers
    """))
    modules = {"qlora_rt.runtime.x": src / "x.py", "qlora_rt.train.run": src, "qlora_rt.lora.layers": src}
    got = _imports("qlora_rt.runtime.x", src / "x.py", modules)
    assert got == {"torch", "qlora_rt.train.run", "qlora_rt.lora.layers"}
    assert _layer("qlora_rt.train.run") > _layer("qlora_rt.runtime.x")


def test_every_runtime_module_imports_with_torch_unimportable():
    names = [m for m in _modules() if _layer(m) <= 2]
    code = textwrap.dedent(f"""
        import importlib, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {sorted(TORCH_SIDE)!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

        sys.meta_path.insert(0, Block())
        for m in {names!r}:
            importlib.import_module(m)
        print(len({names!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
