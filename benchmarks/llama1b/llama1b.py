"""Pruning a Llama-3.2-1B-shaped model on CPU: time and peak memory against `nlprune plan`.

    .venv/bin/python benchmarks/llama1b/llama1b.py --data-dir ../shared/data              # every row not yet recorded
    .venv/bin/python benchmarks/llama1b/llama1b.py --data-dir ../shared/data --rows wanda-512
    .venv/bin/python benchmarks/llama1b/llama1b.py --table                                # table.md and plot from the records

The real Llama 3.2-1B weights need the hub; the rows prune seeded random weights of its
exact config (`--model llama-3.2-1b --random-weights 0`, the card's own tokenizer), so the
numbers are time and memory only: quality on random weights means nothing, and no row
evaluates. Each setting runs SmolLM2-135M (its real weights) and then the 1B shape back to
back, each one `nlprune prune` process (niced), so the table shows how each method's cost
grows from 135M to 1.2B parameters.

Per row: `prune_seconds` from results.json; the process's peak resident set (ru_maxrss of
the child, from wait4); the resident set sampled every 0.25 s with the layer the progress bar
was on (the stage where the peak happens); the load average before and after; and `nlprune
plan`'s peak for the same settings (`nlprune plan ... --output`). Before a row the script
waits until the machine has --min-free-gib (1B) of memory available, and a guard ends a row
whose process would take the machine's last --reserve-gib (the machine is shared). Records:
OUT/rows/NAME.json, written as each row finishes (rows already finished are skipped unless
--rerun; a stopped row is recorded as such and run again); the run folders (checkpoints, GBs) go to --work-dir and are deleted after each row.
"""

from __future__ import annotations

import argparse
import codecs
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

MODELS = {  # key -> (label, --model flags)
    "135m": ("SmolLM2-135M", ["--model", "smollm2-135m"]),
    "1b": ("Llama-3.2-1B shape, random weights", ["--model", "llama-3.2-1b", "--random-weights", "0"]),
}
# setting -> (method, seqlen, extra flags): cheapest first. At 2048 the forward batch is cut to
# 2 windows, as `nlprune plan` suggests there.
SETTINGS = {
    "wanda-512": ("wanda", 512, []),
    "sparsegpt-512": ("sparsegpt", 512, []),
    "best-512": ("nonlinear", 512, ["--recipe", "best"]),
    "wanda-2048": ("wanda", 2048, ["--batch-size", "2"]),
    "sparsegpt-2048": ("sparsegpt", 2048, ["--batch-size", "2"]),
    # best's own one-window steps store every window's dense targets: fits for 135M only (plan: 7.0
    # GiB; the 1B shape 29.4). Chunked (plan's older suggestion) it stores them still in the q/k
    # refit, and each step sees all 8 windows: on 135M 491 s a layer against ~34 s. Recomputed
    # (plan's suggestion now) it fits the 1B shape.
    "best-2048": ("nonlinear", 2048, ["--recipe", "best", "--batch-size", "2"]),
    # The same method with each step's dense targets built from its own window.
    "best-2048-recomputed": ("nonlinear", 2048, ["--recipe", "best", "--batch-size", "2", "--recompute-targets"]),
    "best-2048-chunked": ("nonlinear", 2048, ["--recipe", "best", "--batch-size", "2", "--window-batch", "8",
                                              "--window-chunk", "1"]),
}
GIB = 2**30


def meminfo(key: str) -> int:
    text = Path("/proc/meminfo").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def proc_rss(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    m = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(m.group(1)) * 1024 if m else None


def prune_command(setting: str, model: str, args, out: Path) -> list[str]:
    method, seqlen, extra = SETTINGS[setting]
    return ["nlprune", "prune", *MODELS[model][1], "--prune-method", method, "--sparsity-ratio", "0.5",
            "--sparsity-type", "unstructured", "--nsamples", str(args.nsamples), "--seqlen", str(seqlen),
            "--seed", "0", "--data-dir", args.data_dir, "--output", str(out), "--overwrite", *extra]


def plan_command(prune_cmd: list[str], out: Path) -> list[str]:
    """The same settings for `nlprune plan` (which needs no weights, data or run folder)."""
    drop_with_value = {"--random-weights", "--data-dir", "--output", "--seed"}
    cmd, skip = ["nlprune", "plan"], False
    for i, a in enumerate(prune_cmd[2:]):
        if skip:
            skip = False
        elif a in drop_with_value:
            skip = True
        elif a != "--overwrite":
            cmd.append(a)
    return [*cmd, "--output", str(out)]


def exe(cmd: list[str]) -> list[str]:
    return [str(Path(sys.executable).with_name(cmd[0])), *cmd[1:]]


def wait_for_memory(need: int, minutes: float) -> int:
    deadline = time.time() + 60 * minutes
    while (free := meminfo("MemAvailable")) < need:
        if time.time() > deadline:
            sys.exit(f"waited {minutes:.0f} min for {need / GIB:.1f} GiB of available memory; "
                     f"only {free / GIB:.1f} GiB: rerun later")
        print(f"  {free / GIB:.1f} GiB available, need {need / GIB:.1f}: waiting", flush=True)
        time.sleep(60)
    return free


def run_prune(cmd: list[str], timeout: float, reserve: int) -> dict:
    """Run one prune; sample its resident set, the layer its progress bar is on, and its peak."""
    proc = subprocess.Popen(["nice", "-n", "5", *exe(cmd)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    start = time.time()
    state = {"layer": "load", "stderr": [], "stdout": []}
    layer_start: dict[str, float] = {}

    def read_stderr():
        # os.read returns what the pipe holds now (a text read(n) would wait for n characters,
        # several bar updates: the stage would lag behind the process)
        buf, decoder = "", codecs.getincrementaldecoder("utf-8")(errors="replace")
        while raw := os.read(proc.stderr.fileno(), 4096):
            chunk = decoder.decode(raw)
            buf = (buf + chunk)[-4000:]
            # the pruning bar's last complete update: tqdm starts each update with a \r, so the
            # newest one is the last segment, complete once it ends with its closing bracket
            segs = re.split(r"[\r\n]", buf)
            if not segs[-1].rstrip().endswith("]"):
                segs = segs[:-1]
            bars = [seg for seg in segs if re.search(r"layer \d+: ", seg)]
            if bars:
                m = re.search(r"layer (\d+): ([a-z ]+)", bars[-1])
                layer_start.setdefault(m.group(1), round(time.time() - start, 2))
                state["layer"] = f"layer {m.group(1)}: {m.group(2).strip()}"
                if re.search(r"\b100%\|", bars[-1]):  # the metric, the model's and masks' writing
                    state["layer"] = "after the last layer"
            state["stderr"].append(chunk)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    out_reader = threading.Thread(target=lambda: state["stdout"].append(proc.stdout.read().decode(errors="replace")), daemon=True)
    out_reader.start()
    samples, peak_seen, guard, killed = [], (0, None, None), None, False
    status = None
    while status is None:
        time.sleep(0.25)
        rss, t = proc_rss(proc.pid), time.time() - start
        if rss:
            samples.append((round(t, 2), rss, state["layer"]))
            if rss > peak_seen[0]:
                peak_seen = (rss, round(t, 2), state["layer"])
        if meminfo("MemAvailable") < reserve and guard is None:
            guard = f"memory guard: the machine had under {reserve / GIB:.1f} GiB available at {state['layer']}"
        elif t > timeout and guard is None:
            guard = f"timed out after {timeout / 60:.0f} min at {state['layer']}"
        if guard and not killed:
            proc.kill()  # our own child, by pid
            killed = True
        pid, status_word, rusage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            status = os.waitstatus_to_exitcode(status_word)
    reader.join(5)
    out_reader.join(5)
    # keep the timeline small: one sample a second, plus the peak's
    thinned = [s for i, s in enumerate(samples) if i % 4 == 0 or s[1] == peak_seen[0]]
    return {
        "returncode": status, "stopped": guard, "process_seconds": time.time() - start,
        "peak_rss_bytes": rusage.ru_maxrss * 1024,  # KiB on Linux: the whole process's high-water mark
        "sampled_peak": {"bytes": peak_seen[0], "at_seconds": peak_seen[1], "at": peak_seen[2]},
        "layer_started_at_seconds": layer_start, "rss_samples": thinned,
        "stdout_tail": "".join(state["stdout"])[-2000:], "stderr_tail": "".join(state["stderr"])[-3000:],
    }


def run_row(setting: str, model: str, args) -> dict:
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / f"{model}-{setting}"
    cmd = prune_command(setting, model, args, run_dir)
    pcmd = plan_command(cmd, work / f"{model}-{setting}.plan.json")
    subprocess.run(exe(pcmd), check=True, capture_output=True)
    plan = json.loads((work / f"{model}-{setting}.plan.json").read_text())
    free = wait_for_memory(int(args.min_free_gib * GIB) if model == "1b" else 3 * GIB, args.wait_min)
    print(f"$ {shlex.join(cmd)}   (plan: {plan['peak_bytes'] / GIB:.2f} GiB at {plan['peak_stage']})", flush=True)
    load_before = os.getloadavg()
    measured = run_prune(cmd, args.timeout_min * 60, int(args.reserve_gib * GIB))
    load_after = os.getloadavg()
    results = run_dir / "results.json"
    record = json.loads(results.read_text()) if measured["returncode"] == 0 and results.is_file() else None
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)  # checkpoints: GBs
    shutil.rmtree(run_dir.with_name(f".{run_dir.name}.nlprune-next"), ignore_errors=True)
    row = {
        "setting": setting, "model": model, "model_label": MODELS[model][0], "command": shlex.join(cmd),
        "plan_command": shlex.join(pcmd),
        "plan": {k: plan.get(k) for k in ("peak_bytes", "peak_stage", "dense_weight_bytes", "stages", "settings", "notes",
                                          "cpu_process_bytes", "cpu_process_at")},
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "mem_available_before_bytes": free, "nice": 5, **measured,
        "prune_seconds": record["prune_seconds"] if record else None,
        "layer_seconds": record["layer_seconds"] if record else None,
        "results_peak_rss_bytes": record["peak_rss_bytes"] if record else None,
        "results": {k: record[k] for k in ("args", "model", "sparsity", "mesh", "machine", "attention_error")
                    if k in record} if record else None,
        "host": os.uname().nodename, "cpus": os.cpu_count(), "mem_total_bytes": meminfo("MemTotal"),
    }
    if record:
        row["results"]["sparsity"] = {"overall": record["sparsity"]["overall"]}
    return row


def fmt_gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def cpu_plan(row: dict) -> tuple[int, str, int | None]:
    """The plan's peak for the process (``cpu_process_bytes``: the device peak plus the runtime
    and the run's writing) and where, by the current plan code with the row's own plan command;
    and the plan recorded when the row ran (None for rows from before plan.py computed it)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cmd = shlex.split(row["plan_command"])
        cmd[cmd.index("--output") + 1] = str(Path(tmp) / "plan.json")
        subprocess.run(exe(cmd), check=True, stdout=subprocess.DEVNULL)
        fresh = json.loads((Path(tmp) / "plan.json").read_text())
    return fresh["cpu_process_bytes"], fresh["cpu_process_at"], row["plan"].get("cpu_process_bytes")


def bar_layer_starts(stderr: str) -> tuple[dict[int, float], float]:
    """Each layer's start on the progress bar's own clock (its elapsed time at the first update
    that names the layer), and the last update's elapsed time."""
    def seconds(text: str) -> float:
        parts = [int(x) for x in text.split(":")]
        return float(sum(v * 60**i for i, v in enumerate(reversed(parts))))

    starts, last = {}, 0.0
    for m in re.finditer(r"\[(\d+(?::\d+)+)[<,\]][^\]]*?layer (\d+): ", stderr):
        t = seconds(m.group(1))
        starts.setdefault(int(m.group(2)), t)
        last = max(last, t)
    return starts, last


def stopped_note(row: dict) -> str:
    """For a row stopped before the end: the layers it finished, their seconds (the progress
    bar's clock), and the prune time that rate gives for every layer (an extrapolation, said)."""
    starts, last = bar_layer_starts(row["stderr_tail"])
    layers = 16 if row["model"] == "1b" else 30
    what = f"{row['setting']} on {MODELS[row['model']][0]}: stopped ({row['stopped'] or 'rc ' + str(row['returncode'])})"
    if not starts:
        return f"- {what} before its first layer's progress."
    order = sorted(starts)
    done = [starts[b] - starts[a] for a, b in zip(order, order[1:])]
    if order[0] != 0:  # the record keeps the stderr's tail: its first layer's start is cut off
        done = done[1:]
    running = f"layer {order[-1]} still running after {last - starts[order[-1]]:.0f} s"
    if not done:
        return f"- {what} in its first layer ({running})."
    per = sorted(done)[len(done) // 2]
    return (f"- {what} after {order[-1]} of {layers} layers ({running}); a finished layer took {per:.0f} s "
            f"(median of {', '.join(f'{d:.0f}' for d in done)}, the layers the record's stderr tail shows), so all "
            f"{layers} would take about "
            f"{per * layers / 60:.0f} min (extrapolated, not measured); its peak RSS is that of the layers it ran.")


def write_table(out: Path) -> None:
    rows = {}
    for f in sorted((out / "rows").glob("*.json")):
        r = json.loads(f.read_text())
        rows[(r["setting"], r["model"])] = r
    lines = [
        "| setting | model | prune s | 1B / 135M prune s | peak RSS GiB (measured) | plan GiB (process, current code) | plan / measured "
        "| 1B / 135M peak | plan's peak at | measured peak at | load avg before, after |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    points, times = [], {}
    for setting in SETTINGS:
        for model in MODELS:
            r = rows.get((setting, model))
            if r is None:
                continue
            small = rows.get((setting, "135m"))
            secs, peak = r["prune_seconds"], r["peak_rss_bytes"]
            plan, plan_at, then = cpu_plan(r)
            ratio_s = ratio_m = "-"
            if model == "1b" and small and small["prune_seconds"] and secs:
                ratio_s = f"{secs / small['prune_seconds']:.1f}x"
                ratio_m = f"{peak / small['peak_rss_bytes']:.1f}x"
            status = "" if r["returncode"] == 0 else f" (stopped: {r['stopped'] or 'rc ' + str(r['returncode'])})"
            lines.append(
                f"| {setting} | {MODELS[model][0]} | {'-' if secs is None else f'{secs:.1f}'}{status} | {ratio_s} | "
                f"{fmt_gib(peak)} | {fmt_gib(plan)}{f' (at run time {fmt_gib(then)})' if then and abs(then - plan) > 0.02 * plan else ''} | {plan / peak:.2f} | {ratio_m} | {plan_at} | "
                f"{r['sampled_peak']['at']} | {r['load_average_before'][0]:.1f}, {r['load_average_after'][0]:.1f} |"
            )
            stopped = "" if r["returncode"] == 0 else " (stopped)"
            points.append((f"{setting}\n{'1B' if model == '1b' else '135M'}{stopped}", peak / GIB, plan / GIB))
            if secs and r["returncode"] == 0:
                times.setdefault(setting, {})[model] = secs
    notes = [stopped_note(r) for r in rows.values() if r["returncode"] != 0]
    if notes:
        lines += ["", *notes]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if points:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax_t, ax) = plt.subplots(1, 2, figsize=(6 + 1.1 * len(points), 4.2),
                                       gridspec_kw={"width_ratios": [max(1, len(times)), max(1, len(points))]})
        # time: one pair of bars per setting, log scale (the 1B shape is 5-10x), ratio written above
        names = list(times)
        for offset, model, label in ((-0.2, "135m", "SmolLM2-135M"), (0.2, "1b", "Llama-3.2-1B shape")):
            ax_t.bar([i + offset for i, n in enumerate(names) if model in times[n]],
                     [times[n][model] for n in names if model in times[n]], 0.4, label=label)
        for i, n in enumerate(names):
            if {"135m", "1b"} <= times[n].keys():
                ax_t.annotate(f"{times[n]['1b'] / times[n]['135m']:.1f}x", (i + 0.2, times[n]["1b"]),
                              ha="center", va="bottom", fontsize=7)
        ax_t.set_yscale("log")
        ax_t.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax_t.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax_t.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax_t.set_xticks(range(len(names)), names, fontsize=7, rotation=20, ha="right")
        ax_t.set_ylabel("prune seconds (log)")
        ax_t.set_title("Prune time, 135M -> 1B shape")
        ax_t.legend(fontsize=7)
        xs = range(len(points))
        ax.bar([x - 0.2 for x in xs], [p[1] for p in points], 0.4, label="measured peak RSS")
        ax.bar([x + 0.2 for x in xs], [p[2] for p in points], 0.4, label="nlprune plan")
        ax.set_xticks(list(xs), [p[0] for p in points], fontsize=7, rotation=20, ha="right")
        ax.set_ylabel("GiB")
        ax.set_title("Peak memory: measured vs planned (CPU, float32)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "cost.png", dpi=120)
        print(f"wrote {out / 'table.md'} and {out / 'cost.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("NLPRUNE_DATA_DIR"))
    ap.add_argument("--out", default="benchmarks/llama1b")
    ap.add_argument("--work-dir", default="/tmp/nlprune-llama1b", help="run folders (deleted after each row)")
    ap.add_argument("--rows", nargs="*", default=list(SETTINGS), choices=list(SETTINGS), help="settings to run")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--rerun", action="store_true", help="run rows already recorded again")
    ap.add_argument("--min-free-gib", type=float, default=16.0, help="available memory a 1B row waits for")
    ap.add_argument("--reserve-gib", type=float, default=1.5, help="stop a row that leaves the machine less")
    ap.add_argument("--wait-min", type=float, default=120.0, help="longest wait for memory before giving up")
    ap.add_argument("--timeout-min", type=float, default=90.0, help="stop a row after this long")
    ap.add_argument("--table", action="store_true", help="only write the table and plot from the records")
    args = ap.parse_args()
    out = Path(args.out)
    if not args.table:
        if not args.data_dir:
            ap.error("--data-dir (or NLPRUNE_DATA_DIR) is needed to run rows")
        (out / "rows").mkdir(parents=True, exist_ok=True)
        for setting in args.rows:
            for model in args.models:
                path = out / "rows" / f"{setting}-{model}.json"
                if path.exists() and not args.rerun and json.loads(path.read_text())["returncode"] == 0:
                    print(f"{path} exists: skipped")
                    continue
                row = run_row(setting, model, args)
                path.write_text(json.dumps(row, indent=1) + "\n")
                print(f"  -> prune {row['prune_seconds']} s, peak {fmt_gib(row['peak_rss_bytes'])} GiB "
                      f"(plan {fmt_gib(row['plan']['peak_bytes'])}), {row['stopped'] or 'finished'}", flush=True)
    write_table(out)


if __name__ == "__main__":
    main()
