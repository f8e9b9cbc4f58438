"""python -m engine.planner --model llama3-8b --seq-length 524288 --gpus 8 --gpu-memory-gb 80"""
from __future__ import annotations

import argparse
import sys

from engine.model.config import MODEL_CONFIGS, get_model_config
from engine.planner.memory import GIB, USABLE_FRACTION, Workload
from engine.planner.plan import plan_layouts

COLUMNS = ("weights", "gradients", "optimizer", "activations", "logits", "communication", "total")


def _row(plan) -> str:
    gib = plan.memory.as_gib()
    return (f"{plan.layout.describe():<64}" + "".join(f"{gib[c]:>9.1f}" for c in COLUMNS)
            + f"{plan.cost:>7.2f}")


def layout_overrides(layout) -> str:
    """The layout as engine.train settings, e.g. "parallel.tensor_parallel=2 ..." (data parallel
    is what the world size leaves, so it is not one)."""
    settings = {key: value for key, value in layout.to_dict().items()
                if key not in layout.DERIVED}
    return " ".join(f"parallel.{key}={str(value).lower() if isinstance(value, bool) else value}"
                    for key, value in settings.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama3-8b", choices=sorted(MODEL_CONFIGS))
    parser.add_argument("--seq-length", type=int, required=True, help="tokens per sequence")
    parser.add_argument("--gpus", type=int, required=True)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--global-batch", type=int, default=16,
                        help="sequences per step (ProLong 512K: 16)")
    parser.add_argument("--cp-algorithm", choices=("all-gather", "ulysses", "both"),
                        default="both")
    parser.add_argument("--loss", choices=("fused", "megatron"), default="fused",
                        help="fused: chunked linear + cross-entropy; megatron: full logits")
    parser.add_argument("--all", action="store_true", help="list every layout that fits")
    parser.add_argument("--overrides", action="store_true",
                        help="print only the recommended layout, as engine.train settings "
                             "(parallel.key=value ...); the table goes to stderr if none fits")
    args = parser.parse_args(argv)
    if args.gpus < 1 or args.gpus & (args.gpus - 1):
        parser.error(f"--gpus {args.gpus}: the planner enumerates powers of two; round to one")
    model = get_model_config(args.model)
    work = Workload(args.seq_length, args.micro_batch,
                    fused_cross_entropy=args.loss == "fused")
    algorithms = ("all-gather", "ulysses") if args.cp_algorithm == "both" else (args.cp_algorithm,)
    fitting, missing = plan_layouts(model, work, args.gpus, args.gpu_memory_gb, algorithms,
                                    args.global_batch)
    if args.overrides and fitting:
        print(layout_overrides(fitting[0].layout))
        return 0
    if args.overrides:
        sys.stdout = sys.stderr  # the diagnosis, where a caller reading the settings shows it
    budget = args.gpu_memory_gb * GIB * USABLE_FRACTION / GIB
    print(f"{args.model} ({model.num_parameters() / 1e9:.2f}B parameters), seq_length "
          f"{args.seq_length}, micro-batch {args.micro_batch}, global batch {args.global_batch}, "
          f"{args.gpus} x {args.gpu_memory_gb:g} GB (budget {budget:.1f} GiB per GPU = "
          f"{USABLE_FRACTION:.0%}), bf16, distributed optimizer, {args.loss} loss")
    header = f"{'layout':<64}" + "".join(f"{c[:8]:>9}" for c in COLUMNS) + f"{'cost':>7}"
    print("GiB per GPU (heaviest pipeline stage):")
    print(header)
    if not fitting:
        print("no layout fits; the closest:")
        for plan in missing[:5]:
            print(_row(plan))
        print(f"fix: more GPUs (CP splits activations), --gpu-memory-gb, or a shorter "
              f"--seq-length than {args.seq_length}")
        return 1
    shown = fitting if args.all else fitting[:12]
    for plan in shown:
        print(_row(plan))
    if len(shown) < len(fitting):
        print(f"... {len(fitting) - len(shown)} more fit (--all lists them)")
    best = fitting[0]
    print(f"\nrecommended: {best.layout.describe()} -- {best.memory.total / GIB:.1f} GiB of "
          f"{budget:.1f} per GPU (cost {best.cost:.2f}: recompute, pipeline bubble and "
          f"model-parallel communication, relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
