"""Export a (pruned) model as a Hugging Face folder that ``transformers`` loads as is.

Masks are folded into the weights, so pruned weights are exact zeros in ``model.safetensors``
(float32, one file). The folder is built in a temporary sibling and swapped in only when
complete (see :func:`nlprune.checkpoint.write_atomically`): a failed export leaves nothing
half-written and never destroys an existing folder first.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nlprune.checkpoint import write_atomically
from nlprune.convert.hf import to_state_dict
from nlprune.modeling.llama import LlamaForCausalLM

WEIGHTS_FILE = "model.safetensors"


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is a file; choose a folder path for the export.")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(
            f"{out_dir} exists and is not empty; pass --overwrite (overwrite=True) to replace "
            "it, or choose another output folder."
        )
    if not (out_dir / "config.json").is_file():
        # --overwrite replaces a model folder; it must not wipe an unrelated directory.
        raise FileExistsError(
            f"{out_dir} is not a model folder (no config.json); refusing to delete it even with "
            "--overwrite. Choose another output folder or empty it yourself."
        )


def export_hf(
    model: LlamaForCausalLM,
    out_dir: str | Path,
    overwrite: bool = False,
    tokenizer: Any = None,
    generation_config: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json``, ``model.safetensors`` and, when given, ``generation_config.json``
    and the tokenizer's files to ``out_dir``; returns its absolute path.

    With tied embeddings the file has no ``lm_head.weight`` and the config says
    ``tie_word_embeddings: true``, so transformers ties them on load.
    """
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).absolute()
    _check_target(out_dir, overwrite)
    # Everything that can fail on the model or the arguments fails before the disk is touched.
    state = to_state_dict(model)
    config_text = json.dumps(model.config.to_hf_dict(), indent=2) + "\n"
    gen_text = None
    if generation_config is not None:
        try:
            gen_text = json.dumps(dict(generation_config), indent=2) + "\n"
        except (TypeError, ValueError) as e:
            raise TypeError(f"generation_config must be a JSON-serialisable dict: {e}") from None

    def write(tmp: Path) -> None:
        if tokenizer is not None:
            # First, so that nothing it writes can shadow the files below.
            tokenizer.save_pretrained(str(tmp))
        # transformers refuses safetensors without a "format" entry in the metadata.
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(config_text)
        if gen_text is not None:
            (tmp / "generation_config.json").write_text(gen_text)

    return write_atomically(out_dir, write)
