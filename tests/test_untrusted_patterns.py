"""Loading evaluates no slow pattern from an adapter file: the targets and ranks come from the tensors' keys and
shapes. A stranger's config holding a catastrophic regular expression (`(.|.)*z` backtracks 2^n steps on a
name of n characters) loads in well under a second, or is refused at once where lorakit would need it.

Each case runs in a subprocess with a time limit, so the code before this rule fails the test instead of hanging.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tiny_models import tiny_llama

import lorakit

SLOW = "(.|.)*z"  # no module name holds a "z": every match fails after trying 2^len(name) ways


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("adapter")
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    lorakit.save_adapter(lorakit.get_lora_model(tiny_llama(), config), directory)
    return directory


def with_fields(adapter: Path, tmp_path: Path, **fields) -> Path:
    directory = tmp_path / "hostile"
    directory.mkdir(parents=True)
    (directory / "adapter_model.safetensors").write_bytes((adapter / "adapter_model.safetensors").read_bytes())
    config = json.loads((adapter / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return directory


def load_in_a_subprocess(directory: Path, call: str = "load_adapter") -> tuple[str, float]:
    """Run lorakit.<call> on the tiny Llama in a fresh process (at most 60 s); its outcome line and the seconds
    the call itself took."""
    code = textwrap.dedent(f"""
        import time, torch, warnings
        from transformers import LlamaConfig, LlamaForCausalLM
        import lorakit
        warnings.simplefilter("ignore")
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
        if {call!r} == "hot_swap_adapter":
            lorakit.get_lora_model(model, lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        start = time.perf_counter()
        try:
            getattr(lorakit, {call!r})(model, {str(directory)!r})
            outcome = "loaded"
        except lorakit.LoraError as error:
            outcome = "LoraError: " + str(error)
        print(f"{{time.perf_counter() - start:.3f}} {{outcome}}")
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, outcome = result.stdout.strip().splitlines()[-1].split(" ", 1)
    return outcome, float(seconds)


@pytest.mark.parametrize("call", ["load_adapter", "hot_swap_adapter"])
@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_slow_pattern_the_tensors_make_unneeded_is_not_evaluated(adapter, tmp_path, field, call):
    outcome, seconds = load_in_a_subprocess(with_fields(adapter, tmp_path, **{field: SLOW}), call)
    assert outcome == "loaded" and seconds < 1.0, (outcome, seconds)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"rank_pattern": {SLOW: 4}}, "rank_pattern"),
        ({"alpha_pattern": {SLOW: 16}}, "alpha_pattern"),
        ({"layers_pattern": SLOW, "layers_to_transform": [0]}, "layers_pattern"),
    ],
)
def test_a_slow_pattern_lorakit_would_need_is_refused_at_once(adapter, tmp_path, fields, named):
    outcome, seconds = load_in_a_subprocess(with_fields(adapter, tmp_path, **fields))
    assert outcome.startswith("LoraError") and seconds < 1.0, (outcome, seconds)
    assert f"{named} holds {SLOW!r}, a regular expression" in outcome


def test_plain_patterns_from_a_file_still_count(adapter, tmp_path):
    """Name-like patterns (peft's usual `layers\\.0\\.self_attn\\.q_proj`) are evaluated, and checked."""
    directory = with_fields(adapter, tmp_path, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2})
    with pytest.raises(lorakit.LoraError, match=r"model\.layers\.0\.self_attn\.q_proj.*rank 2"):
        lorakit.load_adapter(tiny_llama(), directory)
    directory = with_fields(adapter, tmp_path / "alpha", alpha_pattern={r"layers\.0\.self_attn\.q_proj": 64})
    model = lorakit.load_adapter(tiny_llama(), directory)
    assert model.model.layers[0].self_attn.q_proj.lora_alpha["default"] == 64
    assert model.model.layers[1].self_attn.q_proj.lora_alpha["default"] == 8


def test_the_patterns_lorakit_calls_plain():
    plain = ["q_proj", r"layers\.1\.self_attn\.q_proj", r".*\.(q|v)_proj", "[01]", "q_proj|v_proj"]
    slow = [SLOW, "(a+)+", ".*.*.*x", r"(\w+)\1", "(?=q)q_proj", "x" * 1001]
    assert all(lorakit.targets.is_plain_pattern(p) for p in plain)
    assert not any(lorakit.targets.is_plain_pattern(p) for p in slow)
    start = time.perf_counter()
    assert not any(lorakit.targets.is_plain_pattern(p + "z" * 50) for p in slow[:3])
    assert time.perf_counter() - start < 0.1  # telling does not run the pattern
