"""Every benchmark, unchanged, on whatever backend JAX finds, into one markdown report.

Runs the engine benchmarks (Gram statistics, lambda search), the training-step benchmark (ours
against PyTorch when it is installed), the input pipeline and the latency benchmarks, each in
its own process with its own command line, and writes ``--out`` (default
``results/bench.md``): one table of headline figures (one row per measured quantity, read from
each benchmark's JSON output) followed by every benchmark's full printout. A benchmark that
fails is reported with its exit status and the run goes on. ``make bench`` runs this; on the day
an accelerator is lent the same command measures it.

    python experiments/bench_all.py                      # everything (tens of minutes on a CPU)
    python experiments/bench_all.py --only train input   # a subset
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _benchmarks(tmp: Path) -> dict[str, tuple[list[str], Path | None]]:
    # name -> (arguments after the script, the JSON it writes or None)
    return {
        "gram": (["bench_gram.py"], None),
        "lambda": (["bench_lambda.py"], None),
        "train": (["bench_train.py", "--out", str(tmp / "train.json")], tmp / "train.json"),
        "input": (["bench_input.py", "--out", str(tmp / "input.json")], tmp / "input.json"),
        "latency": (["bench_latency.py", "--json", str(tmp / "latency.json")], tmp / "latency.json"),
        "latency-target": (["bench_latency_target.py", "--out", str(tmp / "target.json")], tmp / "target.json"),
    }


def _headlines(name: str, data: dict) -> list[tuple[str, str]]:
    """(quantity, value) rows of one benchmark's JSON."""
    rows = []
    for r in data.get("rows", []):
        if name == "train":
            ours = r["ours"]["seconds_per_step"]
            value = f"{r['batch'] / ours:,.0f} images/s"
            if r.get("ratio") is not None:
                value += f"; PyTorch {r['batch'] / r['torch']['seconds_per_step']:,.0f}; ours/PyTorch {r['ratio']:.2f}"
            rows.append((f"train step {r['model']}, batch {r['batch']}", value))
        elif name == "input":
            rows.append((f"input {r['form']} batch {r['batch']}, prefetch {r['prefetch']}",
                         f"{r['images_per_s']:,.0f} images/s ({r['images_per_s'] / r['demand']:.2f} of "
                         f"{r['demand']:,.0f} demanded)"))
        elif name == "latency":
            rows.append((f"latency {r['model']} batch {r['batch']}, {r['variant']}",
                         f"{r['original ms']:.2f} -> {r['variant ms']:.2f} ms, speed-up {r['speed-up']:.2f} "
                         f"(FLOPs ratio {r['FLOPs ratio']:.2f})"))
        elif name == "latency-target":
            rows.append((f"latency target {r['model']} batch {r['batch']}",
                         f"predicted {r['predicted ms']:.2f} ms, measured {r['measured ms']:.2f} ms, "
                         f"error {100 * r['error']:+.0f}%"))
    return rows


def _device() -> str:
    code = "import jax; print(jax.devices()[0].device_kind, len(jax.devices()), jax.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return out.stdout.strip() or f"unknown ({out.stderr.strip().splitlines()[-1:]})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="a subset of: gram lambda train input latency "
                                                           "latency-target")
    p.add_argument("--out", default="results/bench.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        benches = _benchmarks(Path(tmp))
        names = args.only or list(benches)
        bad = [n for n in names if n not in benches]
        if bad:
            p.error(f"--only: unknown {bad}; valid: {', '.join(benches)}")
        device = _device()
        table, sections = [], []
        for name in names:
            script_args, json_path = benches[name]
            cmd = [sys.executable, str(HERE / script_args[0]), *script_args[1:]]
            print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
            t = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True)
            seconds = time.perf_counter() - t
            print(run.stdout[-2000:], flush=True)
            status = "ok" if run.returncode == 0 else f"failed (exit {run.returncode})"
            table.append((f"**{name}**", f"{status}, {seconds:.0f} s"))
            if run.returncode == 0 and json_path is not None and json_path.exists():
                table += _headlines(name, json.loads(json_path.read_text()))
            text = run.stdout + (f"\n[stderr, last lines]\n{run.stderr[-3000:]}" if run.returncode else "")
            sections.append(f"## {name}\n\n    {' '.join(['python', 'experiments/' + script_args[0]])}\n\n"
                            f"```\n{text.strip()}\n```\n")
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="minutes")
    lines = [f"# Benchmarks, {stamp}", "",
             f"Device: {device}; host {platform.node()}, {os.cpu_count()} CPU cores, Python "
             f"{platform.python_version()}.", "",
             "| quantity | value |", "|---|---|", *[f"| {q} | {v} |" for q, v in table], "", *sections]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(out.suffix + ".tmp")
    tmp_out.write_text("\n".join(lines))
    os.replace(tmp_out, out)  # a killed run leaves the previous report whole
    print(f"written to {out}")
    return 0 if all("failed" not in v for q, v in table if q.startswith("**")) else 1


if __name__ == "__main__":
    sys.exit(main())
