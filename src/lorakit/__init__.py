"""lorakit: LoRA for PyTorch models.

One call converts a model's Linear, Conv1d/2d/3d, Embedding and transformers Conv1D layers into LoRA
layers; adapters merge bit-exactly reversibly and use HuggingFace peft's names and format.
"""

from .config import LoraConfig
from .errors import AdapterError, LoraConfigError, LoraError, MergeError, TargetError
from .formats.checkpoint import materialize
from .formats.mistralrs import export_xlora_mistralrs
from .formats.peft import load_adapter, lora_state_dict, read_adapter_config, save_adapter
from .formats.xlora import load_xlora, save_xlora
from .hot_swap import hot_swap_adapter
from .kbit import prepare_model_for_kbit_training
from .layers import (
    LoraConv,
    LoraEmbedding,
    LoraLayer,
    LoraLinear,
    LoraQuantizedLinear,
    UpdateRetention,
    register_lora_layer,
)
from .layers.modules_to_save import ModulesToSave
from .lora_plus import lora_plus_param_groups
from .mixed import mixed_batch
from .model import (
    active_adapters,
    adapter_names,
    add_adapter,
    delete_adapter,
    dequantize,
    disable_adapters,
    get_lora_model,
    is_lora_model,
    lora_layers,
    merge,
    merge_and_unload,
    set_active_adapters,
    trainable_parameters,
    unload,
    unmerge,
)
from .summary import AdapterSummary, ModelSummary, summary
from .targets import DEFAULT_TARGET_MODULES
from .weighted import add_weighted_adapter
from .xlora import XLoraConfig, get_xlora_model, latest_scalings, remove_xlora

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "AdapterError",
    "AdapterSummary",
    "LoraConfig",
    "LoraConfigError",
    "LoraConv",
    "LoraEmbedding",
    "LoraError",
    "LoraLayer",
    "LoraLinear",
    "LoraQuantizedLinear",
    "MergeError",
    "ModelSummary",
    "ModulesToSave",
    "TargetError",
    "UpdateRetention",
    "XLoraConfig",
    "active_adapters",
    "adapter_names",
    "add_adapter",
    "add_weighted_adapter",
    "delete_adapter",
    "dequantize",
    "disable_adapters",
    "export_xlora_mistralrs",
    "get_lora_model",
    "get_xlora_model",
    "hot_swap_adapter",
    "is_lora_model",
    "latest_scalings",
    "lora_layers",
    "lora_plus_param_groups",
    "load_adapter",
    "load_xlora",
    "lora_state_dict",
    "materialize",
    "merge",
    "merge_and_unload",
    "mixed_batch",
    "prepare_model_for_kbit_training",
    "read_adapter_config",
    "register_lora_layer",
    "remove_xlora",
    "save_adapter",
    "save_xlora",
    "set_active_adapters",
    "summary",
    "trainable_parameters",
    "unload",
    "unmerge",
]
