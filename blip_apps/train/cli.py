"""``blip train`` and ``blip synthetic``: the command-line faces of ``blip_apps.train`` and ``blip_apps.synthetic``."""
from __future__ import annotations

import os
import sys

from blip_core import BACKENDS

from .data import TASKS


def cmd_train(args) -> int:
    from .loop import TrainConfig
    from .run import train
    if args.model is None:
        print(f"no --model: starting from a fresh tiny {args.task} model (seed {args.seed})", file=sys.stderr)
    elif not os.path.isdir(args.model):
        from blip_apps.cli import CliError
        raise CliError(f"{args.model}: not a model directory")
    from blip_apps.cli import CliError
    try:
        cfg = TrainConfig(task=args.task, backend=args.backend, steps=args.steps, batch_size=args.batch_size,
                          grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                          clip=args.clip, freeze_vision=args.freeze_vision, eval_every=args.eval_every,
                          save_every=args.save_every, eval_size=args.eval_size, seed=args.seed, threads=args.threads,
                          mixed_precision="bf16" if args.bf16 else "no")
        result = train(args.model, args.data, args.out, cfg, resume=args.resume, progress=not args.no_progress,
                       log=lambda msg: print(msg, file=sys.stderr))
    except (FileNotFoundError, ValueError) as exc:
        raise CliError(str(exc)) from None
    final = {k: round(v, 4) for k, v in (result["final"] or {}).items() if isinstance(v, float)}
    print(f"{args.out}\t{final}\t{result['seconds']:.1f} s")
    return 0


def cmd_synthetic(args) -> int:
    from blip_apps.cli import CliError
    from blip_apps.synthetic import write_dataset
    try:
        write_dataset(args.out, args.train, args.test, args.seed)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    print(f"{args.out}: {args.train} train and {args.test} test images (seed {args.seed})")
    return 0


def add_train_parsers(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a BLIP model (caption, vqa, retrieval) in torch, tf or jax")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--model", default=None, help="model directory to start from (default: a fresh tiny model)")
    p.add_argument("--data", required=True, help="imagefolder data set with train/ and test/ (metadata.jsonl)")
    p.add_argument("--out", required=True, help="output directory (final model, checkpoint-<step>/)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0, help="clip gradients to this global norm (0: off)")
    p.add_argument("--freeze-vision", action="store_true")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=0, help="held-out rows to evaluate (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default; tf and jax keep theirs)")
    p.add_argument("--bf16", action="store_true",
                   help="bfloat16 mixed precision: bfloat16 compute, float32 master weights and optimizer state")
    p.add_argument("--resume", action="store_true", help="continue from the newest OUT/checkpoint-*")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("synthetic", help="write the synthetic shapes data set (imagefolder layout)")
    p.add_argument("out")
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--test", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_synthetic)
