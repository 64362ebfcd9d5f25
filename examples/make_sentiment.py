"""Real human-labelled sentiment text, split with a seed: examples/data/sentiment-{train,test}.jsonl.

The source is the ground truth of Hutto & Gilbert (ICWSM 2014), shipped inside the vaderSentiment 3.3.2
source distribution on PyPI (additional_resources/hutto_ICWSM_2014.tar.gz): Amazon review snippets and
tweets, each the mean rating of 20 people on [-4, 4]. A mean >= 0.5 is `positive`, <= -0.5 `negative`;
the ones in between (mixed or neutral) are left out. Each line keeps where it came from (`source`).

    python examples/make_sentiment.py [--sdist vaderSentiment-3.3.2.tar.gz] [--test 1000] [--seed 0]

Without --sdist the file is fetched once with `pip download` (the package registry, no model hub) into
~/.cache/qlora-rt.
"""

from __future__ import annotations

import argparse
import html
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SDIST = "vaderSentiment-3.3.2.tar.gz"
FILES = {"amazon": "amazonReviewSnippets_GroundTruth.txt", "tweets": "tweets_GroundTruth.txt"}


def fetch(cache: Path) -> Path:
    path = cache / SDIST
    if not path.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                        "vaderSentiment==3.3.2", "-d", str(cache)], check=True)
    return path


def read_ground_truth(sdist: Path) -> list[dict]:
    """(source, rating, text) of every line of the two ground-truth files, read without unpacking to disk."""
    with tarfile.open(sdist) as outer:
        inner = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        with tarfile.open(fileobj=io.BytesIO(outer.extractfile(inner).read())) as tar:
            members = {Path(m.name).name: m for m in tar.getmembers()}
            rows = []
            for source, name in FILES.items():
                text = tar.extractfile(members[name]).read().decode("utf-8")
                for n, line in enumerate(text.splitlines(), 1):
                    parts = line.split("\t")
                    if len(parts) < 3:
                        raise SystemExit(f"{name}:{n}: expected id, rating, text separated by tabs")
                    rows.append({"source": source, "rating": float(parts[1]),
                                 "text": html.unescape("\t".join(parts[2:]).strip())})
    return rows


def main(argv: list[str] | None = None) -> tuple[Path, Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sdist", type=Path, help=f"the {SDIST} file (default: pip download it)")
    p.add_argument("--test", type=int, default=1000, help="held-out examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "data")
    args = p.parse_args(argv)
    rows = read_ground_truth(args.sdist or fetch(Path.home() / ".cache" / "qlora-rt"))
    kept = [{"text": r["text"], "label": "positive" if r["rating"] >= 0.5 else "negative", "source": r["source"]}
            for r in rows if abs(r["rating"]) >= 0.5 and r["text"]]
    random.Random(args.seed).shuffle(kept)
    args.out.mkdir(parents=True, exist_ok=True)
    test, train = kept[:args.test], kept[args.test:]
    paths = args.out / "sentiment-train.jsonl", args.out / "sentiment-test.jsonl"
    for path, part in zip(paths, (train, test)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    share = sum(r["label"] == "positive" for r in test) / len(test)
    print(f"{len(rows)} rated texts, {len(kept)} clearly positive or negative: {len(train)} train, {len(test)} test "
          f"({100 * share:.1f}% positive) in {args.out}", file=sys.stderr)
    return paths


if __name__ == "__main__":
    main()
