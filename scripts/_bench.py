"""Shared helpers of the benchmark scripts: timing, the transformers reference, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

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


def write_json(path: str | None, record: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {path}")
