"""Peak training memory of the floor, lorakit and peft, each measured in a process of its own.

For each dtype and contender the suite runs this file as a script,
`python benchmarks/memory.py --contender floor|lorakit|peft --preset NAME --dtype DTYPE [--device DEVICE]
[--quantization nf4|bnb-int8|torchao-int8]`, which imports the same libraries whatever the contender, builds only
that contender's model (as in the train benchmark; with `--quantization`, on the quantized bfloat16 base of the
quantized benchmark), runs `memory_steps` (3) train steps and prints one JSON line:
- on CPU, the peak resident set size of the process and the RSS right after the model was built. The peak is
  `VmHWM`, reset to the current RSS after the imports (Linux `/proc/self/clear_refs`), so that importing
  transformers does not set it; where that is impossible, `ru_maxrss` over the whole process. Both include
  the interpreter and the libraries, the same for every contender. A quantized base is built from a float
  one: once it is built, the memory the float weights held is handed back to the system (glibc's
  `malloc_trim`, which would otherwise keep it in the heap, counted in the RSS) and the peak is reset again, so
  that the float model it was quantized from sets neither the model's RSS nor the peak;
- on CUDA, `torch.cuda.max_memory_allocated()` and the memory allocated right after the model was built.
The processes run one at a time, except in presets that allow several at once (`memory_jobs`; each process
measures only itself, so that saves wall time and changes no figure).
The table shows the peak and the peak − model (what training itself adds: activations, gradients, optimizer
state), in MiB. The project's target: lorakit's peak ≤ peft's.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import harness
import torch
from train import floor_step, lora_step
from workloads import (
    PRESETS,
    QUANTIZATIONS,
    Preset,
    build_base,
    embeds,
    lorakit_model,
    peft_model,
    quantized_base,
    torch_dtype,
)

CONTENDERS = ("floor", "lorakit", "peft")
HEADERS = ("dtype", "measure", "floor MiB", "lorakit MiB", "peft MiB", "lorakit / peft", "lorakit / floor")
MIB = 2**20


def _status_kib(field: str) -> int | None:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status in KiB, or None where there is no such file."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def current_rss_bytes() -> int:
    """The process's resident set size now (Linux), else its peak so far."""
    kib = _status_kib("VmRSS")
    return peak_rss_bytes() if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set size since `reset_peak_rss` (Linux `VmHWM`), else `ru_maxrss`
    (KiB on Linux, bytes on macOS)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Lower the peak RSS to the current RSS (Linux ≥ 4.0: `5` into /proc/self/clear_refs), so that the
    transient peak of importing the libraries does not hide the peak of training. False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def release_freed_memory() -> None:
    """Collect garbage and hand the heap's free memory back to the system (glibc's `malloc_trim(0)`; nothing
    more elsewhere), so that memory freed before a measurement is not counted in the RSS after it."""
    gc.collect()
    libc = ctypes.util.find_library("c")
    if sys.platform.startswith("linux") and libc is not None:
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: a libc other than glibc
            ctypes.CDLL(libc).malloc_trim(0)


def measure_here(
    contender: str, preset: Preset, dtype: torch.dtype, quantization: str | None = None
) -> dict[str, int | bool]:
    """Build `contender`'s model in this process and train `preset.memory_steps` steps. Returns the bytes in
    use before building (`baseline_bytes`) and once built (`model_bytes`), the peak (`peak_bytes`), and on CPU
    whether the peak was reset after the imports (`peak_reset`). With `quantization`, the model is
    `quantized_base(preset, quantization)` (bfloat16, whatever `dtype`) and the peak is reset once it is built."""
    cuda = torch.device(preset.device).type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats(preset.device)
        baseline_bytes, peak_reset = torch.cuda.memory_allocated(preset.device), True
    else:
        peak_reset = reset_peak_rss()
        baseline_bytes = current_rss_bytes()
    if quantization is None:
        model = build_base(preset, dtype)
    else:
        model, dtype = quantized_base(preset, quantization), torch.bfloat16
        release_freed_memory()
        if cuda:
            torch.cuda.reset_peak_memory_stats(preset.device)
        else:
            peak_reset = reset_peak_rss() and peak_reset
    if contender == "lorakit":
        model = lorakit_model(model, preset)
    elif contender == "peft":
        model = peft_model(model, preset)
    inputs = embeds(preset, dtype)
    step = floor_step(model, inputs) if contender == "floor" else lora_step(model, inputs)
    gc.collect()
    harness.synchronize(preset.device)
    model_bytes = torch.cuda.memory_allocated(preset.device) if cuda else current_rss_bytes()
    for _ in range(preset.memory_steps):
        step()
    harness.synchronize(preset.device)
    peak_bytes = torch.cuda.max_memory_allocated(preset.device) if cuda else peak_rss_bytes()
    return {"baseline_bytes": baseline_bytes, "model_bytes": model_bytes, "peak_bytes": peak_bytes,
            "peak_reset": peak_reset}  # fmt: skip


def measure_in_subprocess(
    contender: str, preset: Preset, dtype_name: str, quantization: str | None = None
) -> dict[str, int | bool]:
    """Run this file as a script for one contender and read its JSON line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--contender", contender]
    command += ["--preset", preset.name, "--dtype", dtype_name, "--device", preset.device]
    if quantization is not None:
        command += ["--quantization", quantization]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def peak_description(preset: Preset, results: list[dict[str, int | bool]], quantized: bool = False) -> str:
    """What the peak of `results` (those of one table; `quantized`: on quantized bases) is and includes, for the
    table's description."""
    if torch.device(preset.device).type == "cuda":
        reset = "; its peak is reset once the quantized base is built" if quantized else ""
        return f"`torch.cuda.max_memory_allocated()`{reset}; model = memory allocated once the model was built"
    baselines = [r["baseline_bytes"] / MIB for r in results]
    when = "the quantized base was built" if quantized else "the libraries were imported"
    since = (
        f"since {when} (the peak was reset there through /proc/self/clear_refs)"
        if all(r["peak_reset"] for r in results)
        else "over the process's life, imports included (the peak could not be reset after them)"
    )
    return (
        f"peak resident set size of the process {since}; it includes the interpreter and libraries "
        f"(RSS {min(baselines):.0f}–{max(baselines):.0f} MiB before building), the same for every "
        "contender; model = RSS once the model was built"
    )


def run(preset: Preset) -> str:
    """The memory section: peak and peak − model per dtype, each contender in a fresh process."""
    rows = []
    verdicts = []
    jobs = [(dtype_name, name) for dtype_name in preset.dtypes for name in CONTENDERS]
    with ThreadPoolExecutor(max_workers=preset.memory_jobs) as pool:
        futures = {job: pool.submit(measure_in_subprocess, job[1], preset, job[0]) for job in jobs}
        measured = {job: future.result() for job, future in futures.items()}
    for dtype_name in preset.dtypes:
        results = {name: measured[dtype_name, name] for name in CONTENDERS}
        for measure in ("peak", "peak − model"):
            mib = {
                name: (r["peak_bytes"] - (r["model_bytes"] if measure != "peak" else 0)) / MIB
                for name, r in results.items()
            }
            ratios = (mib["lorakit"] / mib["peft"], mib["lorakit"] / mib["floor"])
            rows.append([dtype_name, measure, *(f"{mib[n]:.1f}" for n in CONTENDERS), *(f"{r:.3f}" for r in ratios)])
        lk, pf = results["lorakit"]["peak_bytes"], results["peft"]["peak_bytes"]
        verdicts.append(f"- {dtype_name}: lorakit's peak ≤ peft's: {harness.met(lk <= pf)}.")
    what = peak_description(preset, list(measured.values()))
    return (
        "### Peak training memory\n\n"
        f"{preset.describe()}; each contender alone in a fresh process: build its model, "
        f"{preset.memory_steps} train steps (floor: forward + backward to the inputs; lorakit / peft: with "
        f"AdamW). Peak = {what}.\n\n" + harness.table(HEADERS, rows) + "\n\n" + "\n".join(verdicts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contender", choices=CONTENDERS, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--dtype", required=True)
    parser.add_argument("--device", help="override the preset's device")
    parser.add_argument("--quantization", choices=list(QUANTIZATIONS), help="train on this quantized base")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.device:
        preset = dataclasses.replace(preset, device=args.device)
    print(json.dumps(measure_here(args.contender, preset, torch_dtype(args.dtype), args.quantization)))


if __name__ == "__main__":
    main()
