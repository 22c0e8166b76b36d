"""One prepared GPU check: bf16/fp16 correctness (flash-attention rule) and timings of every kernel, of the whole
encoder and of a training step of each stage against their baselines, written as a markdown table for
bench/RESULTS.md.

Usage on a CUDA machine:  python bench/gpu_check.py --out results_dir
Each bench module contributes ``gpu_rows() -> list[dict]``; a module that fails is reported in the table with its
error instead of stopping the others. Every timed row passed its parity check first; a row that failed it, or a
baseline that cannot run here, has no time and says why in ``note``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch

# the train-step bench last: its compiled rows compile the encoder once per stage before they are timed
MODULES = ("bench_patch_embed_3d", "bench_window_attention", "bench_gated_attention", "bench_swin_gpu",
           "bench_conv_branch", "bench_train_step")
COLUMNS = ("op", "case", "dtype", "pass", "ms", "baseline", "baseline_ms", "speedup", "peak_mib",
           "baseline_peak_mib", "metric", "value", "max_err", "ref_err", "ok", "note")


def fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/gpu_results"), help="folder for table.md / rows.json")
    parser.add_argument("--only", nargs="*", default=MODULES, help="bench modules to run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device; nothing to check", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).parent))
    device = torch.cuda.get_device_name()
    header = (f"{device}, torch {torch.__version__}, "
              f"triton {importlib.import_module('triton').__version__}, {datetime.date.today().isoformat()}")
    print(header, flush=True)
    rows: list[dict] = []
    failures: list[str] = []
    for name in args.only:
        start = time.perf_counter()
        try:
            module_rows = importlib.import_module(name).gpu_rows()
        except Exception:  # one broken module must not hide the others' results
            failures.append(f"{name}: {traceback.format_exc()}")
            print(failures[-1], file=sys.stderr, flush=True)
            continue
        rows += module_rows
        print(f"{name}: {len(module_rows)} rows in {time.perf_counter() - start:.1f} s", flush=True)
        print(table(module_rows), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    text = f"### {header}\n\n{table(rows)}\n"
    if failures:
        text += "\nFailures:\n\n" + "\n".join(f"```\n{f}```" for f in failures) + "\n"
    (args.out / "table.md").write_text(text)
    (args.out / "rows.json").write_text(json.dumps({"device": device, "header": header, "rows": rows}, indent=1))
    print(text)
    return 1 if failures or not all(r.get("ok", True) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
