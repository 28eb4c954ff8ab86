"""Small transformers models built from configs (random weights, nothing downloaded), shared by the tests."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A 2-layer Llama: hidden 32, vocabulary 64, 4 heads (2 KV)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, **overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 3-layer BERT classifier: hidden 32, vocabulary 64, 3 labels."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)
