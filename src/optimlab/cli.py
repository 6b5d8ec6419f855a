"""The ``optimlab`` command.  Errors are one line on stderr with exit code 2, never a traceback."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from ._common import WD_MODES
from .registry import list_optimizers


class _Parser(argparse.ArgumentParser):
    def error(self, message):                     # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def _optimizer_name(value: str) -> str:
    if value.lower() not in list_optimizers():
        raise argparse.ArgumentTypeError(
            f"unknown optimizer {value!r}; choose from {', '.join(list_optimizers())}")
    return value.lower()


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="optimlab", description=__doc__)
    parser.add_argument("--version", action="version", version=f"optimlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="train a toy model (3-class spiral) with any optimizer")
    demo.add_argument("--optimizer", type=_optimizer_name, default="adamw",
                      help=f"one of: {', '.join(list_optimizers())} (default adamw)")
    demo.add_argument("--lr", type=float, default=None, help="learning rate (default: per optimizer)")
    demo.add_argument("--weight-decay", type=float, default=None)
    demo.add_argument("--wd-mode", choices=WD_MODES, default=None)
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--seed", type=int, default=0)

    sub.add_parser("list", help="list the optimizers")

    from .train import add_arguments as add_train_arguments
    add_train_arguments(sub.add_parser(
        "train", help="fine-tune a pretrained transformer (default: MiniLM) on SST or CFIMDB"))
    from .bench import add_arguments as add_bench_arguments
    add_bench_arguments(sub.add_parser(
        "bench", help="time every optimizer against torch.optim (GPT-2 small shapes, a small model)"))

    from .wd_convert import add_arguments as add_convert_arguments
    add_convert_arguments(sub.add_parser(
        "convert", help="a weight decay in every convention (torch, optax, Composer, timescale, "
                        "normalized, lr_squared, absolute) for one recipe"))

    from .lab import add_arguments as add_lab_arguments
    add_lab_arguments(sub.add_parser(
        "lab", help="run an experiment of the optimizer lab (plots + report in reports/NAME)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import run_demo
            run_demo(args.optimizer, lr=args.lr, steps=args.steps, weight_decay=args.weight_decay,
                     wd_mode=args.wd_mode, seed=args.seed)
        elif args.command == "list":
            from .registry import REGISTRY
            for name in list_optimizers():
                spec = REGISTRY[name]
                print(f"{name:10s} {spec.description}  [{spec.paper}]")
        elif args.command == "train":
            from .train import exit_code, main as train_main
            return exit_code(train_main(args))
        elif args.command == "convert":
            from .wd_convert import main_args as convert_main
            return convert_main(args)
        elif args.command == "bench":
            from .bench import main_args as bench_main
            return bench_main(args)
        elif args.command == "lab":
            from .lab import main as lab_main
            lab_main(args)
    except (ValueError, OSError) as e:
        print(f"optimlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("optimlab: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
