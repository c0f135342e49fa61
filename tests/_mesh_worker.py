"""Prune one model under several meshes; run by tests/test_parallel.py in a subprocess whose
environment sets XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX is imported.

    python tests/_mesh_worker.py CONFIG.json

CONFIG: {"model_dir", "method", "sparsity_type", "options", "nsamples", "seqlen", "out",
"runs": [[mesh spec or "none", batch_size], ...]}. Writes OUT.npz with every run's masks and
weights ("RUN/LAYER.NAME.mask|weight"), the last layer's calibration outputs ("RUN/hidden_out")
and, for the non-linear method, each layer's relaxed q/k masks before binarisation
("RUN/LAYER.q_proj.relaxed", "RUN/LAYER.k_proj.relaxed"), and prints one JSON line: per run, the report's mesh
record, the layer outputs' and the pruned weights' shardings, and the seconds it took.
"""

import json
import sys
import time

import jax
import numpy as np

from nlprune import parallel
from nlprune.convert.hf import load_hf_folder
from nlprune.methods import get_method
from nlprune.nonlinear import method as nonlinear_method
from nlprune.prune.pipeline import prune_model
from nlprune.sparsity import parse_pattern

_solve_qk = nonlinear_method.solve_qk
relaxed: list = []  # the relaxed masks of every solve_qk call of the current run, in layer order


def recording_solve_qk(*args, **kwargs):
    sol = _solve_qk(*args, **kwargs)
    relaxed.append((np.asarray(sol.mask_q), np.asarray(sol.mask_k)))
    return sol


nonlinear_method.solve_qk = recording_solve_qk  # the method looks it up at call time


def main(path: str) -> None:
    cfg = json.loads(open(path).read())
    model = load_hf_folder(cfg["model_dir"])
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, model.config.vocab_size, (cfg["nsamples"], cfg["seqlen"]))
    pattern = parse_pattern(cfg.get("sparsity_type", "unstructured"), 0.5)
    arrays, summary = {}, {"devices": len(jax.devices())}
    for spec, batch_size in cfg["runs"]:
        key = f"{spec}@{batch_size}"
        mesh = None if spec == "none" else parallel.parse_mesh(spec)
        hidden_specs, last = [], {}
        relaxed.clear()

        def seen(i, current, hidden):
            hidden_specs.append(str(getattr(hidden.sharding, "spec", hidden.sharding)))
            last["hidden"] = hidden

        t0 = time.perf_counter()
        pruned, report = prune_model(
            model, calibration, get_method(cfg["method"], **cfg.get("options", {})), pattern, batch_size=batch_size,
            progress=False, mesh=mesh, on_layer_done=seen,
        )
        seconds = time.perf_counter() - t0
        for i, layer in enumerate(pruned.model.layers):
            for name, lin in layer.linears().items():
                arrays[f"{key}/{i}.{name}.mask"] = np.asarray(lin.mask).astype(bool)
                arrays[f"{key}/{i}.{name}.weight"] = np.asarray(lin.weight)
        arrays[f"{key}/hidden_out"] = np.asarray(last["hidden"])
        for i, (mq, mk) in enumerate(relaxed):
            arrays[f"{key}/{i}.q_proj.relaxed"], arrays[f"{key}/{i}.k_proj.relaxed"] = mq, mk
        q = pruned.model.layers[-1].self_attn.q_proj.weight
        summary[key] = {
            "mesh": report.mesh,
            "hidden_sharding": hidden_specs[-1],
            "q_proj_sharding": str(getattr(q.sharding, "spec", q.sharding)),
            "q_proj_devices": len(q.sharding.device_set),
            "seconds": seconds,
        }
    np.savez(cfg["out"], **arrays)
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1])
