"""Writes testdata/book.pt: reference numbers computed by the BOOK'S OWN CODE, so that test_gpt.py can check
gpt.py against "Build a Large Language Model (From Scratch)" without the book's package installed.

Source: PyPI package llms-from-scratch (the book's code, rasbt/LLMs-from-scratch), read with its chapter
modules ch02 (data loader), ch04 (GPTModel), ch05 (train_model_simple), ch06 (spam data split) and
appendix_e (LoRA). Regenerate, from the repository root, with the package and its plotting/pandas
dependencies on a side path (nothing installed system-wide):

    pip install --no-deps --target /tmp/lfspkg llms-from-scratch
    pip install --target /tmp/refdeps matplotlib tqdm pandas
    TIKTOKEN_CACHE_DIR=... PYTHONPATH=/tmp/lfspkg:/tmp/refdeps python testdata/make_book_reference.py

The text is the-verdict.txt (20,479 characters), looked for in data/, the repository root, or
/work/shared/data/. Runs on the CPU in a few seconds. The file holds only tensors, numbers, strings, lists
and dicts: torch.load(path, weights_only=True) reads it.
"""
import contextlib
import io
import os
import sys
from importlib.metadata import version

import pandas as pd
import tiktoken
import torch

from llms_from_scratch import appendix_e, ch02, ch04, ch05, ch06

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OUT = os.path.join(HERE, "book.pt")
torch.set_num_threads(2)


def verdict():
    for path in (os.path.join(ROOT, "data", "the-verdict.txt"), os.path.join(ROOT, "the-verdict.txt"),
                 "/work/shared/data/the-verdict.txt"):
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
    sys.exit("the-verdict.txt not found")


def plain(state_dict):
    """Standalone copies (clone: no views into shared storage), so the file stays small."""
    return {k: v.detach().clone() for k, v in state_dict.items()}


# 1. Chapter 4: GPTModel's forward pass on a tiny model. Its state_dict includes each attention's `mask`
#    buffer (the book registers the causal mask as a persistent buffer).
cfg = {"vocab_size": 64, "context_length": 8, "emb_dim": 8, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0,
       "qkv_bias": True}
torch.manual_seed(0)
model = ch04.GPTModel(cfg).eval()
ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    logits = model(ids)
gpt = {"cfg": cfg, "state_dict": plain(model.state_dict()), "input_ids": ids, "logits": logits}

# 2. Appendix E: LoRA on every nn.Linear of a frozen GPTModel, then one AdamW step.
#    In this version of the package LoRALayer initializes A with kaiming_uniform_(a=sqrt(5)), B with zeros,
#    and scales by alpha itself (forward: alpha * (x @ A @ B)), NOT alpha / rank as in the LoRA paper.
#    The logits after the step are (2, 8, 50257) float32 = 3.2 MB, so only the first 256 vocabulary columns
#    are stored (key "logits": logits[:, :, :256]), plus the full shape and, as a checksum of the whole
#    tensor, its sum and the sum of its absolute values (accumulated in float64).
cfg_lora = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
            "drop_rate": 0.0, "qkv_bias": False}
x = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
torch.manual_seed(123)
model = ch04.GPTModel(cfg_lora)
for param in model.parameters():  # the book's freezing loop
    param.requires_grad = False
appendix_e.replace_linear_with_lora(model, rank=4, alpha=16)
trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
loss.backward()
optimizer.step()
with torch.no_grad():
    logits = model(x[:, :-1])
lora = {"cfg": cfg_lora, "rank": 4, "alpha": 16, "input_ids": x, "trainable": trainable,
        "logits": logits[:, :, :256].clone(), "logits_shape": list(logits.shape),
        "logits_sum": logits.double().sum().item(), "logits_abs_sum": logits.double().abs().sum().item()}

# 3. Chapter 5: the pretraining run of the book's gpt_train.py main(), shrunk to a tiny model and one epoch
#    (lr, eval_freq and eval_iter as given below, not the script's 5e-4 / 5 / 1). The order is the script's:
#    torch.manual_seed(123); model; model.to(device); AdamW; then the two loaders (creating a DataLoader
#    draws no random numbers: the shuffle seeds itself from torch's generator when iteration starts).
#    The book's global_step counts from 0, so losses are recorded after steps 0, 20, 40, ... (gpt.py's
#    steps 1, 21, 41, ...). `sample` is what generate_and_print_sample printed at the end of the epoch.
cfg_train = {"vocab_size": 50257, "context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2,
             "drop_rate": 0.1, "qkv_bias": False}
settings = {"learning_rate": 4e-4, "weight_decay": 0.1, "batch_size": 2, "num_epochs": 1}
text_data = verdict()
torch.manual_seed(123)
model = ch04.GPTModel(cfg_train)
model.to("cpu")
optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"],
                              weight_decay=settings["weight_decay"])
split_idx = int(0.90 * len(text_data))
ctx = cfg_train["context_length"]
train_loader = ch02.create_dataloader_v1(text_data[:split_idx], batch_size=settings["batch_size"], max_length=ctx,
                                         stride=ctx, drop_last=True, shuffle=True, num_workers=0)
val_loader = ch02.create_dataloader_v1(text_data[split_idx:], batch_size=settings["batch_size"], max_length=ctx,
                                       stride=ctx, drop_last=False, shuffle=False, num_workers=0)
printed = io.StringIO()
with contextlib.redirect_stdout(printed):
    train_losses, val_losses, tokens_seen = ch05.train_model_simple(
        model, train_loader, val_loader, optimizer, "cpu", num_epochs=settings["num_epochs"], eval_freq=20,
        eval_iter=5, start_context="Every effort moves you", tokenizer=tiktoken.get_encoding("gpt2"))
log = printed.getvalue().split("\n")[:-1]  # one line per print (the sample's newlines became spaces)
sample = "\n".join(line for line in log if not line.startswith("Ep 1 (Step "))
train = {"cfg": cfg_train, "batch_size": 2, "lr": 4e-4, "weight_decay": 0.1, "eval_freq": 20, "eval_iter": 5,
         "train_losses": [float(v) for v in train_losses], "val_losses": [float(v) for v in val_losses],
         "tokens_seen": [int(v) for v in tokens_seen], "sample": sample,
         "steps": int(optimizer.state[next(model.parameters())]["step"])}  # AdamW's own step count

# 4. Chapter 6: the spam data preparation (create_balanced_dataset, then random_split(df, 0.7, 0.1), both
#    pandas with random_state=123) on testdata/fine-tune/sms-spam.tsv, a small synthetic tab-separated
#    file (20 ham, 12 spam) read as the book reads SMSSpamCollection. The package's own functions are used (ch06
#    has both). Labels are mapped as the book does: {"ham": 0, "spam": 1}.
df = pd.read_csv(os.path.join(HERE, "fine-tune", "sms-spam.tsv"), sep="\t", header=None, names=["Label", "Text"])
balanced_df = ch06.create_balanced_dataset(df)
balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
parts = ch06.random_split(balanced_df, 0.7, 0.1)
spam_split = {name: [[int(label), str(t)] for label, t in zip(part["Label"], part["Text"])]
              for name, part in zip(("train", "validation", "test"), parts)}

torch.save({"source": f"llms-from-scratch {version('llms-from-scratch')}, torch {torch.__version__}",
            "gpt": gpt, "lora": lora, "train": train, "spam_split": spam_split}, OUT)

print(f"wrote {OUT} ({os.path.getsize(OUT):,} bytes)")
print(f"gpt: logits {tuple(gpt['logits'].shape)}, {len(gpt['state_dict'])} tensors")
print(f"lora: trainable {trainable:,}, logits sum {lora['logits_sum']:.6f}")
print(*log, sep="\n")
print(f"train: {train['steps']} steps")
print("spam_split:", {k: len(v) for k, v in spam_split.items()})
