"""The shape of the code, checked: imports flow one way (layers know nothing of files or of the model), no lorakit
module reaches into another's private attributes, and both kinds of adapter module keep one protocol."""

from __future__ import annotations

import ast
from pathlib import Path

from torch import nn

import lorakit
from lorakit.layers import AdapterModule, LoraLinear
from lorakit.layers.modules_to_save import ModulesToSave

SOURCE = Path(lorakit.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The lorakit modules `path` imports (relative imports resolved)."""
    package = ".".join(("lorakit", *path.relative_to(SOURCE).with_suffix("").parts[:-1]))
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            found.add(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lorakit"):
            found.add(node.module)
    return found


def test_layers_import_only_layers_config_and_errors():
    for path in (SOURCE / "layers").glob("*.py"):
        for module in imported_modules(path):
            assert module.startswith(("lorakit.layers", "lorakit.config", "lorakit.errors")), (path.name, module)


def test_nothing_below_formats_imports_the_formats_or_the_integrations():
    """Model-wide operations may call a format lazily (save_pretrained, X-LoRA's experts), never at import."""
    for path in [*SOURCE.glob("*.py"), *(SOURCE / "layers").glob("*.py")]:
        if path.name in ("__init__.py", "hot_swap.py", "summary.py"):
            continue  # the package's face, and the two model-level operations that read files
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, ast.ImportFrom)]
        for node in top_level:
            assert not (node.module or "").startswith(("formats", "integrations")), (path.name, node.module)


def test_no_module_reads_another_objects_private_attributes():
    torch_internals = {"_modules", "_parameters", "_forward_hooks", "_forward_pre_hooks", "_conv_forward", "_version"}
    # nn.Module._apply: the one way to give meta tensors memory without wiping the others (FSDP2 overrides it to
    # re-register its shards); PreTrainedModel._init_weights: transformers' per-module initialisation, the hook its
    # model classes override and that transformers itself runs to compute buffers after a meta-device load
    torch_internals |= {"_apply", "_init_weights"}
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls", "_regex_parser"):
                continue
            if isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "super":
                continue  # LoraTrainerMixin overrides Trainer's own checkpoint loading
            assert node.attr in torch_internals, f"{path.relative_to(SOURCE)}:{node.lineno} reads .{node.attr}"


def test_both_adapter_modules_keep_the_protocol():
    assert isinstance(LoraLinear(nn.Linear(4, 4)), AdapterModule)
    assert isinstance(ModulesToSave(nn.Linear(4, 4)), AdapterModule)
