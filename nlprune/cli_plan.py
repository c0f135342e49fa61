"""``nlprune plan``: the peak memory per device of a prune, from the model's config alone."""

from __future__ import annotations

import argparse

from nlprune.cli_args import add_run_args, write_json
from nlprune.cli_methods import method_options


def cmd_plan(args: argparse.Namespace) -> int:
    from nlprune import parallel
    from nlprune.methods import get_method
    from nlprune.plan import config_of, plan_memory
    from nlprune.sparsity import parse_pattern

    if args.mesh and args.devices:
        raise ValueError("give --mesh or --devices, not both (--devices N is --mesh data=N).")
    if args.devices is not None and args.devices < 1:
        raise ValueError(f"--devices must be >= 1, got {args.devices}.")
    sizes = parallel.parse_mesh_spec(args.mesh) if args.mesh else {"data": args.devices or 1, "model": 1}
    default_ratio = 0.5 if args.sparsity_type == "unstructured" else None
    pattern = parse_pattern(args.sparsity_type, args.sparsity_ratio if args.sparsity_ratio is not None else default_ratio)
    options = method_options(args)
    get_method(args.prune_method, **options).check_pattern(pattern)  # what prune would refuse, plan refuses
    config, name = config_of(args.model)
    settings = dict(
        method=args.prune_method, sparsity_type=args.sparsity_type, nsamples=args.nsamples, seqlen=args.seqlen,
        data=sizes["data"], model=sizes["model"], batch_size=args.batch_size, options=options, stream=args.stream,
        attention_windows=args.attention_windows, dtype=args.dtype,
    )
    if args.output:
        from nlprune.runs import check_output_file

        check_output_file(args.output, overwrite=True)
    if args.memory is not None:
        from nlprune.plan import fit_memory, gib, parse_bytes

        budget = parse_bytes(args.memory)
        plan, flags = fit_memory(config, name, budget, **settings)
        if plan is None:
            smallest = plan_memory(config, name, **{**settings, "stream": True, "batch_size": 1})
            raise ValueError(f"no setting brings {name} under --memory {args.memory}: the least it needs is about "
                             f"{gib(smallest.peak_bytes)} per device (--stream --batch-size 1); "
                             "use more devices (--mesh) or fewer calibration tokens (--nsamples, --seqlen).")
        print(f"peak per device: {gib(plan.peak_bytes)} under --memory {args.memory} with "
              f"{' '.join(flags) if flags else 'the settings as given'}")
    else:
        plan = plan_memory(config, name, **settings)
    print(plan.table())
    if args.output:
        write_json(args.output, plan.as_dict())
        print(f"wrote {args.output}")
    return 0


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="peak memory per device of a prune, from the model's config alone",
        description="Plan the peak memory per device of `nlprune prune`: weights, "
        "calibration hidden states, one layer's activations, Hessians and the non-linear step's "
        "n x n attention, for a mesh, and which options lower it. Needs no weights; takes the "
        "same options as prune.",
    )
    add_run_args(p, required_method=False)
    p.add_argument("--devices", type=int, default=None, help="plan for N devices on 'data' (= --mesh data=N)")
    p.add_argument("--stream", action="store_true", help="plan a streamed run (prune --stream: one layer resident)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the precision the weights are held in, as prune's flag")
    p.add_argument("--attention-windows", type=int, default=4,
                   help="held-out windows of the attention-error metric, as prune's flag (0: none)")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="a memory budget per device (e.g. 80GiB for one 80 GB GPU): pick the least change of settings that "
                   "fits it (--stream, smaller batches, the method's own memory options) and plan with it; on a CPU, "
                   "compare the plan's CPU line (the process) with the machine's memory")
    p.add_argument("--output", default=None, help="also write the plan as JSON here")
    p.set_defaults(func=cmd_plan)
