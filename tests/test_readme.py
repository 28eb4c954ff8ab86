"""The README's ```python code blocks run as written, in order, in one namespace. (```py blocks are
illustrations that need outside resources: the mistral.rs one is exercised by tests/test_mistralrs.py.)"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_code_blocks():
    assert len(python_blocks()) >= 5


def test_readme_blocks_run(capsys):
    namespace: dict = {"__name__": "readme"}
    try:
        for block in python_blocks():
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        if "work" in namespace:  # the temporary directory of the Trainer block
            shutil.rmtree(namespace["work"], ignore_errors=True)
    printed = capsys.readouterr().out
    assert "['base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.weight']" in printed
    assert "LlamaForCausalLM 14" in printed
    assert "LoraFusedQKV" in printed
    assert "r must be a positive integer, got 0" in printed
    assert "targets other modules than adapter 'chat'" in printed
    # quick start: lorakit.summary ends with peft's trainable-parameters line
    assert "trainable params: 336 || all params: 1,012 || trainable%: 33.2016" in printed
    # transformers + Trainer: a checkpoint holds the adapter and no base weights; resuming repeats the losses
    listing = next(line for line in printed.splitlines() if line.startswith("['adapter_config.json', 'adapter_model"))
    assert "'optimizer.pt'" in listing and "model.safetensors'" not in listing.replace("adapter_model.safetensors'", "")
    assert "resumed losses equal the uninterrupted run's: True" in printed
    # save_pretrained: adapter "default" at the top, the others in subdirectories
    assert "['adapter_config.json', 'adapter_model.safetensors', 'other']" in printed
    assert "did you mean 'target_modules'" in printed
    # QLoRA: a 4-bit base, unmerge restores the packed bytes, dequantize ships a float model
    assert "LoraLinear4bit" in printed and "update survived" in printed
    assert "True\nLinear torch.float32" in printed
    assert "[(4, 0.0002), (0, 1e-06), (4, 0.0032), (0, 0.0032)]" in printed  # LoRA+'s groups
    assert "torch.Size([32])" in printed  # DoRA's magnitude, one per output
    assert "converted rank 16" in printed  # a PiSSA adapter saved as a plain LoRA of the original weights
    assert "{'math': 8, 'code': 4, 'both': 12, 'pruned': 4}" in printed  # add_weighted_adapter's ranks
    assert "target_modules entries ['qproj'] matched no module" in printed


def test_readme_sections_come_in_a_newcomers_order():
    headings = re.findall(r"^## (.+)$", README.read_text(), flags=re.MULTILINE)
    wanted = ["Two commands", "Install", "Quick start", "transformers and Trainer", "Saving and loading",
              "peft and mistral.rs", "Quantized bases", "Many adapters", "Errors", "Benchmarks",
              "The demo, in detail"]  # fmt: skip
    positions = [next(i for i, h in enumerate(headings) if h.startswith(w)) for w in wanted]
    assert positions == sorted(positions), headings


def test_readme_demo_output_shows_the_peft_reload():
    text = README.read_text()
    demo_output = re.search(r"```text\n(model: all-MiniLM.*?)```", text, flags=re.DOTALL).group(1)
    lines = demo_output.splitlines()
    lorakit_line = next(i for i, line in enumerate(lines) if line.startswith("adapter reloaded into a fresh model"))
    assert lines[lorakit_line + 1].startswith("adapter reloaded in peft: same predictions: True")
