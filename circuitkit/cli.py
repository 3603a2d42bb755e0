"""The ``circuitkit`` command line.

Each feature area registers its own sub-commands from a small ``cli`` module (listed in
``COMMAND_MODULES``).  A command handler returns a JSON-able dict and, optionally, a
human-readable text; ``--json`` prints the dict.  User errors (``CircuitkitError``) print one
line naming what was wrong and exit with status 2, never with a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from circuitkit.errors import CircuitkitError

COMMAND_MODULES = (
    "circuitkit.models.cli",
    "circuitkit.patching.cli",
    "circuitkit.inversion.cli",
    "circuitkit.hypotheses.cli",
    "circuitkit.verification.cli",
    "circuitkit.circuit.cli",
    "circuitkit.discovery.cli",
    "circuitkit.pipeline.cli",
    "circuitkit.explorer.cli",
)


@dataclass
class Output:
    """What a command produced: ``data`` for --json, ``text`` for people."""

    data: dict[str, Any]
    text: str | None = None


Handler = Callable[[argparse.Namespace], Output]

#: errnos of a write that ran out of room (disk full, file-size limit, quota)
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def add_common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options every command takes."""
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--trust-task", action="store_true",
                   help="run a task file that a checkpoint or decoder names even if you have not named it yourself "
                        "on this machine (it then joins your trusted list; see the README's security section)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="circuitkit",
        description="InversionView decoders and causal circuit verification for transformers.",
    )
    parser.add_argument("--version", action="version", version=f"circuitkit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod_name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and mod_name.startswith(e.name):
                continue  # feature area not installed in this build
            raise
        mod.register(sub)
    return parser


def _version() -> str:
    from circuitkit import __version__

    return __version__


def os_error_message(e: OSError) -> str:
    """One line for an ``OSError``: what failed on which path (``Is a directory: 'out'``)."""
    paths = [str(p) for p in (e.filename, e.filename2) if p is not None]
    where = " -> ".join(repr(p) for p in paths)
    return f"{e.strerror or e}{': ' + where if where else ''}"


def _fail(msg: str, want_json: bool) -> int:
    """Print one error line (and the JSON error object with --json); the exit status of a user error."""
    print(f"circuitkit: error: {msg}", file=sys.stderr)
    if want_json:
        print(json.dumps({"error": msg}))
    return 2


def _ranks(args: argparse.Namespace) -> contextlib.AbstractContextManager[bool]:
    """Under ``torchrun`` the command's process group (``circuitkit.shards``; yields whether this rank reports),
    else nothing (torch is not imported for it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return contextlib.nullcontext(True)
    from circuitkit import shards

    return shards.session(args.command, args)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 2
    want_json = getattr(args, "json", False)
    from circuitkit.tasks.trust import trusting_recorded_files

    try:
        with _ranks(args) as reports, trusting_recorded_files(getattr(args, "trust_task", False)):
            out: Output = args.handler(args)
    except CircuitkitError as e:
        return _fail(str(e), want_json)
    except KeyboardInterrupt:
        print("circuitkit: interrupted", file=sys.stderr)
        return 130
    except UnicodeDecodeError as e:  # a user file that is not UTF-8 (readers that name the file come first)
        return _fail(f"an input file is not UTF-8 text ({e}); save it as UTF-8", want_json)
    except OSError as e:  # a path the user named that cannot be read or written: say which, no traceback
        if e.errno in DISK_FULL:
            return _fail(f"{os_error_message(e)}: the disk is full or a file-size limit was reached while writing; "
                         "nothing half-written was kept (finished stages and earlier artefacts are intact): free "
                         "space and run the same command again", want_json)
        return _fail(os_error_message(e), want_json)
    if not reports:  # a follower rank under torchrun: rank 0 prints
        return 0
    text = out.text if (out.text is not None and not want_json) else json.dumps(out.data, indent=2, default=str)
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. piped into `head`: not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
