"""Command-line entry points: `bpfilter SUBCOMMAND` and the iptables-compatible tools."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bpfilter import __version__

if TYPE_CHECKING:
    import argparse

# Each subcommand lives in its own module `bpfilter.cmd_<name>` exposing
# `register(subparsers) -> argparse.ArgumentParser` and `run(args) -> int`.
SUBCOMMANDS: tuple[str, ...] = ("demo", "translate", "flush", "status", "log", "attach",
                               "responder", "set")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser with every subcommand, or with ``only`` that one (its module alone is
    imported: some pull in the whole kernel layer, which a `translate` need not pay for)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="bpfilter",
        description="Compile iptables and nftables rulesets into eBPF programs.",
    )
    parser.add_argument("--version", action="version", version=f"bpfilter {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in (only,) if only is not None else SUBCOMMANDS:
        module = importlib.import_module(f"bpfilter.cmd_{name}")
        p = module.register(sub)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    first = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 2
    rc: int = args._run(args)
    return rc


def restore_main() -> int:
    from bpfilter import restore

    return restore.main(sys.argv[1:], 4)


def restore6_main() -> int:
    from bpfilter import restore

    return restore.main(sys.argv[1:], 6)


def save_main() -> int:
    from bpfilter import save

    return save.main(sys.argv[1:], 4)


def save6_main() -> int:
    from bpfilter import save

    return save.main(sys.argv[1:], 6)


def iptables_main() -> int:
    # A blocklist change takes a path that imports only the kernel layer (bpfilter.fastcmd);
    # every other command goes on from there to bpfilter.iptables_cmd.
    from bpfilter import fastcmd

    return fastcmd.main(sys.argv[1:], 4)


def ip6tables_main() -> int:
    from bpfilter import iptables_cmd

    return iptables_cmd.main(sys.argv[1:], 6)


if __name__ == "__main__":
    sys.exit(main())
