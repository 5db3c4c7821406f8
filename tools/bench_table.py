"""Turns a pytest-benchmark JSON file into the markdown table of benchmarks/RESULTS.md.

    python -m pytest benchmarks --benchmark-only --benchmark-json=out.json
    python tools/bench_table.py out.json

One row per benchmark group: the median of each implementation and the fused one's speed-up.
"""

import json
import re
import sys
from collections import defaultdict

IMPLS = ("fused", "eager", "compile")


def impl_of(name: str) -> str:
    params = re.search(r"\[(.*)\]", name).group(1).replace("compiled", "compile").split("-")
    return next(p for p in params if p in IMPLS)


def main(path: str) -> None:
    groups: dict[str, dict[str, float]] = defaultdict(dict)
    for bench in json.load(open(path))["benchmarks"]:
        groups[bench["group"]][impl_of(bench["name"])] = bench["stats"]["median"] * 1e3
    print("| group | fused ms | eager ms | compile ms | vs eager | vs compile |")
    print("|---|---:|---:|---:|---:|---:|")
    for group in sorted(groups):
        t = groups[group]
        cells = [f"{t[i]:.3f}" if i in t else "–" for i in IMPLS]
        ratios = [
            f"{t[i] / t['fused']:.2f}×" if i in t and "fused" in t else "–" for i in IMPLS[1:]
        ]
        print(f"| {group} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
