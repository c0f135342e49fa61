"""Export a (pruned) model as a Hugging Face folder that ``transformers`` loads as is.

Masks are folded into the weights, so pruned weights are exact zeros in ``model.safetensors``
(one file; float32, bfloat16 or float16, ``dtype``; config.json's ``torch_dtype`` says which).
The zeros are stored like any other weight: the folder is as large as a dense one of its dtype
(the sparsity is simulated; see the README). ``sparsity`` is recorded in config.json under
``nlprune_sparsity``, a key transformers keeps as an attribute and otherwise ignores. The folder is built in a temporary sibling and swapped in only when
complete (see :func:`nlprune.atomic.write_atomically`): a failed export leaves nothing
half-written and never destroys an existing folder first.

The folder holds a marker, ``.nlprune-export.json``, listing the files the export wrote;
``overwrite`` replaces only such a folder, and only while it holds nothing else, so no file
that nlprune did not write is ever deleted.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nlprune.atomic import creatable_problem, file_mode, os_error_in, write_atomically
from nlprune.convert.hf import to_state_dict
from nlprune.modeling.llama import LlamaForCausalLM

WEIGHTS_FILE = "model.safetensors"
MARKER = ".nlprune-export.json"
MARKER_FORMAT = "nlprune-export"
EXPORT_DTYPES = ("float32", "bfloat16", "float16")
SPARSITY_KEY = "nlprune_sparsity"


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of an export dtype name (bfloat16 through ml_dtypes)."""
    if name not in EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {name!r}; choose one of {', '.join(EXPORT_DTYPES)}.")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class ExportError(ValueError):
    """An export folder that cannot be written as asked."""


def exported_files(out_dir: Path) -> list[str] | None:
    """The files an nlprune export wrote into ``out_dir`` (its marker), or None."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
        if marker.get("format") == MARKER_FORMAT and isinstance(marker.get("files"), list):
            return [str(f) for f in marker["files"]]
    except (OSError, ValueError, AttributeError):
        pass
    return None


def check_target(out_dir: Path, overwrite: bool) -> None:
    """Refuse, before anything is loaded or written, an output that is a file, cannot be
    written, or is a non-empty folder that is not (only) an earlier export."""
    here = Path(os.path.abspath(out_dir))
    if here == Path.cwd() and exported_files(here) is None:
        raise ExportError(
            f"--output {str(out_dir)!r} is the current folder {here}, which is not an nlprune export "
            "(an unset variable?); give the export folder's own path."
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is a file; choose a folder path for the export.")
    problem = creatable_problem(out_dir)
    if problem:
        raise ExportError(f"--output {out_dir}: {problem}; choose another output folder.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace "
            "it, or choose another output folder."
        )
    files = exported_files(out_dir)
    if files is None:
        # --overwrite replaces an earlier export; it must not wipe an unrelated directory.
        raise FileExistsError(
            f"{out_dir} is not a model folder written by nlprune export-hf (no {MARKER}); refusing "
            "to delete it even with --overwrite. Choose another output folder or empty it yourself."
        )
    foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in files and p.name != MARKER)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise FileExistsError(
            f"{out_dir} holds files the export did not write ({shown}), which --overwrite would "
            "delete; move them out or choose another output folder."
        )


def export_hf(
    model: LlamaForCausalLM,
    out_dir: str | Path,
    overwrite: bool = False,
    tokenizer: Any = None,
    generation_config: dict[str, Any] | None = None,
    dtype: str = "float32",
    sparsity: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and, when given, ``generation_config.json``
    and the tokenizer's files to ``out_dir``; returns its absolute path.

    With tied embeddings the file has no ``lm_head.weight`` and the config says
    ``tie_word_embeddings: true``, so transformers ties them on load. ``dtype``: the weights'
    dtype in the file (float32, bfloat16, float16; rounded to nearest); ``sparsity``: what
    config.json records under ``nlprune_sparsity`` (ratio, pattern, method, ...).
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).absolute()
    check_target(out_dir, overwrite)
    # Everything that can fail on the model or the arguments fails before the disk is touched.
    target = numpy_dtype(dtype)
    with np.errstate(over="ignore"):  # an overflow is refused by name just below
        state = {k: v.astype(target) for k, v in to_state_dict(model).items()}
    overflow = [k for k, v in state.items() if not np.isfinite(v.astype(np.float32)).all()]
    if overflow:
        raise ExportError(f"{overflow[0]} has values beyond {dtype}'s range; export as float32 or bfloat16.")
    hf_config = {**model.config.to_hf_dict(), "torch_dtype": dtype}
    if sparsity is not None:
        hf_config[SPARSITY_KEY] = sparsity
    config_text = json.dumps(hf_config, indent=2) + "\n"
    gen_text = None
    if generation_config is not None:
        try:
            gen_text = json.dumps(dict(generation_config), indent=2) + "\n"
        except (TypeError, ValueError) as e:
            raise TypeError(f"generation_config must be a JSON-serialisable dict: {e}") from None

    def write(tmp: Path) -> None:
        if tokenizer is not None:
            # First, so that nothing it writes can shadow the files below.
            try:
                tokenizer.save_pretrained(str(tmp))
            except Exception as e:  # a full disk is one line, as for the weights below
                raise (os_error_in(e, out_dir / "tokenizer.json") or e) from None
        # transformers refuses safetensors without a "format" entry in the metadata.
        try:
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        except Exception as e:  # safetensors reports a full disk as SafetensorError
            raise (os_error_in(e, out_dir / WEIGHTS_FILE) or e) from None
        os.chmod(tmp / WEIGHTS_FILE, file_mode())  # safetensors creates its files 0600
        (tmp / "config.json").write_text(config_text)
        if gen_text is not None:
            (tmp / "generation_config.json").write_text(gen_text)
        marker = {"format": MARKER_FORMAT, "version": 1, "files": sorted(p.name for p in tmp.iterdir()),
                  "created": datetime.datetime.now().isoformat(timespec="seconds")}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        check_target(out_dir, overwrite)  # again: nothing foreign may have arrived meanwhile

    return write_atomically(out_dir, write)


def export_run_model(model: Any, record: dict[str, Any], source: Any, tokenizer: Any, output: str | Path,
                     overwrite: bool = False, dtype: str | None = None) -> Path:
    """Write a run's pruned model (``record``: its results.json) as a Hugging Face folder
    (config, safetensors, tokenizer, generation config when the source had one).

    ``dtype`` (float32, bfloat16, float16): default the source checkpoint's (its config.json's
    ``dtype``/``torch_dtype``; a GGUF file: float32). config.json records the run's sparsity
    under ``nlprune_sparsity``. ``source`` is the run's model source (``cards.ModelSource``)
    and ``tokenizer`` its tokenizer; :func:`nlprune.api.export_hf` loads the run and calls this."""
    generation, source_dtype = None, None
    folder = Path(source.weights_path)
    if source.kind == "hf":
        if (folder / "generation_config.json").is_file():
            generation = json.loads((folder / "generation_config.json").read_text())
        try:
            source_config = json.loads((folder / "config.json").read_text())
            source_dtype = source_config.get("dtype") or source_config.get("torch_dtype")
        except (OSError, ValueError, AttributeError):
            pass
    if dtype is None:
        dtype = source_dtype if source_dtype in EXPORT_DTYPES else "float32"
    return export_hf(model, output, overwrite=overwrite, tokenizer=tokenizer,
                     generation_config=generation, dtype=dtype, sparsity=sparsity_summary(record, model))


def sparsity_summary(record: dict[str, Any], model: Any) -> dict[str, Any]:
    """What an export records about a run's sparsity (config.json's ``nlprune_sparsity``): the
    run's request from its record, the sparsity measured on the weights being exported."""
    args, sparsity = record["args"], record.get("sparsity", {})
    planned = sparsity.get("planned") or {}
    from nlprune.prune.pipeline import measured_sparsity_by_layer

    _, measured, per_layer = measured_sparsity_by_layer(model)
    out = {
        "method": args["prune_method"], "pattern": args["sparsity_type"], "ratio": args["sparsity_ratio"],
        "measured": measured, "profile": planned.get("profile", "uniform"),
        "storage": "dense: pruned weights are stored as zeros (simulated sparsity)",
    }
    if out["profile"] != "uniform":
        out["per_layer"] = per_layer
    return out
