"""The README's ```python code blocks run as written, in order, in one namespace. (```py blocks are
illustrations that need outside resources: the mistral.rs one is exercised by tests/test_mistralrs.py.)"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_code_blocks():
    assert len(python_blocks()) >= 5


def test_readme_blocks_run(capsys):
    namespace: dict = {"__name__": "readme"}
    for block in python_blocks():
        exec(compile(block, str(README), "exec"), namespace)
    printed = capsys.readouterr().out
    assert "['base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.weight']" in printed
    assert "LlamaForCausalLM 14" in printed
    assert "LoraFusedQKV" in printed
    assert "r must be a positive integer, got 0" in printed
    assert "targets other modules than adapter 'chat'" in printed
