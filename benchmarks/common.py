"""Shared helpers of the benchmark scripts: the protocols, running `nlprune prune` and reading its
record, timing, the transformers reference, the records they write."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def load_hf_reference(loaded):
    """transformers' LlamaForCausalLM on the same weights file, float32."""
    import torch
    from transformers import AutoModelForCausalLM

    src = loaded.source
    if src.kind == "gguf":
        path = Path(src.weights_path)
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(str(src.weights_path), dtype=torch.float32).eval()


def hf_window_nll(hf, ids: np.ndarray) -> float:
    """Summed next-token NLL of a batch of windows under transformers."""
    import torch

    with torch.no_grad():
        logits = hf(torch.from_numpy(ids).long()).logits[:, :-1].float()
        return float(
            torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), torch.from_numpy(ids[:, 1:]).long().reshape(-1), reduction="sum"
            )
        )


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}"


REPO_ROOT = Path(__file__).resolve().parents[1]


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran on and whether the tree had uncommitted changes."""
    from nlprune.provenance import git_state as state

    return state(REPO_ROOT)


def write_json(path: str | Path | None, record: dict[str, Any]) -> None:
    """Write a benchmark record (JSON) with where and on what code it ran: the machine, the load
    average at the end, the git commit (added unless the record has them)."""
    if not path:
        return
    record = {**record}
    record.setdefault("machine", machine_line())
    record.setdefault("load_average_end", list(os.getloadavg()))
    record.setdefault("git", git_state())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {path}")


# The cpu protocol (../shared/METHOD.md, section 5): 8 x 512 C4 train calibration tokens, seed 0; C4 test
# perplexity on 128 windows of 512 tokens. Studies add their own evaluation sets to these.
CPU_CALIBRATION = ("--nsamples", "8", "--seqlen", "512", "--seed", "0")
CPU_EVAL = ("--eval", "--eval-nsamples", "128", "--eval-seqlen", "512")
CPU_PROTOCOL = CPU_CALIBRATION + CPU_EVAL


@dataclasses.dataclass
class PruneRun:
    """One `nlprune prune` in its own process: the command as a user would type it (without
    --data-dir and --output), the run's results.json, wall seconds and the load around it."""

    command: str
    record: dict[str, Any]
    path: Path
    wall_seconds: float
    load_average: tuple[float, float]
    peak_rss_bytes: int = 0  # the process's high-water mark (wait4), whatever the run's record says


def prune_run(flags: list[str] | tuple[str, ...], output: Path, data_dir: str, *, env: dict[str, str] | None = None,
              log: Path | None = None) -> PruneRun:
    """`nlprune prune FLAGS --data-dir DATA_DIR --output OUTPUT --overwrite` in a fresh process
    (its output to ``log``, else to this process's), then its record. A failed run stops the
    study with the command and where its output went."""
    flags = [str(f) for f in flags]
    cmd = [sys.executable, "-m", "nlprune.cli", "prune", *flags, "--data-dir", str(data_dir), "--output", str(output),
           "--overwrite"]
    before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") if log is not None else contextlib.nullcontext() as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own peak resident set
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"nlprune prune {shlex.join(flags)} failed (rc {proc.returncode})"
                         + (f"; its output: {log}" if log else ""))
    wall = time.perf_counter() - start
    record = json.loads((Path(output) / "results.json").read_text())
    return PruneRun("nlprune prune " + " ".join(flags), record, Path(output), wall,
                    (round(before, 2), round(os.getloadavg()[0], 2)), usage.ru_maxrss * 1024)
