"""Entry point of the `ktrans` command (also `python -m ktrans`).

Each subcommand lives in its own module under ktrans/cli/ and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the parsed
arguments and returning an exit code. Modules are imported lazily so `ktrans --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ktrans import __version__
from ktrans.errors import KtransError

# Module names under ktrans.cli, in the order `ktrans --help` lists them.
SUBCOMMANDS = [
    "info",
    "rules",
    "gen_model",
    "chat",
    "generate",
    "serve",
    "weights",
    "probe",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktrans",
        description="Run huge Mixture-of-Experts LLMs on one GPU plus a CPU with lots of RAM.",
    )
    parser.add_argument("--version", action="version", version=f"ktrans {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"ktrans.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KtransError as e:
        print(f"ktrans {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        if not _is_native_user_error(e):
            raise
        print(f"ktrans {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _is_native_user_error(e: Exception) -> bool:
    """The C++ extension reports bad user input (a wrong KTRANS_ISA, say) as KtransValueError,
    which is a ValueError but not a KtransError: print it like one, not as a traceback."""
    from ktrans import _C

    return isinstance(e, getattr(_C, "KtransValueError", ()))


if __name__ == "__main__":
    raise SystemExit(main())
