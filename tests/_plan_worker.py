"""Measure the memory a real prune adds, to check nlprune.plan against (tests/test_plan.py).

    MALLOC_MMAP_THRESHOLD_=65536 python tests/_plan_worker.py CONFIG.json

CONFIG: {"config": HF config dict, "method", "options", "nsamples", "seqlen", "batch_size"}.
A random model of that config is pruned twice on random tokens: the first run compiles every
jitted step; then the peak resident set size is reset (Linux: "5" > /proc/self/clear_refs)
and the second run's peak is read (VmHWM). Printed as JSON: ``added_bytes`` = that peak minus
the resident size just before the second run (which already holds the dense model, the
runtime and the compiled code). On CPU, device buffers are host memory, so this is the
device's peak growth; glibc's fixed mmap threshold makes every freed large buffer leave the
resident set at once (otherwise malloc may keep it and hide later growth).
"""

import gc
import json
import re
import sys

import jax
import numpy as np


def status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def main(path: str) -> None:
    from nlprune.modeling.init import init_llama
    from nlprune.modeling.llama import LlamaConfig
    from nlprune.methods import get_method
    from nlprune.prune.pipeline import prune_model
    from nlprune.sparsity import parse_pattern

    cfg = json.loads(open(path).read())
    config = LlamaConfig.from_hf_dict(cfg["config"])
    model = init_llama(config, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (cfg["nsamples"], cfg["seqlen"]))
    pattern = parse_pattern("unstructured", 0.5)

    def prune():
        method = get_method(cfg["method"], **cfg.get("options", {}))
        pruned = prune_model(model, tokens, method, pattern, batch_size=cfg.get("batch_size", 8), progress=False)[0]
        return jax.block_until_ready(pruned)

    warm = prune()  # compiles every jitted step
    del warm
    gc.collect()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) starts again from the current size
    pruned = prune()
    peak = status("VmHWM")
    del pruned
    print(json.dumps({"before_bytes": before, "peak_bytes": peak, "added_bytes": peak - before}))


if __name__ == "__main__":
    main(sys.argv[1])
