"""
What every entry point shares: its config dataclass filled from the command line (as nanoGPT's configurator.py),
and LLaVA-1.5's learning-rate schedule. Imports nothing of the project, so every file can use it.
"""
import dataclasses
import math


def parse_args(cls, argv):
    """`--key value` or `--key=value` for each field of the dataclass; a bare `--flag` sets a bool.
    Returns the config and the set of names given."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values, i = {}, 0
    while i < len(argv):
        key, eq, val = argv[i].partition("=")
        name = key[2:].replace("-", "_")
        if not key.startswith("--") or name not in fields:
            raise SystemExit(f"unknown argument {argv[i]!r}; options: {' '.join('--' + n for n in fields)}")
        kind = type(fields[name].default)
        if not eq:
            bare = i + 1 == len(argv) or argv[i + 1].startswith("--")
            if bare and kind is not bool:
                raise SystemExit(f"--{name} needs a value")
            val, i = ("true", i) if bare else (argv[i + 1], i + 1)
        if kind is bool:
            if val.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"--{name} takes true or false, got {val!r}")
            values[name] = val.lower() in ("true", "1", "yes")
        else:
            try:
                values[name] = kind(val)
            except ValueError:
                raise SystemExit(f"--{name} takes a {kind.__name__}, got {val!r}")
        i += 1
    return cls(**values), set(values)


def lr_factor(step, total, warmup_ratio):
    # LLaVA-1.5's schedule: linear warmup over the first 3% of the steps, then cosine decay to 0
    warmup = max(1, math.ceil(total * warmup_ratio))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

