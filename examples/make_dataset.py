"""Generate the bundled demo task: rewrite a date written any common way as ISO 8601 (YYYY-MM-DD).

Why this task: it has one exact answer (so exact match is an honest metric), the base SmolLM2-135M
gets it mostly wrong (it echoes, reorders, or invents digits), and it is a pure rewriting rule that a
LoRA adapter learns in a few minutes on two CPU cores. Deterministic: a fixed seed, same files every run.

    python examples/make_dataset.py            # writes examples/data/dates-{train,heldout}.jsonl
"""

from __future__ import annotations

import datetime as dt
import json
import random
from pathlib import Path

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
INSTRUCTION = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only.\n"


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def render(d: dt.date, style: int) -> str:
    m, mon = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return [
        f"{m} {d.day}, {d.year}", f"{d.day} {m} {d.year}", f"{mon} {d.day} {d.year}",
        f"the {ordinal(d.day)} of {m}, {d.year}", f"{d.strftime('%A')}, {m} {d.day}, {d.year}",
        f"{d.day:02d}.{d.month:02d}.{d.year} (day.month.year)", f"{m} {ordinal(d.day)} {d.year}",
        f"{d.year}, {m} {d.day}", f"{d.month}/{d.day}/{d.year} (US style)", f"{d.day}-{mon}-{d.year}",
    ][style]


def example(rng: random.Random) -> dict:
    d = dt.date(1950, 1, 1) + dt.timedelta(days=rng.randrange(365 * 100))
    text = render(d, rng.randrange(10))
    return {"messages": [{"role": "user", "content": INSTRUCTION + text},
                         {"role": "assistant", "content": d.isoformat()}]}


def main(out: Path = Path(__file__).parent / "data", n_train: int = 600, n_heldout: int = 60, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = [example(rng) for _ in range(n_train + n_heldout)]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:n_train]), ("heldout", rows[n_train:])):
        (out / f"dates-{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
