"""Shared machinery of the benchmark suite: interleaved timing, ratio statistics, markdown tables, the
description of the machine, and the generated sections of BENCHMARKS.md.

The timing rule every benchmark follows: all contenders run on the same inputs, interleaved
(A B C A B C ...) over several rounds after a warm-up; each round keeps the median of a few repeats per
contender, and every ratio is computed within a round, so that a noisy neighbour slows both sides of it.
Tables show each contender's median over rounds and the median of the per-round ratios with their min–max
spread. On CUDA the device is synchronized before and after every timed call.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work, so that a timer brackets the work itself (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Prepared:
    """A contender whose every timed call needs untimed preparation: only `run(prepare())`'s `run` is timed.

    Used where a call consumes its input, e.g. converting a freshly built model.
    """

    prepare: Callable[[], Any]
    run: Callable[[Any], object]


Contender = Callable[[], object] | Prepared


def time_call(contender: Contender, device: torch.device | str) -> float:
    """Seconds one call of `contender` takes, the device synchronized on both sides."""
    if isinstance(contender, Prepared):
        argument = contender.prepare()
        synchronize(device)
        start = time.perf_counter()
        contender.run(argument)
    else:
        synchronize(device)
        start = time.perf_counter()
        contender()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(
    contenders: Mapping[str, Contender], *, rounds: int, repeats: int, warmup: int, device: torch.device | str
) -> dict[str, list[float]]:
    """Time `contenders` interleaved: `warmup` untimed calls each, then `rounds` rounds in which each
    contender in turn makes `repeats` timed calls. Returns, per contender, the median seconds of each round.
    """
    for _ in range(warmup):
        for contender in contenders.values():
            time_call(contender, device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, contender in contenders.items():
            samples = [time_call(contender, device) for _ in range(repeats)]
            times[name].append(statistics.median(samples))
    return times


@dataclass(frozen=True)
class Ratio:
    """The median of per-round ratios and their spread."""

    median: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}–{self.high:.3f})"


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Ratio:
    """Per-round ratios `numerator[i] / denominator[i]`, summarised as median (min–max)."""
    ratios = [a / b for a, b in zip(numerator, denominator, strict=True)]
    return Ratio(statistics.median(ratios), min(ratios), max(ratios))


def median_ms(seconds: Sequence[float]) -> float:
    """The median of per-round times, in milliseconds."""
    return statistics.median(seconds) * 1e3


def fmt_ms(ms: float) -> str:
    """Milliseconds with a precision that suits their size."""
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def free_memory(device: torch.device | str) -> None:
    """Collect garbage (and return cached CUDA blocks) between benchmarks, outside any timed region."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


# ----- the machine --------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_description(device: torch.device | str) -> str:
    """One line naming the hardware, the thread count and the library versions."""
    import lorakit

    device = torch.device(device)
    cpu = f"{cpu_model()} ({os.cpu_count()} CPUs visible, {torch.get_num_threads()} torch threads)"
    hardware = f"{torch.cuda.get_device_name(device)}, host {cpu}" if device.type == "cuda" else cpu
    versions = (
        f"torch {torch.__version__}, peft {_version('peft')}, transformers {_version('transformers')}, "
        f"lorakit {lorakit.__version__}"
    )
    return f"{hardware}; {versions}"


def header(preset_name: str, device: torch.device | str, command: str) -> str:
    """The lines that open a generated section: what ran where, when, and how to reproduce it."""
    date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    return (
        f"Generated by `{command}` on {date} (preset `{preset_name}`, device `{device}`); "
        "every table comes from this one run.\n\n"
        f"Machine: {machine_description(device)}."
    )


# ----- BENCHMARKS.md --------------------------------------------------------------------------------------------


def begin_marker(preset_name: str) -> str:
    return f"<!-- generated: {preset_name} -->"


def end_marker(preset_name: str) -> str:
    return f"<!-- end generated: {preset_name} -->"


def replace_section(text: str, preset_name: str, body: str) -> str:
    """`text` with the generated section of `preset_name` replaced by `body` (appended if there is none).

    Everything outside the markers is kept byte for byte.
    """
    begin, end = begin_marker(preset_name), end_marker(preset_name)
    section = f"{begin}\n{body.strip()}\n{end}"
    start = text.find(begin)
    if start < 0:
        if end in text:
            raise ValueError(f"{end!r} without {begin!r}")
        separator = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return f"{text}{separator}{section}\n"
    stop = text.find(end, start)
    if stop < 0:
        raise ValueError(f"{begin!r} without a following {end!r}")
    if text.find(begin, start + len(begin)) >= 0:
        raise ValueError(f"{begin!r} appears more than once")
    return text[:start] + section + text[stop + len(end) :]


def write_section(path: Path, preset_name: str, body: str) -> None:
    """Replace (or append) the generated section of `preset_name` in the markdown file at `path`, atomically:
    the new text goes to a temporary file in the same directory, which then replaces the file. The file keeps
    its permission bits (a new one gets the umask's)."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    new_text = replace_section(text, preset_name, body)
    if path.exists():
        mode = path.stat().st_mode & 0o7777
    else:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as tmp:
            tmp.write(new_text)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
