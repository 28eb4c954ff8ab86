"""lorakit's benchmark suite, one command: prints a markdown section per benchmark.

    python benchmarks/run.py                          # preset cpu: every benchmark, float32 and bfloat16
    python benchmarks/run.py --preset gpu             # CUDA, bfloat16, a 542M Llama shape (< 5 min on an H200)
    python benchmarks/run.py --preset tiny            # a seconds-long smoke run of every code path
    python benchmarks/run.py --only train,memory      # some of the benchmarks
    python benchmarks/run.py --write BENCHMARKS.md    # also replace the preset's generated section there

Benchmarks (one module each in benchmarks/, shared timing and tables in harness.py, presets in workloads.py):
train, inference, merge, convert, memory, mixed_batch, xlora, quantized (LoRA on bitsandbytes nf4/int8 and torchao int8
bases), dora, moe (a Mixtral-shaped model with its experts targeted). Contenders are interleaved over several rounds in
one run and compared by per-round ratios; run it on a quiet machine, as anything else running skews the ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the suite's modules import each other by plain name
    sys.path.insert(0, str(HERE))

import convert  # noqa: E402
import dora  # noqa: E402
import harness  # noqa: E402
import inference  # noqa: E402
import memory  # noqa: E402
import merge  # noqa: E402
import mixed_batch  # noqa: E402
import moe  # noqa: E402
import quantized  # noqa: E402
import train  # noqa: E402
import xlora  # noqa: E402
from workloads import PRESETS, Preset, torch_dtype  # noqa: E402

# transformers 5 deprecates a method peft 0.21 still calls; the warning says nothing about the benchmarks
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

#: name → function(preset) returning a markdown section. A new benchmark is a module with such a `run`
#: function and one line here.
BENCHMARKS: dict[str, Callable[[Preset], str]] = {
    "train": train.run,
    "inference": inference.run,
    "merge": merge.run,
    "convert": convert.run,
    "memory": memory.run,
    "mixed_batch": mixed_batch.run,
    "xlora": xlora.run,
    "quantized": quantized.run,
    "dora": dora.run,
    "moe": moe.run,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="default: cpu")
    parser.add_argument("--device", help="override the preset's device (e.g. --preset tiny --device cuda)")
    parser.add_argument("--only", help=f"comma-separated benchmarks to run (default all: {','.join(BENCHMARKS)})")
    parser.add_argument("--dtypes", help="override the preset's dtypes, comma-separated (e.g. float32)")
    parser.add_argument("--rounds", type=int, help="override the preset's rounds (train, inference, merge, quantized)")
    parser.add_argument("--repeats", type=int, help="override the preset's repeats per round")
    parser.add_argument("--write", type=Path, metavar="PATH", help="replace the preset's generated section in PATH")
    args = parser.parse_args(argv)
    args.selected = list(BENCHMARKS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [name for name in args.selected if name not in BENCHMARKS]
    if unknown or not args.selected:
        parser.error(f"--only: unknown or no benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    for option in ("rounds", "repeats"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be at least 1")
    if args.dtypes is not None:
        args.dtypes = tuple(name.strip() for name in args.dtypes.split(",") if name.strip())
        try:
            for name in args.dtypes:
                torch_dtype(name)
        except ValueError as error:
            parser.error(f"--dtypes: {error}")
        if not args.dtypes:
            parser.error("--dtypes: no dtype given")
    return args


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces these tables (without --write, which only says where they go)."""
    parts = ["python", "benchmarks/run.py", "--preset", args.preset]
    for option in ("device", "only", "dtypes", "rounds", "repeats"):
        value = args.selected if option == "only" and args.only is not None else getattr(args, option)
        if value is not None:
            parts += [f"--{option}", ",".join(value) if isinstance(value, (tuple, list)) else str(value)]
    return shlex.join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    overrides = {"device": args.device, "dtypes": args.dtypes, "rounds": args.rounds, "repeats": args.repeats}
    preset = dataclasses.replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    sections = [harness.header(preset.name, preset.device, command_line(args))]
    print(sections[0] + "\n", flush=True)
    for name in args.selected:
        start = time.perf_counter()
        sections.append(BENCHMARKS[name](preset))
        print(sections[-1] + "\n", flush=True)
        print(f"[{name}: {time.perf_counter() - start:.1f} s]", file=sys.stderr, flush=True)
    if args.write is not None:
        harness.write_section(args.write, preset.name, "\n\n".join(sections))
        print(f"wrote the {preset.name!r} section of {args.write}")


if __name__ == "__main__":
    main()
