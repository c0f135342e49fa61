"""Shared helpers of the benchmark scripts: timing, the transformers reference, the records they write."""

from __future__ import annotations

import json
import os
import platform
import statistics
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


def git_state() -> dict[str, Any]:
    """The commit the benchmark ran on and whether the tree had uncommitted changes."""
    from nlprune.provenance import git_state as state

    return state(Path(__file__).resolve().parents[1])


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
