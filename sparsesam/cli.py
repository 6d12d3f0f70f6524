"""The ``sparsesam`` command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

import torch
from torch.utils.data import DataLoader

from . import sparsify
from .data import load_fashion_mnist
from .models import SmallCNN
from .pruning import global_sparsity, magnitude_prune
from .training import evaluate, train_one_epoch


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def run_demo(args: argparse.Namespace) -> dict:
    """Sparsify a small CNN at ``--sparsity`` (global magnitude), train it on Fashion-MNIST, report."""
    torch.manual_seed(args.seed)
    train_set = load_fashion_mnist(train=True, root=args.data_dir, limit=args.limit)
    test_set = load_fashion_mnist(train=False, root=args.data_dir, limit=args.limit)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, generator=generator)
    test_loader = DataLoader(test_set, batch_size=512)

    model = sparsify(SmallCNN(in_channels=1, num_classes=10, width=args.width))
    magnitude_prune(model, args.sparsity, scope="global")
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    start = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        stats = train_one_epoch(model, train_loader, optimizer, desc=f"epoch {epoch + 1}/{args.epochs}")
        history.append(stats)
        print(f"epoch {epoch + 1}: train loss {stats['loss']:.4f}, train accuracy {stats['accuracy']:.4f}")
    test = evaluate(model, test_loader, desc="test")
    report = {
        "model": f"SmallCNN(width={args.width})",
        "target_sparsity": args.sparsity,
        "sparsity": global_sparsity(model),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "train_history": history,
        "train_seconds": time.perf_counter() - start,
        "train_examples": len(train_set),
        "seed": args.seed,
    }
    print(f"test accuracy {report['test_accuracy']:.4f} at sparsity {report['sparsity']:.4f} "
          f"({report['train_seconds']:.0f} s of training on {len(train_set)} images)")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsesam", description="Robust sparse training for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="sparsify + magnitude-prune a small CNN and train it on Fashion-MNIST")
    demo.add_argument("--sparsity", type=_fraction, default=0.9, help="fraction of weights pruned (default 0.9)")
    demo.add_argument("--epochs", type=_positive_int, default=1)
    demo.add_argument("--width", type=_positive_int, default=16, help="SmallCNN width multiplier")
    demo.add_argument("--batch-size", type=_positive_int, default=128)
    demo.add_argument("--lr", type=float, default=0.05)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--limit", type=_positive_int, default=None, help="use only the first N images of each split")
    demo.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    demo.add_argument("--report", default=None, help="write the results as JSON here")
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"sparsesam {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
