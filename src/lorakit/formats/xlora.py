"""X-LoRA on disk: the original X-LoRA layout and peft's `"XLORA"` format.

- `layout="xlora"` (the original X-LoRA library's, which mistral.rs reads from a directory tree):
  `xlora_config.json`, `xlora_classifier.safetensors` (keys `inner.{i}.weight|bias`, `last.weight|bias`)
  and one peft adapter directory per expert, `<directory>/<expert name>/`. Any model, any expert names.
- `layout="peft"`: `adapter_config.json` with `"peft_type": "XLORA"` and `adapter_model.safetensors` holding
  the classifier under peft's names (`base_model.internal_xlora_classifier.layers.{j}.weight`), which
  `PeftModel.from_pretrained(base, directory)` loads (peft 0.21's own `save_pretrained` writes no classifier),
  with the experts in `<directory>/<expert name>/` as well. What peft 0.21's `XLoraModel` needs:

  - the config's `adapters` keyed `"0"`, `"1"`, … in expert order: peft loads the i-th expert as adapter `str(i)`
    but then activates the config's keys, so any other key (`"sql"`) is an adapter that does not exist
    (`KeyError: 'sql'` at the forward). The keys carry no names; the expert directories keep the real ones.
  - the values are the experts' absolute paths, which is where peft loads them from (so move the directory,
    and peft will not find them);
  - `base.config.use_cache = False` before loading (peft refuses a model that caches; its `generate` runs
    without a cache);
  - a model whose adapted layers all sit under its top-level `model` attribute (peft rewrites the expert keys
    to `model.model.…`), and a task type it serves: `CAUSAL_LM` for causal LMs, `SEQ_CLS` for sequence
    classifiers. `save_xlora` refuses anything else (a BERT model, GPT-2, a token classifier…) with a
    `LoraError`; `layout="xlora"` saves those.

`load_xlora` reads either. The experts are named by the `adapters` keys, except for peft's numbered keys,
where they are named by the last component of each path (their directory's name) when those are distinct
expert names. Expert directories are always taken inside the X-LoRA directory (or from the `adapters`
argument), never from paths written in a stranger's config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PureWindowsPath

import torch
from torch import nn

from ..errors import LoraConfigError, LoraError
from ..model import is_lora_model, undo_on_failure
from ..xlora import CLASSIFIER_ATTR, XLoraConfig, get_xlora_model, xlora_state
from .files import as_path, replace_files
from .peft import WEIGHTS_NAME, save_adapter
from .readers import CONFIG_NAME, TensorFile, match_keys_and_shapes, read_json_object

XLORA_CONFIG_NAME = "xlora_config.json"
CLASSIFIER_NAME = "xlora_classifier.safetensors"
PEFT_CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier.layers."


def check_expert_name(name: object) -> str:
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise LoraError(f"expert name {name!r} cannot be a directory name")
    return name


def peft_classifier_keys(config: XLoraConfig) -> list[int]:
    """Indices of the Linear layers in peft's classifier `nn.Sequential` (ReLU, and Dropout if p > 0, between)."""
    step = 3 if config.xlora_dropout_p > 0 else 2
    return [i * step for i in range(config.xlora_depth)]


def classifier_tensors(model: nn.Module, layout: str) -> dict[str, torch.Tensor]:
    config = xlora_state(model).config
    classifier = getattr(model, CLASSIFIER_ATTR).state_dict()
    by_module_key = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in classifier.items()}
    if layout == "xlora":
        return by_module_key
    names = [f"inner.{i}" for i in range(config.xlora_depth - 1)] + ["last"]
    return {
        f"{PEFT_CLASSIFIER_PREFIX}{index}.{param}": by_module_key[f"{name}.{param}"]
        for name, index in zip(names, peft_classifier_keys(config), strict=True)
        for param in ("weight", "bias")
    }


def _peft_task_type(model: nn.Module) -> str:
    """peft's `task_type` for serving `model` with peft's `XLoraModel`: `"CAUSAL_LM"` for a causal LM (a class,
    or a base class, in transformers' causal-LM mapping, or a decoder-only `GenerationMixin` such as a
    trust_remote_code model), `"SEQ_CLS"` for a sequence classifier. Raises `LoraError` for any other model,
    which peft's `XLoraModel` cannot serve or lorakit cannot tell it how."""
    name = type(model).__name__
    try:
        from transformers import GenerationMixin
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
            MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        )
    except ImportError:
        raise LoraError(
            f"layout='peft' needs transformers (peft's XLoraModel serves transformers models) to save {name}; "
            "save it with layout='xlora'"
        ) from None
    classes = {cls.__name__ for cls in type(model).__mro__}
    config = getattr(model, "config", None)
    decoder_only = isinstance(model, GenerationMixin) and not getattr(config, "is_encoder_decoder", False)
    if decoder_only or classes & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
        return "CAUSAL_LM"
    if classes & set(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values()):
        return "SEQ_CLS"
    raise LoraError(
        f"peft's XLoraModel serves causal LMs and sequence classifiers (task_type CAUSAL_LM or SEQ_CLS); {name} is "
        "neither, so layout='peft' would write a directory peft cannot run; save it with layout='xlora'"
    )


def _check_peft_can_load(model: nn.Module) -> None:
    """peft's `XLoraModel` loads each expert's tensors after rewriting their keys to `model.model.<rest>`: only
    layers under the model's top-level `model` attribute (and not under `model.model`) come out at their own
    names; any other expert key is 'unexpected' and peft refuses the directory."""
    for name, _ in xlora_state(model).layers:
        if not name.startswith("model.") or name.startswith("model.model."):
            raise LoraError(
                f"peft's XLoraModel cannot load an expert on {type(model).__name__}'s {name!r}: it loads expert "
                "weights only into layers under the model's top-level 'model' attribute (it rewrites their keys to "
                "'model.model.…'); save it with layout='xlora'"
            )


def save_xlora(model: nn.Module, directory: str | os.PathLike, layout: str = "xlora") -> Path:
    """Write an X-LoRA model's experts and classifier to `directory`; every file is replaced atomically.
    Returns the directory's path.

    `layout="xlora"` (the default) saves any X-LoRA model. `layout="peft"` writes what
    `peft.PeftModel.from_pretrained(base, directory)` loads, whatever the experts are called: the config's
    `adapters` are keyed `"0"`, `"1"`, … (the only keys peft's XLoraModel runs) and point at the expert
    directories by absolute path, which keep the real names (so `load_xlora` restores them). peft needs
    `base.config.use_cache = False` (it refuses a caching model; its `generate` runs without a cache). It is
    refused (`LoraError`, nothing written) for what peft cannot serve: models other than causal LMs
    (task_type CAUSAL_LM) and sequence classifiers (SEQ_CLS), and models whose adapted layers are not under a
    top-level `model` attribute (BERT, GPT-2). See the module docstring.
    """
    from safetensors.torch import save as safetensors_bytes

    if layout not in ("xlora", "peft"):
        raise LoraError(f"layout must be 'xlora' or 'peft', got {layout!r}")
    state = xlora_state(model)
    directory = as_path(directory, "directory")
    experts = [check_expert_name(name) for name in state.experts]
    if layout == "peft":
        task_type = _peft_task_type(model)
        _check_peft_can_load(model)
    for name in experts:
        save_adapter(model, directory / name, adapter_name=name)
    fields = {
        **state.config.to_dict(),
        "hidden_size": getattr(model, CLASSIFIER_ATTR).hidden_size,
        "adapters": {name: name for name in experts},
    }
    base = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    if layout == "xlora":
        # the original library's fields, written out: mistral.rs's defaults differ (xlora_size 1, no ReLU)
        fields.update(enable_relu_and_dropout=True, use_bias=True, base_model_id=base)
        files = {XLORA_CONFIG_NAME: fields, CLASSIFIER_NAME: classifier_tensors(model, layout)}
    else:
        fields.update(peft_type="XLORA", base_model_name_or_path=base, inference_mode=True, task_type=task_type)
        # peft loads the i-th expert from the i-th path as adapter str(i), then activates the config's keys: any key
        # but str(i) names no adapter (KeyError at the forward). The directories' names keep the experts' names.
        fields["adapters"] = {str(i): str(directory.resolve() / name) for i, name in enumerate(experts)}
        files = {CONFIG_NAME: fields, WEIGHTS_NAME: classifier_tensors(model, layout)}
    replace_files(
        directory,
        {
            name: (
                json.dumps(dict(sorted(value.items())), indent=2).encode() + b"\n"
                if name.endswith(".json")
                else safetensors_bytes(value, metadata={"format": "pt"})
            )
            for name, value in files.items()
        },
    )
    return directory


def load_xlora(
    model: nn.Module, directory: str | os.PathLike, adapters: dict[str, str | os.PathLike] | None = None
) -> nn.Module:
    """Load an X-LoRA model saved by `save_xlora`, the original X-LoRA library or peft onto a plain `model`.

    The experts come from `<directory>/<expert name>/` unless `adapters` maps names to directories. The
    classifier file is checked (keys, shapes, float dtypes) against the config; on any error the model is
    left as it was.
    """
    if is_lora_model(model):
        raise LoraError("load_xlora loads onto a plain model; this one already has LoRA layers")
    directory = as_path(directory, "directory")
    if (directory / XLORA_CONFIG_NAME).is_file():
        layout, config_path, weights_path = "xlora", directory / XLORA_CONFIG_NAME, directory / CLASSIFIER_NAME
    elif (directory / CONFIG_NAME).is_file():
        layout, config_path, weights_path = "peft", directory / CONFIG_NAME, directory / WEIGHTS_NAME
    else:
        raise LoraError(f"{directory} has neither {XLORA_CONFIG_NAME} nor {CONFIG_NAME}")
    data = read_json_object(config_path)
    if layout == "peft" and data.get("peft_type") != "XLORA":
        raise LoraError(f"{config_path}: peft_type is {data.get('peft_type')!r}, expected 'XLORA'")
    if not isinstance(data.get("adapters"), dict) or not data["adapters"]:
        raise LoraError(f"{config_path}: 'adapters' must map expert names to directories")
    experts = _expert_names(data["adapters"], layout)
    sources = {name: directory / name for name in experts} if adapters is None else dict(adapters)
    if set(sources) != set(experts):
        raise LoraError(f"adapters {sorted(sources)} do not match the config's experts {experts}")
    try:
        config = XLoraConfig.from_dict(data)
    except LoraConfigError as error:
        raise LoraConfigError(f"{config_path}: {error}") from None
    config.adapters = {name: str(sources[name]) for name in experts}
    with TensorFile(weights_path) as weights, undo_on_failure(model):
        get_xlora_model(model, config)
        _load_classifier(model, weights, layout)
    return model


def _expert_names(adapters: dict[str, object], layout: str) -> list[str]:
    """The experts' names, in the classifier's order, from a config's `adapters`.

    peft's numbered keys ("0", "1", …, which `save_xlora(layout="peft")` writes because peft runs no others)
    carry no name: the experts are then named by the last component of each path, their directory's name,
    when those are distinct expert names; otherwise (other keys, or paths that name nothing usable) by the
    keys. Only the names are read from the paths; the directories are looked up inside the X-LoRA directory.
    """
    keys = list(adapters)
    if layout == "peft" and keys == [str(i) for i in range(len(keys))]:
        # PureWindowsPath splits on both "/" and "\\", wherever the file was written
        names = [PureWindowsPath(path).name if isinstance(path, str) else "" for path in adapters.values()]
        try:
            valid = [check_expert_name(name) for name in names]
        except LoraError:
            valid = []
        if len(set(valid)) == len(keys):
            return valid
    return [check_expert_name(name) for name in keys]


def _load_classifier(model: nn.Module, weights: TensorFile, layout: str) -> None:
    if layout == "peft" and not weights.shapes:
        raise LoraError(
            f"{weights.path} holds no tensors: peft 0.21's save_pretrained drops the X-LoRA classifier, so this "
            "directory cannot restore the trained X-LoRA model (save it with lorakit.save_xlora)"
        )
    expected = classifier_tensors(model, layout)  # file key → a tensor of the expected shape, in module-key order
    file_keys = match_keys_and_shapes(weights, {key: tuple(t.shape) for key, t in expected.items()}, {}, weights.path)
    classifier = getattr(model, CLASSIFIER_ATTR)
    module_keys = classifier.state_dict()
    tensors = {ours: weights.tensor(file_keys[key]) for ours, key in zip(module_keys, expected, strict=True)}
    with torch.no_grad():
        for key, param in classifier.named_parameters():
            param.copy_(tensors[key])
