"""The run directory of a prune run by several JAX processes: process 0 writes, the others
learn its decisions (see :mod:`nlprune.runs` for the directory, :mod:`nlprune.processes`)."""

from __future__ import annotations

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import parallel, processes
from nlprune.modeling.llama import PRUNABLE_LINEARS, LlamaForCausalLM
from nlprune.modeling.masks import set_linears
from nlprune.runs import RunDir, RunDirError


class SharedRunDir(RunDir):
    """The run directory of a prune run by several JAX processes (``jax.distributed``):
    process 0 alone claims, writes and finishes it; every other process learns each of its
    decisions (claimed or refused, where a resumed run starts, the final write done or
    failed) and the arrays it read (a resumed run's finished layers and their outputs) from
    it, and never touches the directory (see :mod:`nlprune.processes`).

    Arrays sharded across processes are gathered whole before process 0 saves them, by every
    process together (a collective)."""

    def claim(self, overwrite: bool) -> None:
        processes.from_writer(lambda: RunDir.claim(self, overwrite))

    def resume(self, model, fingerprint, overwrite):
        if model is None:
            raise RunDirError("--stream runs in one process for now: drop --distributed.")
        restored: list = []

        def decide():
            start, whole, hidden = RunDir.resume(self, model, fingerprint, overwrite)
            restored[:] = [whole, hidden]
            return {"start": start, "layer_seconds": self.layer_seconds}

        decision = processes.from_writer(decide)
        start, self._fingerprint = decision["start"], fingerprint
        self.layer_seconds = [float(s) for s in decision["layer_seconds"]]
        if start == 0:
            return 0, model, None
        # process 0's restored layers and hidden states, to every process
        whole, hidden = restored or (None, None)
        shared = processes.share_arrays(None if whole is None else _resumed_arrays(whole, start, hidden))
        if whole is None:
            whole, hidden = _with_resumed_arrays(model, start, shared), jnp.asarray(shared["hidden"])
        return start, whole, hidden

    def save_layer(self, index, layer, hidden, fingerprint, seconds=0.0, config=None) -> None:
        writer = processes.is_writer()
        layer, hidden = parallel.gathered(layer, keep=writer), parallel.gathered(hidden, keep=writer)
        if writer:
            RunDir.save_layer(self, index, layer, hidden, fingerprint, seconds, config)

    def finish(self, model, record, meta) -> None:
        host = parallel.gathered(model, keep=processes.is_writer())
        processes.from_writer(lambda: RunDir.finish(self, host, record, meta))


def _resumed_arrays(model: LlamaForCausalLM, start: int, hidden: jax.Array) -> dict[str, np.ndarray]:
    """The pruned linears of layers 0..start-1 and layer ``start``'s inputs, as process 0 restored them."""
    arrays = {"hidden": np.asarray(hidden)}
    for i in range(start):
        for name, lin in model.model.layers[i].linears().items():
            arrays[f"{i}.{name}.weight"], arrays[f"{i}.{name}.mask"] = np.asarray(lin.weight), np.asarray(lin.mask)
    return arrays


def _with_resumed_arrays(model: LlamaForCausalLM, start: int, arrays: dict[str, np.ndarray]) -> LlamaForCausalLM:
    layers = list(model.model.layers)
    for i in range(start):
        updates = {n: (jnp.asarray(arrays[f"{i}.{n}.weight"]), jnp.asarray(arrays[f"{i}.{n}.mask"]))
                   for n in PRUNABLE_LINEARS}
        layers[i] = set_linears(layers[i], updates)
    return eqx.tree_at(lambda m: m.model.layers, model, layers)


def open_for_writing(path: str | Path) -> RunDir:
    """The run directory a prune writes: :class:`SharedRunDir` when several processes run it."""
    return SharedRunDir(path) if processes.several() else RunDir(path)
