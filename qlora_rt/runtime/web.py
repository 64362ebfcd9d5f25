"""`qlora-rt web EXPORT --out SITE`: a static site that runs a decoder export in the visitor's browser.

The site is plain files: the page (index.html, app.mjs), the browser runtime (qlora-rt.mjs: onnxruntime-web on
WebGPU or wasm, an adapter's tensors fed as the graph's LoRA inputs; tokenizers.js, jinja), those npm packages'
browser builds under vendor/, and the export under model/ (its adapters checked as `generate` checks them; its
graph with two inputs' defaults changed for the page, `_page_graph`). Any static host serves it; the
host computes nothing. `--serve` serves it here, with the two headers that let onnxruntime-web use several
threads (cross-origin isolation). Torch-free.

The npm packages come from the `node_modules` that `npm ci` writes beside qlora_rt/web/package.json (the
versions its lockfile pins), or from --node-modules.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from qlora_rt.config import LOOPBACK, host_name
from qlora_rt.errors import QloraError
from qlora_rt.files import atomic_dir, check_out
from qlora_rt.runtime import graph_io as io
from qlora_rt.runtime import manifest
from qlora_rt.runtime.session import ADAPTER_DIR, ADAPTER_SUFFIX, adapter_names, read_adapter_file

WEB = Path(__file__).resolve().parents[1] / "web"  # the page, the runtime module, package.json + lockfile
PAGE = ("index.html", "app.mjs", "qlora-rt.mjs")
SITE, SITE_FORMAT = "qlora_rt_site.json", "qlora-rt-web"
# each npm package: the files the browser loads, and the import names the import map gives them (onnxruntime-web:
# the wasm build, and the WebGPU one, whose wasm part is the asyncify build)
VENDOR = {
    "onnxruntime-web": ("dist", ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm",
                                 "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs",
                                 "ort-wasm-simd-threaded.asyncify.wasm"),
                        {"onnxruntime-web": "ort.wasm.min.mjs", "onnxruntime-web/webgpu": "ort.webgpu.min.mjs"}),
    "@huggingface/tokenizers": ("dist", ("tokenizers.min.mjs",), {"@huggingface/tokenizers": "tokenizers.min.mjs"}),
    "@huggingface/jinja": ("dist", ("index.js",), {"@huggingface/jinja": "index.js"}),
}
# what the page fetches from an export besides model.onnx, its external data and adapters
MODEL_FILES = ("qlora_rt_export.json", "tokenizer.json", "tokenizer_config.json")
# wasm32 addresses 4 GB, which the model's bytes, their copy in onnxruntime-web and its work buffers share
WASM_MODEL_LIMIT = 2 * 2**30
OPTIONAL_FILES = ("chat_template.jinja", "generation_config.json", "config.json")


def pinned_versions() -> dict[str, str]:
    """The npm packages the page needs, at the versions package.json pins."""
    deps = json.loads((WEB / "package.json").read_text())["dependencies"]
    return {name: deps[name] for name in VENDOR}


def find_node_modules(given: str | None) -> Path:
    """The node_modules folder holding VENDOR's packages at the pinned versions, or one line saying how to get it."""
    folder = Path(given) if given else WEB / "node_modules"
    install = (f"install them with `npm ci --omit=dev --prefix {WEB}` (Node.js 18 or newer), or pass "
               "--node-modules DIR where they are installed")
    for name, version in pinned_versions().items():
        meta = folder / name / "package.json"
        if not meta.is_file():
            raise QloraError(f"the browser runtime needs the npm package {name} {version}, not found in {folder}; "
                             f"{install}")
        found = json.loads(meta.read_text()).get("version")
        if found != version:
            raise QloraError(f"{meta}: {name} {found}; the browser runtime is tested with {version}: {install}")
    return folder


def _place(src: Path, dst: Path) -> None:
    """A hard link where the file system allows one (an export's data can be GBs), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """A protobuf varint at `at`: (value, the position after it)."""
    value = shift = 0
    while True:
        if at >= len(data):
            raise QloraError("model.onnx: the graph ends inside a field (a damaged file?); export it again")
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if byte < 0x80:
            return value, at


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(data: bytes):
    """A protobuf message's fields in order: (number, wire type, start, value start, end); a length-delimited
    field's value is data[value start:end]. (ONNX writes no groups, wire types 3 and 4.)"""
    at = 0
    while at < len(data):
        start = at
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, end = _varint(data, at)
        elif wire == 2:
            size, at = _varint(data, at)
            end = at + size
        elif wire in (1, 5):
            end = at + (8 if wire == 1 else 4)
        else:
            raise QloraError(f"model.onnx: protobuf wire type {wire} where ONNX writes none; export it again")
        if end > len(data):
            raise QloraError("model.onnx: the graph ends inside a field (a damaged file?); export it again")
        yield number, wire, start, at, end
        at = end


def _tensor_name(tensor: memoryview) -> str | None:
    return next((bytes(tensor[v:e]).decode() for n, w, _, v, e in _fields(tensor) if n == 8 and w == 2), None)


def _page_graph(src: Path, dst: Path, lora_inputs: set[str]) -> None:
    """model.onnx for the page, its weights untouched, two of its inputs' defaults (initializers) changed:

    - `logits_to_keep`'s, 0 (every position's logits), set to 1 (the last position's, all the page reads).
      onnxruntime-web lets a run feed no input that has a default, so the page cannot ask for it; without it a
      prompt's chunk computes the head for each of its positions (Gemma 3: 262,144 logits, 1 MiB, a position).
    - the LoRA inputs' rank-0 defaults removed: the inputs become ones a run feeds (for the same reason), so on
      WebGPU the page feeds an adapter's weights as tensors already on the GPU, and the cache can stay there
      (onnxruntime-web binds a run's outputs to the GPU only where the run feeds every input itself); the
      base is fed the same rank-0 tensors the defaults were.

    Done on the protobuf's bytes (ModelProto field 7, the graph; GraphProto field 5, its initializers; a
    TensorProto's name, field 8): the runtime does not depend on the onnx package."""
    data = memoryview(src.read_bytes())  # slices of it are views: an inline weight is copied once, into `out`
    name = io.LOGITS_TO_KEEP.encode()  # a 0-d int64 tensor (data_type 7) holding 1, as raw data (8 bytes)
    keep = b"\x10\x07" + b"\x42" + _encode_varint(len(name)) + name + b"\x4a\x08" + (1).to_bytes(8, "little")
    out = bytearray()
    for number, wire, start, value, end in _fields(data):
        if number != 7 or wire != 2:  # not the graph
            out += data[start:end]
            continue
        graph, old = bytearray(), data[value:end]
        for g_number, g_wire, g_start, g_value, g_end in _fields(old):
            field = old[g_start:g_end]
            if g_number == 5 and g_wire == 2:  # an initializer
                found = _tensor_name(field[g_value - g_start:])
                if found in lora_inputs:
                    continue
                if found == io.LOGITS_TO_KEEP:
                    field = _encode_varint(5 << 3 | 2) + _encode_varint(len(keep)) + keep
            graph += field
        out += _encode_varint(7 << 3 | 2) + _encode_varint(len(graph)) + graph
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(bytes(out))


def build_site(export: str | Path, out: str | Path, node_modules: str | None = None, overwrite: bool = False) -> Path:
    """Write the site for a decoder export; returns its folder."""
    export, out = Path(export), Path(out)
    meta = manifest.read(export)
    manifest.expect(meta, "decoder", export, "web")
    check_out(out, overwrite, SITE, SITE_FORMAT, "web", reads=(str(export),))
    modules = find_node_modules(node_modules)
    for name in MODEL_FILES:
        if not (export / name).is_file():
            raise QloraError(f"{export} has no {name} (the export writes one); export it again")
    names = adapter_names(export) if meta.mode == "adapter-aware" else []
    for name in names:  # the checks `generate` makes, here, not as a wrong answer in a visitor's browser
        read_adapter_file(export / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}", meta)
    versions = pinned_versions()
    imports = {}
    with atomic_dir(out) as tmp:
        for name in PAGE:
            shutil.copyfile(WEB / name, tmp / name)
        for package, (sub, files, entries) in VENDOR.items():
            short = package.split("/")[-1]
            (tmp / "vendor" / short).mkdir(parents=True)
            for f in files:
                shutil.copyfile(modules / package / sub / f, tmp / "vendor" / short / f)
            imports.update({name: f"./vendor/{short}/{entry}" for name, entry in entries.items()})
        page = (tmp / "index.html").read_text()
        marker = '<script type="importmap">{"imports": {}}</script>'
        (tmp / "index.html").write_text(page.replace(marker, '<script type="importmap">' +
                                                     json.dumps({"imports": imports}) + "</script>"))
        model = tmp / "model"
        for name in (*MODEL_FILES, *OPTIONAL_FILES, *meta.external_data):
            if (export / name).is_file():
                _place(export / name, model / name)
        _page_graph(export / "model.onnx", model / "model.onnx", set(meta.lora_inputs or {}))
        for name in names:
            _place(export / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}", model / ADAPTER_DIR / f"{name}{ADAPTER_SUFFIX}")
        (model / "adapters.json").write_text(json.dumps(names))
        # the export's folder name only: the site is published, and a path on this machine is not the visitor's
        (tmp / SITE).write_text(json.dumps({"format": SITE_FORMAT, "export": export.resolve().name,
                                            "mode": meta.mode, "adapters": names, "npm": versions}, indent=2))
    size = sum((export / name).stat().st_size for name in ("model.onnx", *meta.external_data))
    if size > WASM_MODEL_LIMIT:
        print(f"note: {export}'s model is {size / 2**30:.1f} GiB; onnxruntime-web's wasm build (the CPU) addresses "
              "4 GB in all and will not load it: the page needs WebGPU (docs/devices.md#browser)", file=sys.stderr)
    if meta.weights in ("int4", "nf4"):
        print(f"note: {export} holds {meta.weights} weights, which onnxruntime-web's wasm build (the CPU) has no "
              "kernel for: it dequantizes them every step, so the page decodes a few tokens a second there. "
              "`qlora-rt export --weights int8` writes the page's fast format (docs/devices.md#browser)",
              file=sys.stderr)
    if meta.int4_activations == "int8":
        print(f"note: {export} computes its 4-bit products with int8 activations natively (export's default), and "
              "onnxruntime-web computes them with fp32 ones: the page's tokens can part from `qlora-rt generate`'s "
              "after a few tokens. Export with --int4-compute fp32 for native tokens equal to the page's "
              "(docs/devices.md#browser)", file=sys.stderr)
    return out


def serve(site: str | Path, host: str = "127.0.0.1", port: int = 8000, announce: bool = True):
    """Serve a site folder over HTTP (blocks). Sends the headers that make the page cross-origin isolated, so
    onnxruntime-web may run several threads (SharedArrayBuffer)."""
    server = make_server(site, host, port)
    if announce:
        where = f"http://{'localhost' if host in ('127.0.0.1', '::1') else host}:{server.server_address[1]}/"
        print(f"serving {site} on {where} (Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def allowed_host(header: str | None, host: str) -> bool:
    """Whether a request's Host header names this server: a loopback bind answers only loopback names (a page on
    another origin that rebinds its DNS name to 127.0.0.1 sends its own name, and is refused), as `serve` does;
    a bind to one address answers that address or name; a bind to every interface (0.0.0.0, ::) answers any."""
    if host in ("0.0.0.0", "::", ""):
        return True
    if not header:
        return False
    name = host_name(header)
    return name in LOOPBACK if host in LOOPBACK else name == host_name(host)


def make_server(site: str | Path, host: str = "127.0.0.1", port: int = 0):
    """A ThreadingHTTPServer for the site folder (port 0 = any free port: server.server_address[1]). It serves the
    site's files only: no directory listings, nothing a symlink inside points to outside it, and only requests
    whose Host names this server (`allowed_host`)."""
    import functools
    from http import HTTPStatus
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    site = Path(site)
    if not (site / SITE).is_file():
        raise QloraError(f"{site} is not a site written by `qlora-rt web` (no {SITE})")
    root = os.path.realpath(site)

    class Handler(SimpleHTTPRequestHandler):
        extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript",
                          ".js": "text/javascript", ".wasm": "application/wasm", ".json": "application/json",
                          ".onnx": "application/octet-stream", ".onnx_adapter": "application/octet-stream"}

        def send_head(self):
            if not allowed_host(self.headers.get("Host"), host):
                self.send_error(HTTPStatus.FORBIDDEN, "this server answers requests for its own host name only")
                return None
            found = os.path.realpath(self.translate_path(self.path))
            if found != root and not found.startswith(root + os.sep):  # a symlink in the site leads out of it
                self.send_error(HTTPStatus.NOT_FOUND, "no such file")
                return None
            return super().send_head()

        def list_directory(self, path):
            self.send_error(HTTPStatus.NOT_FOUND, "no such file")
            return None

        def end_headers(self):
            self.send_header("Cross-Origin-Opener-Policy", "same-origin")
            self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
            self.send_header("Cross-Origin-Resource-Policy", "same-origin")
            super().end_headers()

        def log_request(self, code="-", size="-"):  # one line per failed request only
            if str(getattr(code, "value", code)).startswith(("4", "5")):
                super().log_request(code, size)

        def log_error(self, format, *args):  # its request's line says it
            pass

    try:
        return ThreadingHTTPServer((host, port), functools.partial(Handler, directory=str(site)))
    except OSError as e:
        raise QloraError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
