"""Parity of nlprune's lm-eval adapter with lm-eval's own ``hf`` model on the zero-shot tasks.

Both score the same local task configs (``nlprune.eval.tasks``) through lm-eval's evaluator,
task by task, alternating: nlprune's ``NlpruneLM`` on the Equinox model, then lm-eval's
``HFLM`` (transformers, float32, CPU) on the same weights exported with ``export_hf``. Per
task the record has the items scored, how many per-example choices agree (the argmax answer,
and the length-normalised one where acc_norm is reported; greedy-ness for LAMBADA), both
accuracies and both times.

    .venv/bin/python benchmarks/tasks/task_parity.py --limit 250 --output benchmarks/tasks/parity_smollm2_limit250.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def export_dense(loaded: Any, folder: Path) -> Path:
    from nlprune.convert.export import export_hf

    return export_hf(loaded.model, folder, tokenizer=loaded.tokenizer)


def hf_model(folder: Path, batch_size: int) -> Any:
    """lm-eval's own hf model on an exported folder, float32 on the CPU."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=batch_size)


def request_tokens(loaded: Any, tasks: list[str], task_data_dir: Path, limit: int | None) -> dict[str, dict[str, int]]:
    """Per task, without scoring: examples, requests, the distinct model inputs the adapter
    forwards and their tokens (the cost of a pass is about proportional to these tokens)."""
    from nlprune.eval.harness import NlpruneLM
    from nlprune.eval.tasks import task_manager
    from nlprune.eval.tasks.runner import quiet_lm_eval

    lm = NlpruneLM(loaded.model, loaded.tokenizer, progress=False)
    counts = {}
    with quiet_lm_eval():
        loaded_tasks = task_manager(task_data_dir).load(tasks)["tasks"]
        for name in tasks:
            task = loaded_tasks[name]
            task.set_config(key="num_fewshot", value=0)
            task.build_all_requests(limit=limit)
            pairs = [lm.encode_pair(*inst.args) for inst in task.instances]
            inputs, _ = lm.unique_inputs(pairs)
            counts[name] = {"examples": len({inst.doc_id for inst in task.instances}), "requests": len(pairs),
                            "inputs": len(inputs), "tokens": sum(map(len, inputs))}
    return counts


def compare(
    loaded: Any,
    tasks: list[str],
    task_data_dir: Path,
    limit: int | None,
    batch_size: int = 32,
    workdir: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score ``tasks`` with both models, alternating per task; the parity record."""
    from nlprune.eval.harness import NlpruneLM
    from nlprune.eval.tasks.runner import agreement, run_tasks

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = export_dense(loaded, Path(tmp) / "hf")
        ours_lm = NlpruneLM(loaded.model, loaded.tokenizer, batch_size=batch_size, progress=progress)
        theirs_lm = hf_model(folder, batch_size)
        per_task: dict[str, Any] = {}
        for name in tasks:
            runs = {}
            for side, lm in (("nlprune", ours_lm), ("hf", theirs_lm)):
                start = time.perf_counter()
                runs[side] = run_tasks(None, None, [name], task_data_dir, limit=limit, batch_size=batch_size,
                                       progress=progress, keep_predictions=True, lm=lm)
                runs[side]["wall_seconds"] = time.perf_counter() - start
            ours, theirs = (runs[s]["tasks"][name] for s in ("nlprune", "hf"))
            per_task[name] = {
                **agreement(runs["nlprune"]["predictions"][name], runs["hf"]["predictions"][name]),
                **{f"{metric}_{side}": runs[side]["tasks"][name][metric]
                   for metric in ("acc", "acc_norm", "perplexity") if metric in ours for side in ("nlprune", "hf")},
                "seconds_nlprune": ours["seconds"], "seconds_hf": theirs["seconds"],
                "total_examples": ours["total_examples"],
            }
            print(f"{name}: {per_task[name]['agree']}/{per_task[name]['items']} choices agree; acc "
                  f"{ours['acc']:.4f} (nlprune) vs {theirs['acc']:.4f} (hf); {ours['seconds']:.1f} s vs {theirs['seconds']:.1f} s",
                  file=sys.stderr)
    items = sum(t["items"] for t in per_task.values())
    agree = sum(t["agree"] for t in per_task.values())
    return {
        "tasks": per_task,
        "items": items,
        "agree": agree,
        "agreement": agree / items if items else float("nan"),
        "seconds_nlprune": sum(t["seconds_nlprune"] for t in per_task.values()),
        "seconds_hf": sum(t["seconds_hf"] for t in per_task.values()),
        "nlprune_forward": ours_lm.describe(),
        "limit": limit,
        "batch_size": batch_size,
    }


def main(argv: list[str] | None = None) -> int:
    from nlprune import api
    from nlprune.eval.tasks import DEFAULT_TASKS, parse_task_list, resolve_task_data_dir
    from nlprune.runs import write_json

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
    p.add_argument("--task-data-dir", default=None, help="default: $NLPRUNE_DATA_DIR/tasks")
    p.add_argument("--limit", type=int, default=250, help="examples per task (default 250)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--output", required=True, help="JSON record to write")
    p.add_argument("--no-full-count", action="store_true", help="skip counting the tokens of a full pass")
    args = p.parse_args(argv)
    loaded = api.load(args.model)
    tasks, task_dir = parse_task_list(args.tasks), resolve_task_data_dir(args.task_data_dir)
    start = time.perf_counter()
    record = compare(loaded, tasks, task_dir, args.limit, args.batch_size)
    if not args.no_full_count:
        # The full pass, estimated from this one: each task's seconds scaled by its tokens.
        scored, full = request_tokens(loaded, tasks, task_dir, args.limit), request_tokens(loaded, tasks, task_dir, None)
        for name in tasks:
            entry = record["tasks"][name]
            entry.update(tokens=scored[name], full_pass_tokens=full[name])
            entry["full_pass_seconds_estimate"] = entry["seconds_nlprune"] * full[name]["tokens"] / scored[name]["tokens"]
        record["full_pass_seconds_estimate"] = sum(record["tasks"][n]["full_pass_seconds_estimate"] for n in tasks)
    record.update(
        model=loaded.describe(), command=" ".join(sys.argv), wall_seconds=time.perf_counter() - start,
        machine={**api.machine(), "load_average_at_end": list(__import__("os").getloadavg())},
    )
    write_json(Path(args.output), record)
    print(json.dumps({k: record[k] for k in ("items", "agree", "agreement", "seconds_nlprune", "seconds_hf")}, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
