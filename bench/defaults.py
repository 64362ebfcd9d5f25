"""The README's flow with no format flags, on the bundled SmolLM2-135M: does every export pass its own check?

    python bench/defaults.py [--steps 3] [--work runs/defaults]

Runs the CLI as a user does (each command its own process, timed, peak RSS from /usr/bin/time -v where
present) and prints one row per command: passed or refused, max |dlogit|, mean KL and top-1 agreement of
next-token distributions vs the trained PyTorch model. The held-out quality of the default path is the
demo's (`make demo` trains and exports with these defaults).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
MODEL = "smollm2-135m"


def run(args: list[str]) -> dict:
    timer = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    p = subprocess.run([*timer, sys.executable, "-m", "qlora_rt", *args], capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    lines = [x for x in p.stderr.splitlines() if x.startswith("qlora-rt") or "export check failed" in x]
    return {"ok": p.returncode == 0, "seconds": time.perf_counter() - t0,
            "peak_gib": int(rss.group(1)) / 2**20 if rss else None, "error": lines[-1] if lines else p.stderr[-300:]}


def export_row(name: str, args: list[str], out: Path) -> dict:
    r = run(["export", "--model", MODEL, "--out", str(out), *args])
    if r["ok"]:
        rep = json.loads((out / "export_report.json").read_text())
        r.update(max_dlogit=rep["max_abs_logit_diff"], kl=rep["mean_kl"], top1=rep["top1_agreement"],
                 weights=rep["weights"], head=rep.get("head"))
    else:
        kl = re.search(r"mean KL ([\d.e-]+).*?agreement ([\d.]+)%", r["error"])
        d = re.search(r"difference\| vs PyTorch ([\d.e+-]+)", r["error"])
        r.update(kl=float(kl.group(1)) if kl else None, top1=float(kl.group(2)) / 100 if kl else None,
                 max_dlogit=float(d.group(1)) if d else None)
    r["name"] = name
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--work", default="runs/defaults")
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if not (DATA / "dates-train.jsonl").exists():
        sys.path.insert(0, str(ROOT / "examples"))
        from demo import make_dataset

        make_dataset()
    data = ["--data", str(DATA / "dates-train.jsonl"), "--steps", str(args.steps)]
    rows, trains = [], {}
    rows.append(export_row("export (the base alone), defaults", [], work / "base"))
    rows.append(export_row("export (the base alone) --weights fp16", ["--weights", "fp16"], work / "base-fp16"))
    for quant in ("auto", "nf4"):
        out = work / f"run-{quant}"
        trains[quant] = run(["train", "--model", MODEL, *data, "--out", str(out), "--quant", quant])
        if not trains[quant]["ok"]:
            sys.exit(f"train --quant {quant} failed: {trains[quant]['error']}")
    adapter = ["--adapter", str(work / "run-auto" / "adapter")]
    rows.append(export_row("train (defaults) -> export, defaults", adapter, work / "aware"))
    rows.append(export_row("train (defaults) -> export --mode merged", [*adapter, "--mode", "merged"],
                           work / "merged"))
    nf4 = ["--adapter", str(work / "run-nf4" / "adapter")]
    rows.append(export_row("train --quant nf4 -> export --weights int4", [*nf4, "--weights", "int4"], work / "nf4-i4"))
    rows.append(export_row("train --quant nf4 -> export --weights nf4", [*nf4, "--weights", "nf4"], work / "nf4-n4"))
    rows.append(export_row("train --quant nf4 -> export (defaults)", nf4, work / "nf4-auto"))
    print(f"\ntrain {args.steps} steps, defaults: {trains['auto']['seconds']:.0f} s, peak "
          f"{trains['auto']['peak_gib'] or 0:.2f} GiB; --quant nf4: {trains['nf4']['seconds']:.0f} s, peak "
          f"{trains['nf4']['peak_gib'] or 0:.2f} GiB")
    print("| command | result | max abs dlogit | mean KL | top-1 | time | peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fmt = (lambda v, f: f.format(v) if v is not None else "-")
        print(f"| {r['name']} | {'passed' if r['ok'] else 'refused'} | {fmt(r.get('max_dlogit'), '{:.2e}')} | "
              f"{fmt(r.get('kl'), '{:.3g}')} | {fmt(r.get('top1'), '{:.1%}')} | {r['seconds']:.0f} s | "
              f"{fmt(r['peak_gib'], '{:.2f} GiB')} |")
        if not r["ok"]:
            print(f"|   | {r['error'][:400]} | | | | | |")


if __name__ == "__main__":
    main()
