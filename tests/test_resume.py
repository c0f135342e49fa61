"""A pruning run killed after a few layers resumes to exactly the uninterrupted result."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from nlprune import api

KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    from nlprune import api
    from nlprune.runs import RunDir

    kill_after = int(sys.argv[3])
    original = RunDir.save_layer

    def save_then_die(self, index, *args, **kwargs):
        original(self, index, *args, **kwargs)
        if index == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, like a lost machine

    RunDir.save_layer = save_then_die
    api.prune(sys.argv[1], "sparsegpt", 0.5, nsamples=4, seqlen=64, data_dir=sys.argv[2],
              output=sys.argv[4], progress=False)
    """
)


def test_killed_run_resumes_identically(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tiny_model_dir), str(shared_data_dir), "2", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not (out / "results.json").exists() and (out / "progress" / "layer-002").exists()

    common = dict(nsamples=4, seqlen=64, data_dir=shared_data_dir, progress=False)
    resumed, record = api.prune(str(tiny_model_dir), "sparsegpt", 0.5, output=out, **common)
    assert record["resumed_from_layer"] == 3
    straight, _ = api.prune(str(tiny_model_dir), "sparsegpt", 0.5, output=tmp_path / "straight", **common)

    leaves_a, tree_a = jax.tree.flatten(api.load_run(out)[0])
    leaves_b, tree_b = jax.tree.flatten(straight)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert json.loads((out / "results.json").read_text())["sparsity"]["overall"] == pytest.approx(0.5)


def test_resume_refuses_other_settings(tiny_model_dir, shared_data_dir, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tiny_model_dir), str(shared_data_dir), "1", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == -9
    with pytest.raises(ValueError, match="seed: saved 0, now 1"):
        api.prune(str(tiny_model_dir), "sparsegpt", 0.5, nsamples=4, seqlen=64, seed=1,
                  data_dir=shared_data_dir, output=out, progress=False)
