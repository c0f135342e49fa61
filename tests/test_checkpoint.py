"""Orbax checkpoints of models and pipeline state: exact round trips, refusals, crash safety."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nlprune import checkpoint as ckpt
from nlprune.checkpoint import (
    SIDECAR,
    CheckpointError,
    load_model,
    load_state,
    save_model,
    save_state,
)
from nlprune.convert.hf import expected_shapes, from_state_dict
from nlprune.modeling.llama import LlamaConfig
from nlprune.modeling.masks import linear_paths, mask_filter_spec, with_masks
from nlprune.packed_masks import load_packed_masks, save_packed_masks, set_masks

REPO = Path(__file__).resolve().parents[1]


def random_llama(config: LlamaConfig, seed: int = 0):
    """Random weights from numpy: no XLA compilation, so tests stay fast on 2 cores."""
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(config)
    return from_state_dict(config, {k: rng.standard_normal(s, np.float32) for k, s in shapes.items()})


def tiny_config(**overrides) -> LlamaConfig:
    cfg = dict(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=(2, 3),
    )
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def random_masks(model, seed: int = 0, density: float = 0.5):
    rng = np.random.default_rng(seed)
    masks, rest = eqx.partition(model, mask_filter_spec(model))
    masks = jax.tree.map(lambda m: jnp.asarray(rng.random(m.shape) < density, m.dtype), masks)
    return eqx.combine(masks, rest)


def make_model(masks: str = "random", seed: int = 0, **overrides):
    model = random_llama(tiny_config(**overrides), seed)
    if masks == "none":
        return model
    model = random_masks(with_masks(model), seed)
    if masks == "partial":  # only some linears carry a mask
        model = eqx.tree_at(lambda m: m.model.layers[1].mlp.up_proj.mask, model, None)
    return model


def assert_identical(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes()  # bit for bit, -0.0 and NaN payloads included


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("masks", ["none", "random", "partial"])
def test_model_round_trip_bit_for_bit(tmp_path, tied, masks):
    model = make_model(masks, tie_word_embeddings=tied, attention_bias=True)
    meta = {"card": "tiny", "weights_sha256": "ab" * 32, "args": {"sparsity": 0.5}}
    save_model(tmp_path / "ck", model, meta)
    restored, meta2 = load_model(tmp_path / "ck", expect_config=model.config)
    assert_identical(model, restored)
    assert meta2 == meta
    assert (restored.lm_head is None) == tied
    assert isinstance(jax.tree.leaves(restored)[0], jax.Array)


def test_binary_masks_are_stored_bit_packed(tmp_path):
    model = make_model("random")
    save_model(tmp_path / "ck", model, {})
    leaves = json.loads((tmp_path / "ck" / SIDECAR).read_text())["leaves"]
    mask_info = leaves["model.layers.0.mlp.up_proj.mask"]
    assert mask_info["encoding"] == "packbits" and mask_info["stored_dtype"] == "uint8"
    assert mask_info["stored_shape"] == [96 * 64 // 8] and mask_info["dtype"] == "float32"
    assert leaves["model.layers.0.mlp.up_proj.weight"]["encoding"] == "raw"


def test_non_binary_masks_are_stored_raw_and_exact(tmp_path):
    """Soft masks and -0.0 cannot be bit-packed; they must still come back bit for bit."""
    model = make_model("random")
    soft = jnp.linspace(-1.0, 1.0, 96 * 64, dtype=jnp.float32).reshape(96, 64)
    negzero = jnp.full((64, 64), -0.0, jnp.float32)
    model = eqx.tree_at(lambda m: m.model.layers[0].mlp.up_proj.mask, model, soft)
    model = eqx.tree_at(lambda m: m.model.layers[0].self_attn.q_proj.mask, model, negzero)
    save_model(tmp_path / "ck", model, {})
    leaves = json.loads((tmp_path / "ck" / SIDECAR).read_text())["leaves"]
    assert leaves["model.layers.0.mlp.up_proj.mask"]["encoding"] == "raw"
    assert leaves["model.layers.0.self_attn.q_proj.mask"]["encoding"] == "raw"
    assert_identical(model, load_model(tmp_path / "ck")[0])


def test_resave_replaces_previous_checkpoint(tmp_path):
    path = tmp_path / "ck"
    save_model(path, make_model("none", seed=0), {"step": 1})
    second = make_model("random", seed=1)
    save_model(path, second, {"step": 2})
    restored, meta = load_model(path)
    assert meta == {"step": 2}
    assert_identical(second, restored)
    assert leftovers(path) == []


def test_state_round_trip_keeps_structure_types_and_bits(tmp_path):
    rng = np.random.default_rng(0)
    state = {
        "layer": 3,
        "pruned": {"model.layers.0.mlp.up_proj.mask": rng.random((8, 4)) < 0.5},
        "activations": [
            jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32),
            jnp.asarray(rng.standard_normal((3,)), jnp.bfloat16),
        ],
        "inputs": (np.arange(10, dtype=np.int32), np.float64(2.5), None, "c4"),
        "nan": np.array([np.nan, -0.0, np.inf], np.float32),
        "empty": np.zeros((0, 4), np.float32),
    }
    save_state(tmp_path / "state", state, {"model": "tiny", "next_layer": 1})
    restored, meta = load_state(tmp_path / "state")
    assert meta == {"model": "tiny", "next_layer": 1}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        assert type(a) is type(b) or (isinstance(a, jax.Array) and isinstance(b, jax.Array))
        if isinstance(a, (np.ndarray, np.generic, jax.Array)):
            assert np.asarray(a).dtype == np.asarray(b).dtype
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        else:
            assert a == b
    assert isinstance(restored["inputs"], tuple) and isinstance(restored["activations"], list)


def test_state_refuses_unsupported_leaves_before_writing(tmp_path):
    with pytest.raises(TypeError, match=r"state\['bad'\].*set"):
        save_state(tmp_path / "s", {"bad": {1, 2}}, {})
    with pytest.raises(TypeError, match="JSON"):
        save_state(tmp_path / "s", {"a": np.zeros(2)}, {"oops": object()})
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- refusals


def test_config_mismatch_names_the_fields(tmp_path):
    save_model(tmp_path / "ck", make_model("none"), {})
    other = tiny_config(hidden_size=128, num_hidden_layers=3)
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "ck", expect_config=other)
    msg = str(err.value)
    assert "hidden_size: checkpoint 64, model 128" in msg
    assert "num_hidden_layers: checkpoint 2, model 3" in msg
    assert "intermediate_size" not in msg  # only the differing fields


def test_missing_and_incomplete_checkpoints_are_explained(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*does not exist"):
        load_model(tmp_path / "nothing")

    save_model(tmp_path / "ck", make_model("none"), {})
    (tmp_path / "ck" / SIDECAR).unlink()
    with pytest.raises(CheckpointError, match=f"{SIDECAR} is missing.*Save it again"):
        load_model(tmp_path / "ck")

    save_model(tmp_path / "ck2", make_model("none"), {})
    import shutil

    shutil.rmtree(tmp_path / "ck2" / "arrays")
    with pytest.raises(CheckpointError, match="Orbax array directory .* is missing"):
        load_model(tmp_path / "ck2")

    save_state(tmp_path / "st", {"x": np.ones(3)}, {})
    with pytest.raises(CheckpointError, match="load_state"):
        load_model(tmp_path / "st")


def test_corrupt_array_files_raise_checkpoint_error(tmp_path):
    save_model(tmp_path / "ck", make_model("random"), {})
    data = [p for p in (tmp_path / "ck" / "arrays").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert data
    for p in data:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    # The sidecar's file checksums find the damage before Orbax reads a byte ...
    with pytest.raises(CheckpointError, match=r"differ from their checksums \(d/.*corrupt"):
        load_model(tmp_path / "ck")
    # ... and a checkpoint without them (an older nlprune's) still fails in one clear error.
    sidecar = json.loads((tmp_path / "ck" / SIDECAR).read_text())
    del sidecar["files"], sidecar["checksum"]
    (tmp_path / "ck" / SIDECAR).write_text(json.dumps(sidecar))
    with pytest.raises(CheckpointError, match="cannot restore the arrays .* corrupt or incomplete"):
        load_model(tmp_path / "ck")


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not an nlprune checkpoint"):
        save_model(precious, make_model("none"), {})
    assert (precious / "notes.txt").read_text() == "keep me"
    assert leftovers(precious) == []


# --------------------------------------------------------------------------- crashes


def test_failed_orbax_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    first = make_model("random", seed=0)
    save_model(path, first, {"step": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "_checkpointer", lambda: type("C", (), {"save": boom})())
    with pytest.raises(OSError, match="simulated"):
        save_model(path, make_model("random", seed=1), {"step": 2})
    monkeypatch.undo()
    restored, meta = load_model(path)
    assert meta == {"step": 1}
    assert_identical(first, restored)
    assert leftovers(path) == []


def test_failed_final_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    first = make_model("random", seed=0)
    save_model(path, first, {"step": 1})
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".ck.tmp-"):
            raise OSError("killed during the swap (simulated)")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)  # the swap lives in nlprune.atomic
    with pytest.raises(OSError, match="simulated"):
        save_model(path, make_model("random", seed=1), {"step": 2})
    monkeypatch.undo()
    # The previous checkpoint, already moved aside for the swap, was put back in place.
    restored, meta = load_model(path)
    assert meta == {"step": 1}
    assert_identical(first, restored)
    assert leftovers(path) == []


_CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import numpy as np
    from nlprune import checkpoint as ckpt
    from nlprune.convert.hf import expected_shapes, from_state_dict
    from nlprune.modeling.llama import LlamaConfig

    path, where = Path(sys.argv[1]), sys.argv[2]
    cfg = LlamaConfig(**eval(sys.argv[3]))
    rng = np.random.default_rng(123)
    model = from_state_dict(cfg, {k: rng.standard_normal(s, np.float32) for k, s in expected_shapes(cfg).items()})

    def hang():
        print("HANG", flush=True)
        time.sleep(600)

    if where == "arrays":  # killed after Orbax wrote the arrays, before the sidecar
        real = ckpt._checkpointer
        class Slow:
            def save(self, *a, **k):
                real().save(*a, **k)
                hang()
        ckpt._checkpointer = Slow
    else:  # killed between the two renames of the swap: nothing at `path`
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            if Path(src) == path.absolute():
                hang()
        os.rename = rename
    ckpt.save_model(path, model, {"step": "child"})
    """
)


@pytest.mark.parametrize("where", ["arrays", "swap"])
def test_killed_save_keeps_previous_checkpoint(tmp_path, where):
    path = tmp_path / "ck"
    cfg = tiny_config()
    first = random_masks(with_masks(random_llama(cfg, 7)), 7)
    save_model(path, first, {"step": 1})

    fields = {f: getattr(cfg, f) for f in ("vocab_size", "hidden_size", "intermediate_size",
              "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
              "max_position_embeddings", "bos_token_id", "eos_token_id")}
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path), where, repr(fields)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        line = child.stdout.readline()  # the child blocks at the chosen point of the save
    finally:
        child.kill()  # SIGKILL: no cleanup handlers run
        _, err = child.communicate(timeout=60)
    assert line.strip() == "HANG", err

    debris = leftovers(path)
    assert any(".tmp-" in d for d in debris)  # the child's unfinished (or unswapped) save
    if where == "swap":
        assert not path.exists() and any(".old-" in d for d in debris)
        # The temporary directory is not mistaken for a checkpoint.
        with pytest.raises(CheckpointError, match="interrupted save"):
            load_model(path.parent / next(d for d in debris if ".tmp-" in d))

    restored, meta = load_model(path)  # recovers the set-aside version in the "swap" case
    assert meta == {"step": 1}
    assert_identical(first, restored)

    # The next save clears the dead writer's debris.
    save_model(path, first, {"step": 2})
    assert leftovers(path) == []
    assert load_model(path)[1] == {"step": 2}


def test_incomplete_temporary_directory_is_reported(tmp_path):
    path = tmp_path / "ck"
    stale = tmp_path / ".ck.tmp-otherhost-123-abcd1234"  # another host: left alone
    stale.mkdir()
    with pytest.raises(CheckpointError, match="interrupted save left .*ck.tmp-otherhost.*incomplete"):
        load_model(path)
    with pytest.raises(CheckpointError, match="temporary directory left by an interrupted save"):
        load_model(stale)


# --------------------------------------------------------------------------- packed masks


def test_packed_masks_round_trip_and_are_32x_smaller(tmp_path):
    model = make_model("random", hidden_size=256, intermediate_size=512, head_dim=64)
    model = eqx.tree_at(lambda m: m.model.layers[1].mlp.up_proj.mask, model, None)
    path = save_packed_masks(tmp_path / "masks.safetensors", model)
    masks = load_packed_masks(path)

    linears = [lin for layer in model.model.layers for lin in layer.linears().values()]
    expected = {
        f"{p}.weight": np.asarray(lin.mask) != 0
        for p, lin in zip(linear_paths(model.config), linears)
        if lin.mask is not None
    }
    assert set(masks) == set(expected) and "model.layers.1.mlp.up_proj.weight" not in masks
    for k in expected:
        assert masks[k].dtype == np.bool_
        np.testing.assert_array_equal(masks[k], expected[k])

    float_bytes = sum(m.size * 4 for m in expected.values())
    ratio = float_bytes / path.stat().st_size
    assert 28 <= ratio <= 32, ratio  # 1 bit per weight, plus a small header

    # Put back onto the dense weights: identical to the original masked model.
    dense = make_model("none", hidden_size=256, intermediate_size=512, head_dim=64)
    assert_identical(model, set_masks(dense, masks))


_WRITE_MASKS = textwrap.dedent(
    """
    import sys
    import numpy as np
    from nlprune.packed_masks import save_packed_masks
    from nlprune.convert.hf import expected_shapes, from_state_dict
    from nlprune.modeling.llama import LlamaConfig
    from nlprune.modeling.masks import with_masks

    cfg = LlamaConfig(**eval(sys.argv[2]))
    rng = np.random.default_rng(3)
    model = with_masks(from_state_dict(cfg, {k: rng.standard_normal(s, np.float32) for k, s in expected_shapes(cfg).items()}))
    save_packed_masks(sys.argv[1], model)
    """
)


def test_packed_masks_of_the_same_model_are_the_same_bytes(tmp_path):
    """Two processes (each with its own hash seeds) write the same masks byte for byte, so a
    file hash compares runs; the library's own output orders the header by hash."""
    cfg = tiny_config()
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    files = [tmp_path / f"m{k}.safetensors" for k in range(2)]
    for k, f in enumerate(files):
        proc = subprocess.run([sys.executable, "-c", _WRITE_MASKS, str(f), repr(fields)], capture_output=True,
                              text=True, env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONHASHSEED": str(k + 1)})
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert files[0].read_bytes() == files[1].read_bytes()
    header = json.loads(files[0].read_bytes()[8 : 8 + int.from_bytes(files[0].read_bytes()[:8], "little")])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert load_packed_masks(files[0]).keys() == load_packed_masks(files[1]).keys()


def test_packed_masks_refuse_models_without_masks_and_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="no masks"):
        save_packed_masks(tmp_path / "m.safetensors", make_model("none"))
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(3, np.uint8)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="not an nlprune packed masks file"):
        load_packed_masks(tmp_path / "other.safetensors")
