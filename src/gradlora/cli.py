"""The ``gradlora`` command: fine-tune the bundled model with several methods and compare them."""

from __future__ import annotations

import argparse
import sys
import warnings

from .compare import RECIPES, CompareConfig


def _lr_overrides(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        method, sep, value = item.partition("=")
        if not sep or method not in RECIPES:
            raise argparse.ArgumentTypeError(
                f"--lr takes METHOD=VALUE with METHOD in {', '.join(RECIPES)}; got {item!r}"
            )
        out[method] = float(value)
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gradlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    cmp = sub.add_parser(
        "compare",
        help="fine-tune MiniLM on Rotten Tomatoes with each method; print a table, write a plot",
        description="Methods: "
        + "; ".join(f"{k}: {v.about} (lr {v.lr:g})" for k, v in RECIPES.items()),
    )
    d = CompareConfig()
    cmp.add_argument(
        "--methods", default=",".join(d.methods), help="comma-separated (default: %(default)s)"
    )
    cmp.add_argument(
        "--steps", type=int, default=d.steps, help="optimizer steps (default: %(default)s)"
    )
    cmp.add_argument("--batch-size", type=int, default=d.batch_size)
    cmp.add_argument("--max-length", type=int, default=d.max_length)
    cmp.add_argument("--rank", type=int, default=d.rank)
    cmp.add_argument("--alpha", type=float, default=d.alpha)
    cmp.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=VALUE",
        help="learning rate of one method",
    )
    cmp.add_argument("--init-batches", type=int, default=d.init_batches)
    cmp.add_argument("--weight-decay", type=float, default=d.weight_decay)
    cmp.add_argument("--schedule", choices=["constant", "linear", "cosine"], default=d.schedule)
    cmp.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    cmp.add_argument(
        "--num-layers", type=int, default=None, help="keep only the first MiniLM layers"
    )
    cmp.add_argument("--seed", type=int, default=d.seed)
    cmp.add_argument("--test-size", type=int, default=d.test_size)
    cmp.add_argument(
        "--out", default="runs/compare", help="folder for results.json, table.md, losses.png"
    )
    cmp.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # peft asks transformers a deprecated question on every model; not the user's concern
    warnings.filterwarnings(
        "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
    )
    from .compare import format_table, run_comparison, save_results

    try:
        lrs = _lr_overrides(args.lr)
    except argparse.ArgumentTypeError as err:
        print(f"gradlora: error: {err}", file=sys.stderr)
        return 2
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in RECIPES]
    if unknown or not methods:
        print(
            f"gradlora: error: unknown method(s) {unknown}; choose from {', '.join(RECIPES)}",
            file=sys.stderr,
        )
        return 2
    cfg = CompareConfig(
        methods=methods,
        steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        rank=args.rank,
        alpha=args.alpha,
        lrs=lrs,
        init_batches=args.init_batches,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        num_layers=args.num_layers,
        seed=args.seed,
        test_size=args.test_size,
        progress=not args.no_progress,
    )
    results = run_comparison(cfg)
    paths = save_results(results, args.out)
    print(format_table(results))
    for r in results["runs"]:
        if r["init"]:
            print(f"{r['method']}: {r['init']}")
    print(f"wrote {paths['json']}, {paths['table']}, {paths['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
