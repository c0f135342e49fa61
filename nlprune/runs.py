"""A pruning run directory: its results, its pruned model, and the state to resume it.

    RUN_DIR/results.json           the record (written last: its presence = run finished)
    RUN_DIR/model/                 Orbax checkpoint of the pruned model (weights + masks)
    RUN_DIR/masks.safetensors      the masks alone, bit-packed
    RUN_DIR/progress/layer-007/    resume state: pruned linears of each finished layer
    RUN_DIR/progress/cursor/       resume state: the next layer's calibration inputs

Every piece is written atomically (see nlprune.checkpoint), so a run killed at any point
resumes from its last finished layer, and the result is bit-identical to an uninterrupted
run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from nlprune import checkpoint
from nlprune.modeling.llama import DecoderLayer, LlamaForCausalLM
from nlprune.modeling.masks import set_linears

RESULTS = "results.json"
MODEL = "model"
MASKS = "masks.safetensors"
PROGRESS = "progress"
CURSOR = "cursor"


class RunDirError(ValueError):
    """A run directory that cannot be used as asked."""


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Atomic JSON write: readers never see half a file, a crash never eats the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(path)


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    @property
    def progress(self) -> Path:
        return self.path / PROGRESS

    def is_finished(self) -> bool:
        return self.results_path.is_file()

    def prepare(self, fingerprint: dict[str, Any], overwrite: bool, resume: bool = True) -> int:
        """Make the directory ready for a run; returns the layer to start from.

        A finished run is refused without ``overwrite``; an unfinished one with the same
        fingerprint is resumed; one with another fingerprint is refused (named fields)."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--output {self.path} exists and is not a directory.")
        if overwrite and self.path.exists():
            self._clear()
        if self.is_finished():
            raise RunDirError(
                f"{self.path} already holds a finished run ({RESULTS}); pass --overwrite to "
                "replace it, or choose another --output."
            )
        if self.path.exists() and any(self.path.iterdir()) and not (self.progress / CURSOR).exists():
            known = {RESULTS, MODEL, MASKS, PROGRESS}
            if any(p.name not in known and not p.name.startswith(".") for p in self.path.iterdir()):
                raise RunDirError(
                    f"{self.path} is not empty and is not an nlprune run; choose another --output."
                )
        self.path.mkdir(parents=True, exist_ok=True)
        cursor = self.progress / CURSOR
        if not cursor.exists():
            return 0
        meta = checkpoint.read_meta(cursor)["meta"]
        if meta["fingerprint"] != fingerprint:
            diff = [
                f"{k}: saved {meta['fingerprint'].get(k)!r}, now {fingerprint.get(k)!r}"
                for k in sorted(set(meta["fingerprint"]) | set(fingerprint))
                if meta["fingerprint"].get(k) != fingerprint.get(k)
            ]
            raise RunDirError(
                f"{self.path} holds an unfinished run with other settings ({'; '.join(diff)}); "
                "rerun with the same settings to resume it, or pass --overwrite to start over."
            )
        if not resume:
            raise RunDirError(f"{self.path} holds an unfinished run; pass --overwrite to restart it.")
        return int(meta["next_layer"])

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.name in (RESULTS, MODEL, MASKS, PROGRESS) or child.name.startswith("."):
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    # ---- per-layer resume state ---------------------------------------------------------

    def save_layer(self, index: int, layer: DecoderLayer, hidden: jax.Array, fingerprint: dict) -> None:
        """After layer ``index`` is pruned: its linears, then the cursor (next inputs)."""
        state = {
            name: {"weight": np.asarray(lin.weight), "mask": np.asarray(lin.mask)}
            for name, lin in layer.linears().items()
        }
        checkpoint.save_state(self.progress / f"layer-{index:03d}", state, {"layer": index})
        checkpoint.save_state(
            self.progress / CURSOR,
            {"hidden": np.asarray(hidden)},
            {"next_layer": index + 1, "fingerprint": fingerprint},
        )

    def restore(self, model: LlamaForCausalLM, start_layer: int) -> tuple[LlamaForCausalLM, jax.Array]:
        """The model with layers < start_layer replaced by their saved pruned linears, and
        the calibration inputs of layer ``start_layer``."""
        layers = list(model.model.layers)
        for i in range(start_layer):
            state, _ = checkpoint.load_state(self.progress / f"layer-{i:03d}")
            updates = {n: (jnp.asarray(s["weight"]), jnp.asarray(s["mask"])) for n, s in state.items()}
            layers[i] = set_linears(layers[i], updates)
        state, _ = checkpoint.load_state(self.progress / CURSOR)
        model = eqx.tree_at(lambda m: m.model.layers, model, layers)
        return model, jnp.asarray(state["hidden"])

    # ---- final outputs ------------------------------------------------------------------

    def finish(self, model: LlamaForCausalLM, record: dict[str, Any], meta: dict[str, Any]) -> None:
        checkpoint.save_model(self.path / MODEL, model, meta)
        checkpoint.save_packed_masks(self.path / MASKS, model)
        write_json(self.results_path, record)  # last: marks the run finished
        shutil.rmtree(self.progress, ignore_errors=True)
