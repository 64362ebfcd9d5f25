"""The browser runtime's speed: one export folder's page (`qlora-rt web`) in headless Chromium (onnxruntime-web,
wasm) against qlora-rt's own runtime on the same folder, base and adapter, greedy, one stream.

    python bench/web.py --export onnx/my-model [--adapter default] [--prompt-tokens 128] [--new 128]

Prints the page's load time, then a table: runtime x adapter -> decode tok/s (the tokens after the first) and
time to the first token, and whether the two runtimes' tokens are equal. Needs `make setup-web`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_web import SOFTWARE_WEBGPU, run_page  # noqa: E402  (the tests' driver: serves the site, runs Chromium)

from qlora_rt.runtime import Model  # noqa: E402
from qlora_rt.runtime.web import build_site  # noqa: E402

TEXT = ("The history of the written date is long: calendars differed from town to town, and merchants who "
        "traded across borders wrote the day, the month and the year in whatever order their clerks preferred. ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", required=True, type=Path)
    ap.add_argument("--adapter", default="default", help="adapter name under adapters/ (none: base only)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", choices=("wasm", "webgpu"), default="wasm",
                    help="webgpu: Chromium's software adapter (SwiftShader) where there is no GPU: tokens, not speed")
    args = ap.parse_args()
    ours = Model(args.export)
    ids = ours.tokenizer.encode(TEXT * 20, add_special_tokens=False).ids[: args.prompt_tokens]
    names = [None] + ([args.adapter] if args.adapter != "none" else [])
    with tempfile.TemporaryDirectory() as tmp:
        site = build_site(args.export, Path(tmp) / "site")
        cases = [{"api": {"prompt": None, "options": {"ids": ids, "adapter": name, "maxNewTokens": args.new,
                                                      "ignoreEos": True}}}
                 for _ in range(args.repeats) for name in names]
        extra = {"chromiumArgs": SOFTWARE_WEBGPU, "query": "?device=webgpu"} if args.device == "webgpu" else {}
        out = run_page(site, cases, Path(tmp), timeout=1800, **extra)
    page = out["page"]
    print(f"page: loaded in {page['loadSeconds']:.2f} s ({page['pageSeconds']:.2f} s to ready), "
          f"cross-origin isolated: {page['crossOriginIsolated']}; {page['status']}")
    print(f"{'runtime':<26}{'adapter':<10}{'decode tok/s':>13}{'ms/token':>10}{'first token s':>15}  tokens equal")
    for i, name in enumerate(names):
        web = out["results"][i::len(names)]
        py = [ours.generate_ids([ids], adapter=name, max_new_tokens=args.new, ignore_eos=True)[0]
              for _ in range(args.repeats)]
        # the page's replies against the native one: equal, or how many leading tokens are
        same = min(next((k for k, (a, b) in enumerate(zip(r["tokens"], py[0].tokens)) if a != b), len(r["tokens"]))
                   for r in web)
        equal = "yes" if all(r["tokens"] == py[0].tokens for r in web) else f"the first {same} of {args.new}"
        for label, tps, ttft in (
                (f"onnxruntime-web ({page['device']})", [r["decodeTokensPerSecond"] for r in web],
                 [r["ttftSeconds"] for r in web]),
                ("qlora-rt (native)", [c.decode_tokens_per_s for c in py], [c.ttft_s for c in py])):
            rate = statistics.median(tps)
            print(f"{label:<26}{name or 'base':<10}{rate:>13.2f}{1000 / rate if rate else 0:>10.1f}"
                  f"{statistics.median(ttft):>15.2f}  {equal if label.startswith('onnx') else ''}")
    print(json.dumps({"page": page}), file=sys.stderr)


if __name__ == "__main__":
    main()
