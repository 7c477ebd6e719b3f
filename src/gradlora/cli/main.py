"""The ``gradlora`` command: benchmark LoRA methods fairly, or fine-tune with one of them."""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import GradLoraError
from .bench import run_bench
from .config import EXPORTS, BenchConfig, TrainConfig, rate_seeds
from .data import QUANTIZE
from .recipes import RECIPES
from .report import format_table
from .tasks import DATASETS, MODELS
from .train import main_train

BENCH_EPILOG = """\
examples:
  # every method at its documented default rate, 100 steps (a quick look)
  gradlora bench --methods lora,lora-ga,lora-one --steps 100 --no-sweep --out runs/quick

  # the protocol: each method swept over its 3-rate grid with seed 0, best rate picked on the
  # validation split, then seeds 1 and 2 at the best rate of lora and full only
  gradlora bench --methods full,lora,lora-ga,lora-one --steps 150 --seeds 0,1,2 \\
      --extra-seeds-for lora,full --out runs/minilm

  # causal LM: SmolLM2-135M on Hamlet, your own grid for LoRA
  gradlora bench --model smollm2 --data hamlet --batch-size 8 --max-length 128 \\
      --methods lora,lora-ga --steps 60 --lrs lora=2e-4,5e-4,1e-3 --out runs/smollm2

Re-running the same command resumes: every finished run is stored in OUT/runs/ under a hash of
its settings and is not computed again; a changed setting (steps, batch, schedule, data, ...)
computes new runs. Writes OUT/results.json, table.md and losses.png after every method.
"""

TRAIN_EPILOG = """\
examples:
  gradlora train --model minilm --data rotten-tomatoes --method lora-one --steps 300 --out runs/rt
  gradlora train --model minilm --data reviews.csv --method lora-ga --out runs/reviews
  gradlora train --model smollm2 --data notes.jsonl --method lora --lr 5e-4 --out runs/notes
  gradlora train ... --save-every 50 --out runs/long    # then after an interruption:
  gradlora train ... --save-every 50 --out runs/long --resume
  torchrun --nproc_per_node 4 -m gradlora.cli train ... --batch-size 32 --out runs/ddp
      # data-parallel: 8 of each batch of 32 per process (GPU: NCCL, one per process; CPU: gloo)
  torchrun --nproc_per_node 4 -m gradlora.cli train ... --batch-size 32 --fsdp --out runs/fsdp
      # the same, with the model sharded by FSDP2 (each process holds 1/4 of every weight)

Data files: CSV, TSV, JSONL or JSON (a list of objects). With a label column (default "label")
the task is classification; labels may be integers (class ids) or any strings ("pos"/"neg"),
numbered in sorted order (the mapping is printed and saved). Without one, the text is used for
causal language modelling. 10% of the rows are held out as validation and 10% as test.

Output: OUT/adapter (a plain peft adapter; load it with PeftModel.from_pretrained on the
ORIGINAL base model, also after LoRA-GA, PiSSA or peft's LoRA-GA) or OUT/model (full
fine-tuning), OUT/train.json (settings, losses, validation and test metrics); with --export
vllm / merged also OUT/export-vllm / OUT/merged, each checked before it is written.
"""


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _size(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _per_method(items: list[str], flag: str, parse, kind: str) -> dict[str, list]:
    """{method: values} from repeated ``FLAG METHOD=V,V,...`` items (--lrs, --seeds-for)."""
    out = {}
    for item in items:
        method, sep, values = item.partition("=")
        if not sep or method not in RECIPES:
            raise GradLoraError(
                f"{flag} takes METHOD=VALUE[,VALUE...] with METHOD in {', '.join(RECIPES)}; "
                f"got {item!r}"
            )
        if method in out:  # the later list would silently replace the earlier one
            raise GradLoraError(f"{flag} names {method} twice; give its {kind} in one list")
        try:
            out[method] = parse(values)
        except ValueError:
            raise GradLoraError(f"{flag} {item!r}: {kind} must be numbers") from None
        if not out[method]:
            raise GradLoraError(f"{flag} {item!r} gives no {kind}")
    return out


def _check_methods(names: list[str]) -> None:
    unknown = [m for m in names if m not in RECIPES]
    if unknown or not names:
        raise GradLoraError(f"unknown method(s) {unknown}; choose from {', '.join(RECIPES)}")


def _common(p: argparse.ArgumentParser, steps: int, batch: int | None, length: int | None) -> None:
    p.add_argument(
        "--model",
        default="minilm",
        help=f"built-in ({', '.join(MODELS)}) or a local Hugging Face model folder "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--data",
        default="rotten-tomatoes",
        help=f"built-in ({', '.join(DATASETS)}) or a CSV/TSV/JSONL/JSON file (default: %(default)s)",
    )
    p.add_argument(
        "--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch,
        help="examples per step (default: 32 for classification, 8 for causal LM)",
    )
    p.add_argument(
        "--max-length",
        type=int,
        default=length,
        help="tokens per example; hamlet is cut into chunks of this length "
        "(default: 64 for classification, 128 for causal LM)",
    )
    p.add_argument("--rank", type=int, default=8, help="LoRA r (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha (default: %(default)s)")
    p.add_argument(
        "--init-batches",
        type=int,
        default=8,
        help="training batches the gradient inits average over (default: %(default)s)",
    )
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW (default: %(default)s)")
    p.add_argument(
        "--schedule",
        choices=["constant", "linear", "cosine"],
        default="cosine",
        help="learning-rate schedule after warmup (default: %(default)s)",
    )
    p.add_argument("--warmup-steps", type=int, help="linear warmup (default: 3%% of the steps)")
    p.add_argument(
        "--val-size",
        type=_size,
        default=None,
        help="held-out validation examples, a count or a fraction < 1 "
        "(default: 500 for rotten-tomatoes, else 0.1)",
    )
    p.add_argument(
        "--test-size",
        type=_size,
        default=None,
        help="held-out test examples (default: 1000 for rotten-tomatoes, else 0.1)",
    )
    p.add_argument("--num-layers", type=int, help="keep only the first N transformer blocks")
    p.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default=None,
        help="load the base in 4-bit nf4 or 8-bit with bitsandbytes (QLoRA); LoRA methods only",
    )
    p.add_argument(
        "--damping",
        type=float,
        default=None,
        help="lambda of the pair optimizers (lora-one's preconditioned AdamW: 1e-6, lora-pro: "
        "1e-8), added to the r x r Gram matrices B^T B and A A^T (default: the optimizer's)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradlora",
        description="Gradient-informed LoRA (LoRA-GA, LoRA-One, LoRA-Pro) on Hugging Face models. "
        "`gradlora bench` compares fine-tuning methods fairly (same data, batches, seed; "
        "each method at its own tuned learning rate); `gradlora train` fine-tunes with one "
        "method and saves a plain peft adapter; `gradlora methods` lists the methods.",
        epilog="Run `gradlora bench --help` or `gradlora train --help` for examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser(
        "bench",
        help="compare methods: learning-rate sweep on validation, seeds, table and plot",
        description="Benchmark fine-tuning methods with the same model, data order, batches, "
        "dropout draws, schedule and seed; only the method and its learning rate differ.",
        epilog=BENCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(b, steps=150, batch=None, length=None)
    b.add_argument(
        "--methods",
        default="lora,lora-ga,lora-one,lora-pro,full",
        help="comma-separated, from `gradlora methods` (default: %(default)s)",
    )
    b.add_argument(
        "--lrs",
        action="append",
        default=[],
        metavar="METHOD=LR,LR,...",
        help="learning rates of one method, replacing its default grid (repeatable)",
    )
    b.add_argument(
        "--no-sweep",
        action="store_true",
        help="run each method at its documented default rate only (or its --lrs)",
    )
    b.add_argument(
        "--seeds",
        default="0",
        help="comma-separated; the first is used for the sweep, the others only at each "
        "method's best rate (default: %(default)s)",
    )
    b.add_argument(
        "--extra-seeds-for",
        default=None,
        metavar="METHODS",
        help="methods that get the extra seeds (default: all)",
    )
    b.add_argument(
        "--seeds-for",
        action="append",
        default=[],
        metavar="METHOD=SEED,SEED,...",
        help="one method's seeds instead of --seeds; the first is the sweep seed (repeatable)",
    )
    b.add_argument(
        "--seeds-at-rate",
        metavar="LR=SEED,SEED,...",
        help="also run these seeds at LR for every method whose grid holds it (e.g. LoRA's best)",
    )
    b.add_argument(
        "--select",
        choices=["val-loss", "val-acc"],
        default="val-loss",
        help="how the best rate is picked on the validation split (default: %(default)s)",
    )
    b.add_argument("--out", default="runs/bench", help="output folder (default: %(default)s)")

    t = sub.add_parser(
        "train",
        help="fine-tune with one method and save a plain peft adapter",
        description="Fine-tune a model on data with one method; save the adapter (or model).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(t, steps=200, batch=None, length=None)
    t.add_argument(
        "--method", default="lora-one", help="one of `gradlora methods` (default: %(default)s)"
    )
    t.add_argument("--lr", type=float, default=None, help="default: the method's documented rate")
    t.add_argument("--seed", type=int, default=0, help="head init, data order, dropout")
    t.add_argument("--text-column", default="text", help="(default: %(default)s)")
    t.add_argument(
        "--label-column",
        default=None,
        help='column of classification labels (default: "label" if the file has one, '
        "else the task is causal LM); naming a column makes it required",
    )
    t.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    t.add_argument(
        "--resume", action="store_true", help="continue from OUT/checkpoint.pt if it exists"
    )
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument(
        "--fsdp",
        action="store_true",
        help="under torchrun: shard the model with FSDP2 (each layer, then the root) instead of "
        "replicating it with DDP; no checkpoints (--save-every, --resume) yet",
    )
    t.add_argument(
        "--export",
        action="append",
        choices=EXPORTS,
        default=[],
        help="after training also write OUT/export-vllm (a plain LoRA adapter for vLLM or "
        "llama.cpp) or OUT/merged (bf16 merged model); repeatable (docs/serving.md)",
    )

    sub.add_parser("methods", help="list the methods with their learning rates and grids")
    return parser


def _run_fields(args) -> dict:
    """The RunConfig fields common to both commands, from their shared arguments."""
    return dict(
        model=args.model,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        rank=args.rank,
        alpha=args.alpha,
        init_batches=args.init_batches,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        val_size=args.val_size,
        test_size=args.test_size,
        num_layers=args.num_layers,
        quantize=args.quantize,
        damping=args.damping,
        device=args.device,
        progress=not args.no_progress,
    )


def _bench(args) -> int:
    methods = _names(args.methods)
    _check_methods(methods)
    extra = None if args.extra_seeds_for is None else _names(args.extra_seeds_for)
    if extra is not None:
        _check_methods(extra)
    try:
        seeds = _ints(args.seeds)
    except ValueError:
        raise GradLoraError(f"--seeds takes integers like 0,1,2; got {args.seeds!r}") from None
    cfg = BenchConfig(
        **_run_fields(args),
        methods=methods,
        lrs=_per_method(args.lrs, "--lrs", _floats, "learning rates"),
        sweep=not args.no_sweep,
        seeds=seeds,
        extra_seeds_for=extra,
        seeds_for=_per_method(args.seeds_for, "--seeds-for", _ints, "seeds"),
        seeds_at_rate=rate_seeds(args.seeds_at_rate),
        select=args.select,
    )
    cfg.validate()  # before any data, model or gradient is touched
    results, bench = run_bench(cfg, args.out)
    print(format_table(results))
    print(
        f"\n{bench.computed} run(s) computed, {len(bench.runs) - bench.computed} taken from "
        f"{args.out}/runs; wrote {args.out}/results.json, table.md, losses.png"
    )
    return 1 if bench.failed else 0


def _train(args) -> int:
    _check_methods([args.method])
    cfg = TrainConfig(
        **_run_fields(args),
        method=args.method,
        lr=args.lr,
        seed=args.seed,
        text_column=args.text_column,
        label_column=args.label_column,
        save_every=args.save_every,
        resume=args.resume,
        out=args.out,
        fsdp=args.fsdp,
        export=tuple(dict.fromkeys(args.export)),
    )
    cfg.validate()  # before any data, model or gradient is touched
    return main_train(cfg)


def _list_methods() -> int:
    for name, m in RECIPES.items():
        print(f"{name:18s} {m.about}")
        for kind in ("classification", "causal-lm"):
            grid = ", ".join(f"{v:g}" for v in m.grid[kind])
            print(f"{'':18s}   {kind}: lr {m.lr[kind]:g}, grid {grid}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # peft asks transformers a deprecated question on every model; not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
    try:
        if args.command == "bench":
            return _bench(args)
        if args.command == "train":
            return _train(args)
        return _list_methods()
    except GradLoraError as err:
        print(f"gradlora: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gradlora: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
