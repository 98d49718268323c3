"""Print a results JSON from bench/speed.py as the Markdown tables the README shows.

    python bench/table.py bench/results-cuda.json
"""

from __future__ import annotations

import json
import sys


def fmt(v, digits=3):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def main(path: str) -> None:
    data = json.load(open(path))
    m = data["meta"]
    print(f"{m['device']}, torch {m['torch']}, diffusers {m['diffusers']}, {m['date']}\n")
    calls = [r for r in data["rows"] if "ms_per_call" in r and "error" not in r]
    images = [r for r in data["rows"] if "s_per_image" in r and "error" not in r]
    errors = [r for r in data["rows"] if "error" in r]
    if calls:
        print("| case | batch | implementation | dtype | ms per call | TFLOP/s | rel. error vs fp32 | first call s | vs diffusers |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in calls:
            print(f"| {r['case']} | {fmt(r.get('batch'))} | {r['impl']} | {r['dtype']} | {r['ms_per_call']:.2f} | {fmt(r.get('tflops'))} | "
                  f"{fmt(r.get('rel_err_vs_fp32'), 2)} | {fmt(r.get('first_call_s'))} | {r['speedup_vs_diffusers']:.2f}× |")
        print()
    if images:
        print("| case | implementation | dtype | s per image | first call s | PSNR vs fp32 (dB) | vs diffusers |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for r in images:
            print(f"| {r['case']} | {r['impl']} | {r.get('dtype', '')} | {r['s_per_image']:.3f} | {fmt(r.get('first_call_s'))} | "
                  f"{fmt(r.get('psnr_vs_fp32_db'))} | {fmt(r.get('speedup_vs_diffusers'))}{'×' if r.get('speedup_vs_diffusers') else ''} |")
        print()
    for r in errors:
        print(f"- {r['case']} {r['impl']}: {r['error']}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "bench/results.json")
