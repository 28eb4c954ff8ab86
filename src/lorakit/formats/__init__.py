"""On disk: atomic writes and safe readers, peft's adapter format, X-LoRA's layouts, the mistral.rs export."""
