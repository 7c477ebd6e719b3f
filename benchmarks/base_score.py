"""The untrained base model's scores on a bench task: where every curve of a sweep starts.

Loads the task exactly as ``gradlora bench`` does with the same sizes (the defaults are those
of task (c) in benchmarks/lr_sweeps.sh) and evaluates the pretrained model before any step,
with the bench's own evaluation (validation loss; test loss, and for ``arithmetic`` the answer
match and the exact match of greedy generations). A classifier's head is the seed-0 draw, as in
the seed-0 runs of a sweep. The learning-rate windows (``lr_windows.py``) take their tolerance
from the untrained validation loss; the three sweeps' scores come from:

    python benchmarks/base_score.py --model minilm --data rotten-tomatoes --batch-size 16 \
        --max-length 64 --val-size 0 --test-size 0
    python benchmarks/base_score.py --data hamlet --max-length 32 --val-size 96 --test-size 96

    python benchmarks/base_score.py  # writes benchmarks/results/base_score_<model>_<data>.json
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from gradlora.cli.bench import Bench  # noqa: E402
from gradlora.cli.config import BenchConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="arithmetic")
    parser.add_argument("--batch-size", type=int, default=8)  # sets the evaluation batch too
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--val-size", type=int, default=96, help="0: the task's default split")
    parser.add_argument("--test-size", type=int, default=128, help="0: the task's default split")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        model=args.model,
        data=args.data,
        batch_size=args.batch_size,
        max_length=args.max_length,
        val_size=args.val_size or None,
        test_size=args.test_size or None,
        methods=["lora"],
    )
    bench = Bench(cfg, out_dir="unused")  # only its task and evaluation are used
    model = bench.task.load_base(0, None, bench.device)
    scores = bench.evaluate(model, final=True)
    out = Path(__file__).parent / "results" / f"base_score_{args.model}_{args.data}.json"
    out.write_text(json.dumps({"args": vars(args), **scores}, indent=1) + "\n")
    print(json.dumps(scores, indent=1))


if __name__ == "__main__":
    main()
