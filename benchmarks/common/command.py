"""The command line that reproduces a benchmark's arguments, written into its results so a number can be re-made.

It is `opd bench NAME ...`, never `python -m benchmarks.X ...`: the name stays when the benchmark's files move."""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Collection


def command_line(name: str, args, skip: Collection[str] = ()) -> str:
    """`opd bench name` with a flag for each field of the dataclass `args` that differs from its default.

    Booleans become `--name` / `--no-name`, tuples `--name a b`, nested dataclasses `--name.field value` for the
    fields that differ from the default's; fields named in `skip` are left out (what `--quick` sets by itself).
    Values are quoted for the shell where they need it (a `--other-load` with spaces).
    """
    flags = []
    for f in dataclasses.fields(args):
        value, default = getattr(args, f.name), f.default
        if f.name in skip or value == default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, tuple):
            flags += [flag, *(shlex.quote(str(v)) for v in value)]
        elif dataclasses.is_dataclass(value):
            flags += [f"{flag}.{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(value).items()
                      if v != getattr(default, k)]
        else:
            flags += [flag, shlex.quote(str(value))]
    return " ".join(["opd bench " + name, *flags])
