"""The hostile round against a live `qlora-rt serve`: what each attack costs the server (its RSS, the time to
an answer) and what the client gets. The server runs as a subprocess, as a user starts it.

    python bench/serve_hostile.py --export onnx/my-model [--adapter default]

Attacks: a 200 MiB chunked body; a 29 MiB completions prompt (under the body limit); 50 prompts x n=16;
50 loads and unloads of an adapter (copies of --adapter under a temporary --adapters-dir); a 5 GiB sparse
adapter file; a non-streaming request whose client leaves. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--adapter", default="default", help="an adapter under the export's adapters/")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="hostile-"))
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "qlora_rt", "serve", str(args.export), "--port", str(port),
                               "--adapters-dir", str(scratch)], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        base_name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        start = rss_mib(server.pid)
        rows.append(("server started", "", f"{start:,.0f}", ""))

        def record(what, t0, status):
            rows.append((what, str(status), f"{rss_mib(server.pid):,.0f}", f"{time.perf_counter() - t0:.2f}"))

        # 1. a 200 MiB chunked body
        t0 = time.perf_counter()
        status = "connection closed"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n")
            chunk, sent = b"a" * (1 << 20), 0
            try:
                while sent < 200 << 20:
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
                reply = s.recv(4096)
            except OSError:
                reply = b""
            if reply:
                status = reply.split(b"\r\n")[0].decode()
        record(f"200 MiB chunked body ({sent >> 20} MiB sent before the server closed)", t0, status)
        # 2. a 29 MiB prompt, under the body limit
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"model": base_name, "prompt": "word " * (6 << 20)}, timeout=300)
        record("29 MiB completions prompt", t0, f"{r.status_code} {r.json()['error']['code']}")
        # 3. 50 prompts x n=16
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"model": base_name, "prompt": ["hi"] * 50, "n": 16,
                                                      "max_tokens": 4}, timeout=300)
        record("50 prompts x n=16", t0, f"{r.status_code} {r.json().get('error', {}).get('message', '')[:60]}")
        health = httpx.get(url + "/health").json()
        rows.append(("  then /health", "", "", f"running {health['running']}, waiting {health['waiting']}"))
        # 4. 50 loads and unloads
        src = args.export / "adapters" / f"{args.adapter}.onnx_adapter"
        t0 = time.perf_counter()
        for i in range(50):
            shutil.copy(src, scratch / f"x{i}.onnx_adapter")
            r = httpx.post(url + "/v1/load_lora_adapter",
                           json={"lora_name": f"x{i}", "lora_path": f"x{i}.onnx_adapter"})
            assert r.status_code == 200, r.text
        record("50 adapters loaded", t0, 200)
        t0 = time.perf_counter()
        for i in range(50):
            httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": f"x{i}"})
        time.sleep(1)
        httpx.get(url + "/health")
        record("... and unloaded", t0, 200)
        # 5. a 5 GiB sparse file
        with open(scratch / "sparse.onnx_adapter", "wb") as f:
            f.truncate(5 << 30)
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "sparse", "lora_path": "sparse.onnx_adapter"})
        record("5 GiB sparse adapter file", t0, r.status_code)
        # 6. a non-streaming client that leaves
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            body = json.dumps({"model": base_name, "prompt": "hi", "max_tokens": 1500, "ignore_eos": True}).encode()
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            time.sleep(1)
        t0 = time.perf_counter()
        while httpx.get(url + "/health").json()["running"] and time.perf_counter() - t0 < 60:
            time.sleep(0.05)
        record("non-streaming client left after 1 s: its row freed after", t0, "")
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"| attack | client got | server RSS MiB | seconds |  ({args.export}, {time.strftime('%Y-%m-%d')})")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"server exit status {server.returncode} (SIGTERM)", file=sys.stderr)


if __name__ == "__main__":
    main()
