#!/usr/bin/env python3
"""docs/perf.md's tables from the CUDA bench's JSON (`clt bench --cuda --json F`; gpu-check.sh writes
bench-<preset>-<rows>.json beside its log).

Usage: python3 scripts/gpu-figures.py [--commit REV] bench-*.json > figures.md

Each file becomes a section: the date, device, commit, shape and command, the ceilings, a table of the
kernel rows, and every other line the bench printed (its ratios and choices). No packages needed.
"""
import datetime
import json
import os
import sys


def section(path, commit):
    with open(path) as f:
        rec = json.load(f)
    for key in ("device", "preset", "cuda_rows", "unix_time", "shape", "copy_gbs", "bf16_tflops", "rows", "lines"):
        if key not in rec:
            raise SystemExit(f"{path}: not a `clt bench --cuda --json` file (no {key!r})")
    when = datetime.datetime.fromtimestamp(rec["unix_time"], datetime.timezone.utc)
    l, d, f, b, l0 = rec["shape"]
    out = [
        f"### {when:%Y-%m-%d %H:%M} UTC, {rec['device']}, commit {commit}: preset {rec['preset']} "
        f"(L = {l}, d = {d}, F = {f}, B = {b}, L0 ≈ {l0})",
        "",
        f"Command: `clt bench --cuda --preset {rec['preset']} --cuda-rows {rec['cuda_rows']}` "
        "(`bash gpu-pack/gpu-check.sh` runs it). Ceilings: device copy "
        f"{rec['copy_gbs']:.0f} GB/s measured in the same run; bf16 {rec['bf16_tflops']:.0f} TFLOP/s (nominal).",
        "",
        "| row | ms | TFLOP/s | % of bf16 | GB/s | % of copy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rec["rows"]:
        tf = f"{r['tflops']:.1f}" if r["tflops"] > 0 else "–"
        pb = f"{r['pct_of_bf16']:.1f}" if r["tflops"] > 0 else "–"
        gb = f"{r['gbs']:.0f}" if r["gbs"] > 0 else "–"
        pc = f"{r['pct_of_copy']:.1f}" if r["gbs"] > 0 else "–"
        # (A name the bench indents is a variant of the row above it.)
        name = r["name"].strip() if not r["name"].startswith(" ") else "↳ " + r["name"].strip()
        out.append(f"| {name} | {r['ms']:.3f} | {tf} | {pb} | {gb} | {pc} |")
    out.append("")
    out.append("The bench's other lines (ratios, choices, notes), in order:")
    out.append("")
    out.extend(f"- {line.strip()}" for line in rec["lines"])
    out.append("")
    return "\n".join(out)


def main(argv):
    commit = None
    files = []
    i = 0
    while i < len(argv):
        if argv[i] == "--commit" and i + 1 < len(argv):
            commit = argv[i + 1]
            i += 2
        elif argv[i].startswith("-"):
            raise SystemExit(__doc__)
        else:
            files.append(argv[i])
            i += 1
    if not files:
        raise SystemExit(__doc__)
    if commit is None:
        for cand in [os.path.join(os.path.dirname(os.path.abspath(files[0])), "COMMIT"), "gpu-pack/COMMIT"]:
            if os.path.exists(cand):
                commit = open(cand).read().strip()[:7]
                break
    print("\n".join(section(p, commit or "unknown") for p in files))


if __name__ == "__main__":
    main(sys.argv[1:])
