"""gpt.py: GPT-2 from scratch in one file.

Part 1 is the book, Raschka's "Build a Large Language Model (From Scratch)", chapters 2-7 in its order, then
appendix E (LoRA); Part 2 is the tool around it: files and downloads, data sets, corpora, training runs and
checkpoints, OpenAI's checkpoint format, speed, the command line.

    python gpt.py train                       # pretrain on the-verdict.txt (book chapter 5)
    python gpt.py sample --temperature 0.8 --top-k 40
"""
import argparse
import codecs
import csv
import ctypes
import gc
import hashlib
import itertools
import json
import math
import os
import platform
import re
import shlex
import signal
import sys
import tempfile
import time
import uuid
import zipfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import timedelta
from functools import lru_cache, partial
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

HERE = os.path.dirname(os.path.abspath(__file__))


class GPTError(Exception):
    """A mistake the user can fix: main() prints it as one line, without a traceback."""


# ================================================================================================
# PART 1: THE BOOK, chapters 2-7 and appendix E in its order and with its names. What only the tool needs
# is in Part 2.
# ================================================================================================

# ---- Chapter 2: text -> token ids (GPT-2's byte-pair encoding) -> training windows -------------

@lru_cache(maxsize=None)
def get_tokenizer():
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:
        raise GPTError("cannot load GPT-2's BPE files (offline, nothing cached): set TIKTOKEN_CACHE_DIR "
                       "to a folder that holds them, or go online once") from None


def text_to_token_ids(text, tokenizer):
    encoded = tokenizer.encode(text, allowed_special={"<|endoftext|>"})
    return torch.tensor(encoded, dtype=torch.long).unsqueeze(0)  # (n_tokens,) -> (1, n_tokens): a batch of one


def token_ids_to_text(token_ids, tokenizer):
    return tokenizer.decode(token_ids.squeeze(0).tolist())  # (1, n_tokens) -> text


def encode_prompt(text, tokenizer, cfg, device):
    """A prompt as (1, n_tokens), refused when it is empty or holds a token the model does not know."""
    idx = text_to_token_ids(text, tokenizer)
    if idx.numel() == 0:
        raise GPTError("the prompt is empty")
    if idx.max() >= cfg["vocab_size"]:
        raise GPTError(f"the prompt has token {idx.max().item()}, outside this model's vocabulary of "
                       f"{cfg['vocab_size']}")
    return idx.to(device)


class GPTDatasetV1(Dataset):
    """Windows of `max_length` tokens every `stride` tokens; the target is the input shifted by one."""

    def __init__(self, txt, tokenizer, max_length, stride):
        self.token_ids = torch.tensor(tokenizer.encode(txt, allowed_special={"<|endoftext|>"}))
        self.starts = range(0, len(self.token_ids) - max_length, stride)
        self.max_length = max_length

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        chunk = self.token_ids[self.starts[i]:self.starts[i] + self.max_length + 1]  # (max_length + 1,)
        return chunk[:-1], chunk[1:]  # input and target, (max_length,) each


def create_dataloader_v1(txt, batch_size=4, max_length=256, stride=128, shuffle=True,
                         drop_last=True, num_workers=0, pin_memory=False):
    dataset = GPTDatasetV1(txt, get_tokenizer(), max_length, stride)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, num_workers=num_workers,
                      pin_memory=pin_memory)


# ---- Chapter 3: causal multi-head attention ----------------------------------------------------

class MultiHeadAttention(nn.Module):
    """Each position mixes in the values of itself and the positions before it, weighted by how
    well its query matches their keys; num_heads heads do so side by side on their own channels."""

    fused = True  # one kernel for the maths below; tests set False and compare the two

    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        if d_out % num_heads:
            raise GPTError(f"embedding size {d_out} is not divisible by {num_heads} heads")
        self.d_out, self.num_heads, self.head_dim = d_out, num_heads, d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)  # mixes what the heads found
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, kv_cache=None):  # x: (b, T, d_in) -> (b, T, d_out)
        b, T, _ = x.shape
        # Each projection is (b, T, d_out); split its channels into heads: (b, n_heads, T, head_dim)
        queries, keys, values = (W(x).view(b, T, self.num_heads, self.head_dim).transpose(1, 2)
                                 for W in (self.W_query, self.W_key, self.W_value))
        if kv_cache is not None:  # decoding (Part 2): the keys and values of every position so far
            keys, values = kv_cache.update(keys, values)  # (b, n_heads, T_k, head_dim), T_k >= T
        # The T queries are the last T positions: query i must not see the keys after position T_k - T + i.
        # The fused kernel needs no mask for one query, nor for T == T_k (is_causal: its mask aligns top-left).
        T_k = keys.shape[2]
        mask = None
        if not self.fused or T not in (1, T_k):
            mask = torch.ones(T, T_k, dtype=torch.bool, device=x.device).triu(T_k - T + 1)  # True: hidden
        if self.fused:
            # The maths below in one kernel: flash attention where there is one, which never builds the
            # (T, T_k) weights (on a CPU with dropout PyTorch picks its math kernel, which does); cached
            # chunks (T_k > T > 1) take the mask above.
            context = F.scaled_dot_product_attention(queries, keys, values, attn_mask=None if mask is None else ~mask,
                                                     is_causal=T == T_k and T > 1,
                                                     dropout_p=self.dropout.p if self.training else 0.0)
        else:
            attn_scores = queries @ keys.transpose(2, 3)  # (b, n_heads, T, T_k): every query . every key
            attn_scores = attn_scores.masked_fill(mask, float("-inf"))  # softmax gives these weight 0
            attn_weights = torch.softmax(attn_scores / self.head_dim ** 0.5, dim=-1)  # each row sums to 1
            attn_weights = self.dropout(attn_weights)
            context = attn_weights @ values  # (b, n_heads, T, head_dim)
        context = context.transpose(1, 2).reshape(b, T, self.d_out)  # heads back side by side: (b, T, d_out)
        return self.out_proj(context)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        # The book's version keeps its causal mask as a buffer, so its saved models carry one; this
        # one builds the mask when needed, so drop it and load the book's files unchanged.
        state_dict.pop(prefix + "mask", None)
        super()._load_from_state_dict(state_dict, prefix, *args)


# ---- Chapter 4: the GPT model ------------------------------------------------------------------

GPT_CONFIG_124M = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12,
                   "n_layers": 12, "drop_rate": 0.1, "qkv_bias": False}


class LayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):  # (..., emb_dim) -> same shape
        # scale * (x - mean) / sqrt(var + eps) + shift, with the biased variance, in one kernel
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)


class GELU(nn.Module):
    def forward(self, x):  # any shape -> same shape
        # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): GPT-2's tanh approximation, in one kernel
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]), GELU(),
                                    nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]))

    def forward(self, x):  # (b, T, emb_dim) -> (b, T, 4 emb_dim) -> (b, T, emb_dim)
        return self.layers(x)


class TransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = MultiHeadAttention(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"],
                                      cfg["drop_rate"], cfg["n_heads"], cfg["qkv_bias"])
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg["emb_dim"])
        self.norm2 = LayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x, kv_cache=None):  # (b, T, emb_dim) -> (b, T, emb_dim)
        # Pre-norm: each half normalizes its input and adds its output to the shortcut
        x = x + self.drop_shortcut(self.att(self.norm1(x), kv_cache))
        return x + self.drop_shortcut(self.ff(self.norm2(x)))


class GPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg["n_layers"])])
        self.final_norm = LayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx, kv_caches=None):  # token ids (b, T) -> logits (b, T, vocab_size)
        # With KV caches (decoding, Part 2) positions continue after the cached ones, and only the
        # last position's logits come out, (b, 1, vocab_size): out_head is the largest matmul.
        start = kv_caches[0].len if kv_caches else 0
        pos = torch.arange(start, start + in_idx.shape[1], device=in_idx.device)  # (T,)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(pos))  # (b, T, emb_dim)
        for i, block in enumerate(self.trf_blocks):
            x = block(x, kv_caches[i] if kv_caches else None)
        if kv_caches:
            x = x[:, -1:]
        return self.out_head(self.final_norm(x))


# ---- Chapter 5: pretraining (one loop for it and both fine-tunings), sampling, GPT-2's weights ----

def calc_loss_batch(input_batch, target_batch, model, device):
    """Cross-entropy of predicting each next token: inputs and targets (b, T) -> a scalar."""
    with autocast(device):  # bfloat16 matmuls on a CUDA GPU (Part 2)
        logits = model(input_batch.to(device, non_blocking=True))  # (b, T, vocab)
    # (b, T, vocab) -> (b T, vocab) against (b T,) targets; float32 even under autocast; -100 is ignored
    return F.cross_entropy(logits.float().flatten(0, 1), target_batch.to(device, non_blocking=True).flatten())


def calc_loss_loader(data_loader, model, device, num_batches=None):
    num_batches = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if num_batches == 0:
        return float("nan")
    total = sum(calc_loss_batch(x, y, model, device) for x, y in itertools.islice(data_loader, num_batches))
    return total.item() / num_batches


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter):
    model.eval()
    train_loss = calc_loss_loader(train_loader, model, device, num_batches=eval_iter)
    val_loss = calc_loss_loader(val_loader, model, device, num_batches=eval_iter)
    model.train()
    return train_loss, val_loss


def make_optimizer(model, device, lr, weight_decay):
    """The book's AdamW over the parameters that train, fused: one pass over memory per step (same maths).
    The fused kernel takes each parameter as one contiguous block, and GPT-2's loaded weights are views
    (transposes and thirds of OpenAI's matrices): what trains gets its own contiguous copy first."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.contiguous()  # no copy when it already is
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay,
                             fused=torch.device(device).type in ("cpu", "cuda"))


def learning_rate(step, total_steps, peak_lr, warmup_steps=0, min_lr=None):
    """Appendix D: linear warmup to peak_lr, then cosine decay to min_lr (no decay when min_lr is None).
    Appendix D's warmup starts at a separate initial_lr; this one at peak_lr / warmup_steps."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if min_lr is None:
        return peak_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train_model(model, train_loader, val_loader, optimizer, device, num_epochs, eval_freq, eval_iter,
                start_context=None, tokenizer=None, *, warmup_steps=0, min_lr=None, grad_clip=None, grad_accum=1,
                max_steps=None, report=None, save=None, resume=None):
    """The book's train_model_simple with appendix D's learning-rate schedule and gradient clipping: the one loop
    of pretraining and both fine-tunings. Not in the book: a step adds up the gradients of grad_accum batches,
    max_steps may end the run mid-epoch, and report(model) adds figures, {name: fraction}, to each evaluation
    (chapter 6's accuracies). Part 2 adds: under torchrun each process learns from its share of every batch;
    save(progress, history, epoch_seed, final), the command's, is called at the run's end, after a step once its
    last call is SAVE_SECONDS old, and when Ctrl-C or SIGTERM stops the run between two steps, and says what it
    saved; `resume`, such a save, continues the run exactly. Steps count from 1 (the book's log says 0 where this
    says 1), and clipping applies from the first step (appendix D clips only after the warmup)."""
    progress = dict(resume["progress"]) if resume else {"epoch": 0, "batch": 0, "step": 0, "tokens_seen": 0}
    history = list(resume["history"]) if resume else []  # one row per evaluation
    ddp = data_parallel(model)  # Part 2: under torchrun, the model that averages gradients over the processes
    peak_lr = optimizer.param_groups[0].setdefault("initial_lr", optimizer.param_groups[0]["lr"])  # saved with it
    steps_per_epoch = len(train_loader) // grad_accum
    total_steps = min(num_epochs * steps_per_epoch, max_steps or math.inf)
    first_step, saved_at = progress["step"], time.time()  # this call's first step, and the time of the last save
    epoch_seed = None  # the shuffle of the epoch in progress, for a save
    busy, logged_tokens = 0.0, progress["tokens_seen"]  # seconds in steps, and tokens, since the last log line
    with stop_between_steps() as stop:  # Part 2: Ctrl-C and SIGTERM set stop["signal"]
        while progress["epoch"] < num_epochs and progress["step"] < total_steps:
            model.train()
            batches = epoch_batches(train_loader, resume, progress["batch"] * grad_accum)  # iter(train_loader)
            resume = epoch_seed = None
            for _ in range(progress["batch"], steps_per_epoch):
                started = time.perf_counter()
                optimizer.zero_grad()
                for i, (input_batch, target_batch) in enumerate(itertools.islice(batches, grad_accum)):
                    with accumulating(ddp, last=i == grad_accum - 1):  # Part 2: one exchange of gradients a step
                        loss = calc_loss_batch(input_batch, target_batch, ddp, device) / grad_accum
                        loss.backward()
                    progress["tokens_seen"] += input_batch.numel() * processes()[1]
                if epoch_seed is None:  # the epoch's shuffle, drawn by its first batch (an evaluation draws another)
                    epoch_seed = getattr(train_loader.batch_sampler, "seed", None)
                if grad_clip:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                lr = learning_rate(progress["step"], total_steps, peak_lr, warmup_steps, min_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                progress["batch"] += 1
                progress["step"] += 1
                busy += time.perf_counter() - started
                if (progress["step"] - 1) % eval_freq == 0:
                    evaluation = evaluate_model(model, train_loader, val_loader, device, eval_iter)
                    train_loss, val_loss = all_reduce(*evaluation)  # Part 2: the mean over torchrun's processes
                    figures = report(model) if report else {}
                    history.append({"epoch": progress["epoch"] + 1, "step": progress["step"],
                                    "tokens_seen": progress["tokens_seen"], "train_loss": train_loss,
                                    "val_loss": val_loss, **figures})
                    shown = "".join(f", {name.replace('_', ' ')} {value:.2%}" for name, value in figures.items())
                    rate = (progress["tokens_seen"] - logged_tokens) / busy
                    print(f"Ep {progress['epoch'] + 1} (Step {progress['step']:06d}): Train loss {train_loss:.3f}, "
                          f"Val loss {val_loss:.3f}{shown} | {progress['tokens_seen']:,} tokens, {rate:,.0f} tok/s, "
                          f"lr {lr:.2e}", flush=True)
                    busy, logged_tokens = 0.0, progress["tokens_seen"]
                if progress["batch"] == steps_per_epoch:  # the epoch is done: a save now resumes at the next one
                    progress.update(epoch=progress["epoch"] + 1, batch=0)
                    if start_context is not None and not stop["signal"]:  # a stop does no more work
                        generate_and_print_sample(model, tokenizer, device, start_context)
                if progress["step"] >= total_steps:
                    break
                overdue = bool(save) and time.time() - saved_at > SAVE_SECONDS
                signum, overdue = all_reduce(stop["signal"], overdue, op="max")  # as any process says
                if signum:  # stopped where the run is whole: save (if this run saves) and do no more
                    raise Stopped(signum, progress, save(progress, history, epoch_seed, final=False) if save
                                  else "nothing saved")
                if overdue:
                    save(progress, history, epoch_seed, final=False)
                    saved_at = time.time()
        saved = "nothing saved"
        if save and progress["step"] > first_step:
            saved = save(progress, history, epoch_seed, final=True)
        if save:
            print(saved, flush=True)
        signum = all_reduce(stop["signal"], op="max")[0]
        if signum:  # asked during the last step or sample: the run is whole, and ends as a stop
            raise Stopped(signum, progress, saved)
    return ([row["train_loss"] for row in history], [row["val_loss"] for row in history],
            [row["tokens_seen"] for row in history])


def generate_and_print_sample(model, tokenizer, device, start_context, max_new_tokens=50):
    model.eval()
    idx = text_to_token_ids(start_context, tokenizer).to(device)
    out = generate(model, idx, max_new_tokens, model.pos_emb.num_embeddings)
    print(token_ids_to_text(out, tokenizer).replace("\n", " "), flush=True)
    model.train()


def next_token(logits, temperature=0.0, top_k=None, top_p=None):
    """The last position's logits (b, vocab) -> one token per row (b, 1): greedy, or sampled."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (b, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1.0:
        # Keep the most likely tokens until their mass reaches top_p (always at least one).
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, num_samples=1)  # multinomial renormalizes what is left


@torch.no_grad()
def generate_stream(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, top_p=None,
                    eos_id=None, use_cache=True):
    """Yield the next token of every row, (b, 1), for a prompt idx (b, T); with the cache (Part 2) a step reads
    only the newest token, and once the text outgrows the context the window slides by reading the last
    `context_size` tokens again. Rows that emit eos_id are done; generation stops when every row is."""
    idx = idx[:, -context_size:]
    caches = None
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(idx)
        elif caches is None or caches[0].len == context_size:
            caches = [KVCache(context_size) for _ in model.trf_blocks]
            logits = model(idx, caches)
        else:
            logits = model(idx[:, -1:], caches)
        token = next_token(logits[:, -1].float(), temperature, top_k, top_p)  # top-p sums in float32
        if eos_id is not None:
            token[done] = eos_id
            done |= token.squeeze(1) == eos_id
            if done.all():
                return
        idx = torch.cat([idx, token], dim=1)[:, -context_size:]
        yield token


def generate(model, idx, max_new_tokens, context_size, temperature=0.0, top_k=None, eos_id=None,
             top_p=None, use_cache=True):
    """The book's generate(): the prompt followed by the new tokens, (b, n_prompt + n_new)."""
    new = generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k, top_p, eos_id, use_cache)
    return torch.cat([idx, *new], dim=1)


GPT2_SIZES = ("124M", "355M", "774M", "1558M")  # OpenAI's; each one's dimensions are in its hparams.json


def load_weights_into_gpt(gpt, params):
    """OpenAI's GPT-2 weights (the book's nested params, read in Part 2) into `gpt`, not copied: its
    parameters become views of the checkpoint's memory map. Conv1D stores (d_in, d_out), nn.Linear
    (d_out, d_in), hence the transposes."""
    t = torch.from_numpy
    state = {"tok_emb.weight": t(params["wte"]), "pos_emb.weight": t(params["wpe"]),
             "final_norm.scale": t(params["g"]), "final_norm.shift": t(params["b"])}
    for i, block in enumerate(params["blocks"]):
        attn, mlp, pre = block["attn"], block["mlp"], f"trf_blocks.{i}."
        # c_attn (emb_dim, 3 emb_dim) -> query, key and value, (emb_dim, emb_dim) each
        for name, w, b in zip(("W_query", "W_key", "W_value"), t(attn["c_attn"]["w"]).chunk(3, dim=-1),
                              t(attn["c_attn"]["b"]).chunk(3, dim=-1)):
            state.update({pre + f"att.{name}.weight": w.T, pre + f"att.{name}.bias": b})
        for ours, (scope, conv) in {"att.out_proj": (attn, "c_proj"), "ff.layers.0": (mlp, "c_fc"),
                                    "ff.layers.2": (mlp, "c_proj")}.items():
            state.update({pre + ours + ".weight": t(scope[conv]["w"]).T, pre + ours + ".bias": t(scope[conv]["b"])})
        for ours, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state.update({pre + ours + ".scale": t(block[ln]["g"]), pre + ours + ".shift": t(block[ln]["b"])})
    state["out_head.weight"] = state["tok_emb.weight"]
    gpt.load_state_dict(state, strict=True, assign=True)  # refuses a missing tensor or a wrong shape
    # GPT-2 ties them: one 154 MB matrix, not two. The book copies wte into both, so there full
    # fine-tuning trains the embedding and the head apart; here they train as one.
    gpt.out_head.weight = gpt.tok_emb.weight
    return gpt


# ---- Chapter 6: fine-tuning for classification (SMS spam) --------------------------------------

TRAINABLE = {"last-block": 1, "last-two-blocks": 2, "all": None}  # how many final blocks train


def read_sms_spam(path):
    """(label, text) rows, read as the book's pandas.read_csv(sep="\\t", header=None): with csv's
    default quoting, a stray '"' merges two pairs of lines, as in the book (5,572 rows, 747 spam)."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.reader(f, delimiter="\t")
            for row in reader:
                if not row:  # pandas skips blank lines too
                    continue
                if len(row) != 2 or row[0] not in ("ham", "spam") or not row[1]:
                    raise GPTError(f"{path}, line {reader.line_num}: expected 'ham' or 'spam', a tab, then "
                                   f"the message; got {row!r:.80}")
                rows.append((row[0], row[1]))
    except (UnicodeDecodeError, csv.Error) as e:
        raise GPTError(f"{path}: not a UTF-8 tab-separated file ({e})") from None
    return rows


def balance_and_split(rows, train_frac=0.7, validation_frac=0.1):
    """The book's create_balanced_dataset and random_split with the draws pandas makes for
    sample(n, random_state=123) and sample(frac=1, random_state=123): as many ham messages as
    spam ones, ham first, shuffled, cut 70/10/20. Labels become ham 0, spam 1."""
    ham = [(0, text) for label, text in rows if label == "ham"]
    spam = [(1, text) for label, text in rows if label == "spam"]
    if not spam or len(ham) < len(spam):
        raise GPTError(f"need at least one spam message and as many ham ones; got {len(spam)} spam, {len(ham)} ham")
    balanced = [ham[i] for i in np.random.RandomState(123).choice(len(ham), len(spam), replace=False)] + spam
    balanced = [balanced[i] for i in np.random.RandomState(123).permutation(len(balanced))]
    train_end = int(len(balanced) * train_frac)
    validation_end = train_end + int(len(balanced) * validation_frac)
    return {"train": balanced[:train_end], "validation": balanced[train_end:validation_end],
            "test": balanced[validation_end:]}


def encode_sms(rows, tokenizer, max_length):
    """(token ids cut to the context, label) per message; "<|endoftext|>" typed in one is text, not padding."""
    return [(tokenizer.encode(text, disallowed_special=())[:max_length], label) for label, text in rows]


def collate_spam(batch, pad_token_id=50256):
    """Pad a batch only to its own longest message (the book pads all to the training set's longest)."""
    width = max(len(ids) for ids, _ in batch)
    inputs = torch.tensor([ids + [pad_token_id] * (width - len(ids)) for ids, _ in batch])  # (b, width)
    return inputs, torch.tensor([[label] for _, label in batch])  # targets (b, 1)


class SpamClassifier(nn.Module):
    """A GPT with a 2-class out_head (ham, spam), frozen but for what `trainable` names. It answers from each
    row's last real token (the book reads position -1, padding in all but a batch's longest message) as a
    one-token "sequence", so calc_loss_batch and train_model serve unchanged."""

    def __init__(self, gpt, trainable="last-block", pad_token_id=50256):
        super().__init__()
        self.gpt, self.pad_token_id = gpt, pad_token_id
        # A new module, so GPT-2's tied tok_emb keeps its weight
        gpt.out_head = nn.Linear(gpt.out_head.in_features, 2)
        self.requires_grad_(trainable == "all")
        if trainable != "all":
            for module in (*gpt.trf_blocks[-TRAINABLE[trainable]:], gpt.final_norm, gpt.out_head):
                module.requires_grad_(True)

    def forward(self, in_idx):  # right-padded token ids (b, T) -> logits (b, 1, 2)
        logits = self.gpt(in_idx)  # (b, T, 2)
        # Causal attention: padding to the right never changes the real tokens' outputs
        last = in_idx.shape[1] - 1 - (in_idx != self.pad_token_id).flip(1).int().argmax(1)  # (b,)
        return logits[torch.arange(len(in_idx)), last].unsqueeze(1)  # (b, 2) -> (b, 1, 2)


@torch.no_grad()
def calc_accuracy_loader(data_loader, model, device, num_batches=None):
    training, correct, seen = model.training, 0, 0
    model.eval()
    for inputs, targets in itertools.islice(data_loader, num_batches):
        predicted = model(inputs.to(device))[:, -1].argmax(-1)  # (b,)
        correct += (predicted == targets[:, -1].to(device)).sum().item()
        seen += len(targets)
    model.train(training)
    return correct / max(seen, 1)


# ---- Chapter 7: instruction fine-tuning --------------------------------------------------------

def split_instruction_data(data):
    """The book's split: the first 85% to train on, the next 10% to test, the rest to validate."""
    train_portion, test_portion = int(len(data) * 0.85), int(len(data) * 0.1)
    return (data[:train_portion], data[train_portion:train_portion + test_portion],
            data[train_portion + test_portion:])


def format_input(entry):
    """The Alpaca-style prompt; the model learns to continue it with "### Response:" and the answer."""
    instruction_text = ("Below is an instruction that describes a task. Write a response that "
                        f"appropriately completes the request.\n\n### Instruction:\n{entry['instruction']}")
    return instruction_text + (f"\n\n### Input:\n{entry['input']}" if entry["input"] else "")


class InstructionDataset(Dataset):
    """Each entry tokenized once: (prompt tokens whose targets to mask, token ids). The prompt and the
    response are encoded apart so the masked span ends exactly at the prompt."""

    def __init__(self, data, tokenizer, mask_instruction=False):
        self.data, self.encoded_texts = data, []
        for entry in data:
            prompt = tokenizer.encode(format_input(entry), disallowed_special=())
            response = tokenizer.encode(f"\n\n### Response:\n{entry['output']}", disallowed_special=())
            self.encoded_texts.append((len(prompt) if mask_instruction else 0, prompt + response))

    def __getitem__(self, index):
        return self.encoded_texts[index]

    def __len__(self):
        return len(self.data)


def custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None, device="cpu"):
    """The book's collate: every sequence gets one <|endoftext|> and is padded with more to the
    longest in the batch; targets are inputs shifted by one, and every target after that first
    <|endoftext|> (and, for (n_prompt, ids) items, each target inside the prompt) is ignore_index."""
    items = [item if isinstance(item, tuple) else (0, item) for item in batch]
    width = max(len(ids) for _, ids in items) + 1
    padded = torch.full((len(items), width), pad_token_id)
    targets = torch.full((len(items), width - 1), ignore_index)
    for row, (n_prompt, ids) in enumerate(items):
        padded[row, :len(ids)] = torch.tensor(ids)
        targets[row, max(n_prompt - 1, 0):len(ids)] = padded[row, max(n_prompt, 1):len(ids) + 1]
    inputs = padded[:, :-1]  # (b, longest) like targets
    return inputs[:, :allowed_max_length].to(device), targets[:, :allowed_max_length].to(device)


def extract_response(generated_text, input_text):
    return generated_text[len(input_text):].replace("### Response:", "").strip()


def generate_response(model, entry, tokenizer, cfg, device, max_new_tokens=256, **sampling):
    """(response text, number of new tokens) for one entry; stops at <|endoftext|>."""
    input_text = format_input(entry)
    idx = encode_prompt(input_text, tokenizer, cfg, device)
    out = generate(model, idx, max_new_tokens, cfg["context_length"], eos_id=tokenizer.eot_token, **sampling)
    return extract_response(token_ids_to_text(out, tokenizer), input_text), out.shape[1] - idx.shape[1]


def generate_model_scores(json_data, json_key, model="llama3", url="http://localhost:11434/api/chat"):
    """The book's evaluation: a larger model (through Ollama, see query_model in Part 2) scores each response."""
    scores = []
    for i, entry in enumerate(json_data, 1):
        prompt = (f"Given the input `{format_input(entry)}` and correct output `{entry['output']}`, "
                  f"score the model response `{entry[json_key]}` on a scale from 0 to 100, "
                  "where 100 is the best score. Respond with the integer number only.")
        score = query_model(prompt, model, url)
        try:
            scores.append(int(score.strip()))
        except ValueError:
            print(f"Could not convert score of entry {i}: {score!r}", file=sys.stderr)
    return scores


# ---- Appendix E: parameter-efficient fine-tuning with LoRA --------------------------------------

class LoRALayer(nn.Module):
    """A trainable low-rank update of a frozen (in_dim -> out_dim) weight: rank * (in_dim + out_dim)
    numbers instead of in_dim * out_dim. B starts at zero, so training starts from the model as it
    was. The update is scaled by alpha, as in the book's text; the book's repository later divides
    by the rank (alpha / rank, the LoRA paper's choice): --lora-alpha ALPHA/RANK gives that."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear initializes its weight
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.alpha = alpha

    def forward(self, x):  # (..., in_dim) -> (..., rank) -> (..., out_dim)
        return self.alpha * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, rank, alpha):
        super().__init__()
        self.linear = linear
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha)

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def replace_linear_with_lora(model, rank, alpha):
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            setattr(model, name, LinearWithLoRA(module, rank, alpha))
        else:
            replace_linear_with_lora(module, rank, alpha)


# ================================================================================================
# PART 2: THE TOOL: files and downloads, data sets, corpora, training runs and checkpoints, OpenAI's
# checkpoint format, speed, the command line
# ================================================================================================

# ---- Files: one error boundary, atomic saves, downloads ----------------------------------------

def brief(error):
    """An exception's message on one line, cut short: an error line gives the reason, not a page of it."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 100 else text[:97] + "..."


@contextmanager
def reading(path, what):
    """The one boundary around a user's file: whatever goes wrong while parsing it (a zip, JSON, a pickle, an
    index, a tensor of the wrong shape) is one line naming the file; main() names an OSError's own file."""
    try:
        yield
    except Exception as e:
        if isinstance(e, GPTError) or isinstance(e, OSError) and e.filename:
            raise
        raise GPTError(f"{path}: not {what} ({f'no {e}' if isinstance(e, KeyError) else brief(e)})") from None


def read_json(path):
    with open(path, encoding="utf-8") as f, reading(path, "JSON"):
        return json.load(f)


@contextmanager
def atomic_open(path, mode="wb", **kwargs):
    """A file written under a unique temporary name beside `path`, renamed over it once complete: a crash, a kill
    or a full disk leaves the previous file as it was. open() gives it the mode the user's umask asks for."""
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(tmp, mode.replace("w", "x"), **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # RuntimeError: torch.save's writer on a full disk
        if isinstance(e, requests.RequestException) or getattr(e, "filename", None) not in (None, tmp, path):
            raise  # a download's or another file's error, for its reader to report
        kept = f"the previous {path} is kept" if os.path.isfile(path) else "nothing was written"
        raise GPTError(f"cannot save {path} ({getattr(e, 'strerror', None) or brief(e)}); {kept}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def writable(path, force=False, resumable=False):
    """Before any long work: `path` can be written, and a file there (hours of training?) goes only with --force."""
    if os.path.isdir(path) or not os.path.basename(path):
        raise GPTError(f"{path!r} is a folder; name the file to write")
    if os.path.exists(path) and not force:
        resume = ", --resume to continue it" if resumable else ""
        raise GPTError(f"{path} already exists; use --force to replace it{resume}, or --out to write elsewhere")
    try:  # a file made and removed there: the test that holds on every file system and for every user
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tempfile.TemporaryFile(dir=os.path.dirname(path) or ".").close()
    except OSError as e:
        raise GPTError(f"cannot write {path}: {e.strerror}") from None


VERDICT_URL = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
INSTRUCTION_URL = ("https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/"
                   "instruction-data.json")
SMS_URLS = ("https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip",
            "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip")  # the book's mirror


def https_only(url):
    if urlsplit(url).scheme != "https":
        raise ValueError(f"refusing a URL that is not HTTPS: {url}")


def download(urls, path):
    """`path`, unless it is there, fetched from the first of `urls` that answers (the others are mirrors): over
    HTTPS on every hop, and renamed into place only once its size is what the server announced, so that a cut
    download is never taken for a whole one."""
    if os.path.exists(path):
        return path
    hooks = {"response": lambda r, **_: https_only(urljoin(r.url, r.headers["location"])) if r.is_redirect else None}
    reasons = []
    for url in urls:
        try:
            https_only(url)
            # identity: the byte count is the file's, not that of a compressed stream
            with requests.get(url, headers={"Accept-Encoding": "identity"}, stream=True, timeout=30,
                              hooks=hooks) as r, atomic_open(path) as f:
                r.raise_for_status()
                size, start = int(r.headers.get("Content-Length", 0)), time.time()
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    show_progress(os.path.basename(path), f.tell(), size, start)
                if size and f.tell() != size:
                    raise ValueError(f"got {f.tell():,} of {size:,} bytes")
            return path
        except requests.HTTPError as e:
            reasons.append(f"HTTP {e.response.status_code}")
        except requests.exceptions.SSLError:
            reasons.append(f"no trusted TLS certificate from {urlsplit(url).hostname}")
        except requests.ConnectionError:
            reasons.append(f"cannot reach {urlsplit(url).hostname}")
        except requests.exceptions.ChunkedEncodingError:
            reasons.append("the connection broke off")
        except (requests.RequestException, ValueError) as e:
            reasons.append(brief(e))
    raise GPTError(f"cannot download {urls[0]} ({'; then a mirror: '.join(reasons)}); put the file at {path}")


def show_progress(label, done, total, start):
    """For work over 8 MB, one line on stderr redrawn in place: MB done of the total, and MB/s."""
    if total > 8 << 20:
        rate = done / 1e6 / max(time.time() - start, 1e-3)
        print(f"\r{label}: {done / 1e6:,.0f} of {total / 1e6:,.0f} MB, {rate:,.1f} MB/s",
              end="\n" if done >= total else "", file=sys.stderr, flush=True)


# ---- Data sets: SMS spam, instructions, the Ollama judge ---------------------------------------

def prepare_sms_spam(data_dir="data"):
    """Chapter 6's splits of the SMS Spam Collection, downloaded once."""
    path = os.path.join(data_dir, "SMSSpamCollection")

    def fetch_and_extract():  # only the member by that name is read: no path from the zip is used
        if not os.path.exists(path):
            zip_path = download(SMS_URLS, os.path.join(data_dir, "sms_spam_collection.zip"))
            with reading(zip_path, "the SMS Spam Collection zip; delete it and retry"), zipfile.ZipFile(zip_path) as z:
                data = z.read("SMSSpamCollection")
            with atomic_open(path) as f:
                f.write(data)
    once_per_machine(fetch_and_extract)
    return balance_and_split(read_sms_spam(path))


def load_instruction_data(path, *extra):
    """A JSON list of {instruction, input, output} objects (with the `extra` keys too), checked before training."""
    data = read_json(path)
    keys = ("instruction", "input", "output", *extra)
    with reading(path, f"a JSON list of objects with the strings {', '.join(keys)}"):
        if not isinstance(data, list) or not all(isinstance(entry[key], str) for entry in data for key in keys):
            raise ValueError("found otherwise")
    return data


@contextmanager
def ollama_errors(url, model):
    """A failed exchange with the Ollama server at `url` as one line that says what to do."""
    try:
        yield
    except requests.ConnectionError:
        raise GPTError(f"no Ollama server at {url}: start one with `ollama serve`, then `ollama pull {model}`"
                       ) from None
    except (requests.RequestException, ValueError, KeyError, TypeError) as e:
        raise GPTError(f"Ollama at {url}: {brief(e)} (is {model} pulled?)") from None


def query_model(prompt, model="llama3", url="http://localhost:11434/api/chat"):
    """Ask a local Ollama server (chapter 7's judge); it streams its answer as JSON lines."""
    data = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    with ollama_errors(url, model), requests.post(url, json=data, stream=True, timeout=(10, 600)) as r:
        r.raise_for_status()
        return "".join(json.loads(line)["message"]["content"] for line in r.iter_lines() if line)


def check_ollama(model, url):
    """Before any long work: an Ollama server answers at `url`, and its /api/tags lists `model` as pulled."""
    with ollama_errors(url, model):
        r = requests.get(url.rstrip("/") + "/api/tags", timeout=10)
        r.raise_for_status()
        pulled = [m["name"] for m in r.json()["models"]]
    if model not in pulled and f"{model}:latest" not in pulled:
        raise GPTError(f"Ollama at {url} has no {model} ({', '.join(pulled) or 'no model'} pulled): run "
                       f"`ollama pull {model}` first")


# ---- Corpora: tokenized once, on every core, into a cache of token ids on disk -----------------

CACHE_DIR = os.path.join("data", "tokens")  # relative to where a command runs, as checkpoints/ is
# After a printable ASCII character, before a space or a newline: GPT-2's pre-tokenizer never joins the two
# (and looks ahead only within runs of whitespace), so the tokens of pieces of a text cut there are the text's.
SAFE_CUT = re.compile(r"[!-~][ \n]")


def corpus(paths):
    """[path, size, modification time] of each document of --data: each file, every *.txt below each folder;
    without --data, the-verdict.txt, downloaded beside gpt.py. The token cache is named after them."""
    if not paths:
        paths = [os.path.join(HERE, "the-verdict.txt")]
        once_per_machine(lambda: download([VERDICT_URL], paths[0]))
    files = []
    for path in paths:
        found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                       for name in names if name.endswith(".txt"))
        if os.path.isdir(path) and not found:
            raise GPTError(f"{path}: no *.txt file in this folder")
        files += found if os.path.isdir(path) else [path]
    return [[path, os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in files]


def pieces(text, size):
    """`text` cut at SAFE_CUTs into pieces of about `size` characters: tokenized apart, they give its tokens."""
    start = 0
    while start < len(text):
        cut = SAFE_CUT.search(text, start + size)
        yield text[start:cut.start() + 1 if cut else len(text)]
        start = cut.start() + 1 if cut else len(text)


def token_cache(documents, cache_dir, piece=1 << 20):
    """(training, validation) token ids of the documents, split as the book splits a text: each one's first 90%
    of characters to train on, the rest to validate; <|endoftext|> between two documents. They are memory maps of
    uint16 files in `cache_dir`, named after the documents (a changed corpus gets a new cache) and made once:
    each document is read whole, and its pieces are tokenized on every core (tiktoken releases the GIL)."""
    key = hashlib.sha256(json.dumps(["gpt2", "90%", documents]).encode()).hexdigest()[:16]
    paths = [os.path.join(cache_dir, f"{key}.{part}.uint16") for part in ("train", "val")]

    def make():
        if all(map(os.path.exists, paths)):
            return
        encode = partial(get_tokenizer().encode_to_numpy, allowed_special={"<|endoftext|>"})
        total, done, start = sum(size for _, size, _ in documents), 0, time.time()
        with ThreadPoolExecutor() as pool, atomic_open(paths[0]) as train, atomic_open(paths[1]) as val:
            for i, (path, size, _) in enumerate(documents):
                with open(path, encoding="utf-8") as f, reading(path, "UTF-8 text; convert it (iconv -t utf-8)"):
                    text = f.read()
                split = int(0.9 * len(text))
                for out, part in ((train, text[:split]), (val, text[split:])):
                    for tokens in pool.map(encode, [*["<|endoftext|>"] * (i > 0), *pieces(part, piece)]):
                        out.write(tokens.astype(np.uint16))
                done += size
                show_progress("tokenizing", done, total, start)
    once_per_machine(make)
    return [np.memmap(path, np.uint16, "r") if os.path.getsize(path) else np.zeros(0, np.uint16) for path in paths]


class TokenWindows(GPTDatasetV1):
    """GPTDatasetV1's windows over token ids that stay on disk (a memory map of the cache)."""

    def __init__(self, token_ids, max_length, stride):
        self.token_ids, self.max_length = token_ids, max_length
        self.starts = range(0, len(token_ids) - max_length, stride)

    def __getitem__(self, i):  # uint16 from disk -> int64, what nn.Embedding takes
        return tuple(torch.from_numpy(ids.astype(np.int64)) for ids in super().__getitem__(i))


# ---- Training runs: torchrun's processes, exact resume, stops between steps --------------------

SAVE_SECONDS = 600  # a run saves after a step once its last save is this old: a crash loses at most this


def processes():
    """(this process's rank, how many processes): (0, 1) unless started by torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def once_per_machine(make):
    """make() in one process per machine (torchrun's local rank 0) while the others wait: one download of GPT-2's
    6 GB, not one per GPU. If it fails, torchrun stops the others."""
    if not dist.is_initialized() or int(os.environ.get("LOCAL_RANK", 0)) == 0:
        make()
    if dist.is_initialized():
        dist.barrier()


def all_reduce(*values, op="mean"):
    """Each value's mean (or "max") over torchrun's processes; as they are in a single process."""
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(tensor, dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return (tensor / (1 if op == "max" else dist.get_world_size())).tolist()


def data_parallel(model):
    """Under torchrun, `model` in DistributedDataParallel, which averages the gradients over the processes in
    backward(); in a single process, the model itself."""
    return DistributedDataParallel(model) if dist.is_initialized() else model


def accumulating(ddp, last):
    """DDP's no_sync() for a step's batches but the last: their gradients add up here, then travel once."""
    return ddp.no_sync() if isinstance(ddp, DistributedDataParallel) and not last else nullcontext()


class Batches(Sampler):
    """The batches of the book's DataLoader(dataset, batch_size, shuffle, drop_last), with its shuffle, dealt to
    torchrun's P processes: process r takes every P-th window from the r-th, so together they take one batch P
    times larger. drop_last drops what does not fill a step (batch x grad_accum x P); else the first windows
    come again until each process has as many. resume_at = (seed, batches done) replays a stopped epoch."""

    def __init__(self, n, batch_size, shuffle=False, drop_last=False, grad_accum=1):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.rank, self.processes = processes()
        self.step = batch_size * grad_accum * self.processes  # windows per step, all processes together
        self.seed, self.resume_at = None, None

    def __iter__(self):
        seed, skip = self.resume_at or (None, 0)
        self.resume_at = None
        order = torch.arange(self.n)
        if self.shuffle:  # RandomSampler's draw, at the same moment, without its list of every index
            self.seed = seed if seed is not None else int(torch.empty((), dtype=torch.int64).random_().item())
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed))
        if self.drop_last:
            order = order[:self.n - self.n % self.step]
        else:
            order = order.repeat(self.processes)[:math.ceil(self.n / self.processes) * self.processes]
        mine = order[self.rank::self.processes]
        for start in range(skip * self.batch_size, len(mine), self.batch_size):
            yield mine[start:start + self.batch_size].tolist()

    def __len__(self):
        mine = (self.n - self.n % self.step) // self.processes if self.drop_last else math.ceil(self.n / self.processes)
        return math.ceil(mine / self.batch_size)


def make_loader(dataset, batch_size, shuffle=False, drop_last=False, grad_accum=1, **kwargs):
    return DataLoader(dataset, batch_sampler=Batches(len(dataset), batch_size, shuffle, drop_last, grad_accum),
                      **kwargs)


def rng_state():
    """Every random generator a step draws from: the CPU's, and this process's GPU's (dropout on a GPU)."""
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():  # under torchrun all draw as rank 0 does
        torch.cuda.set_rng_state(state["cuda"])


def epoch_batches(loader, resume=None, skip=0):
    """iter(loader); after `resume`, a save made `skip` batches into an epoch, the rest of that epoch's order with
    the random state as it was. iter() draws one number from the random state (a seed for workers, unused), which
    the run drew before a save made mid-epoch: there, the state is set again after iter()."""
    if resume:
        set_rng_state(resume["rng"])
    if resume and skip:
        loader.batch_sampler.resume_at = (resume["epoch_seed"], skip)
    batches = iter(loader)
    if resume and skip:
        set_rng_state(resume["rng"])
    return batches


class Stopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a training run between two steps: main() prints where, and what was saved, and
    exits with 128 + the signal's number, as a shell reports it."""

    def __init__(self, signum, progress, saved):
        where = f"epoch {progress['epoch'] + 1}" if progress["batch"] else f"the end of epoch {progress['epoch']}"
        super().__init__(f"stopped at {where}, step {progress['step']}; {saved}")
        self.signum = int(signum)  # all_reduce's float under torchrun


def terminate(signum, frame):
    """SIGTERM outside a training step stops the command as Ctrl-C does: `finally` blocks remove temporary files."""
    stop = KeyboardInterrupt()
    stop.signum = signum
    raise stop


@contextmanager
def stop_between_steps():
    """Within, Ctrl-C or SIGTERM sets stop["signal"], for train_model to stop after the step it is in, where the
    run's state is whole."""
    stop = {"signal": 0}

    def request(signum, frame):
        if not stop["signal"] and processes()[0] == 0:
            print(f"\n{signal.Signals(signum).name}: stopping after this step", file=sys.stderr, flush=True)
        stop["signal"] = stop["signal"] or signum
    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---- Checkpoints -------------------------------------------------------------------------------

def save_checkpoint(path, state, losses=None):
    """`state` saved as `path` by rank 0 while the other processes wait, with the evaluations in `losses` beside it
    as PATH-losses.csv and, where matplotlib is installed (optional), the book's plot of them as PATH-losses.png.
    Returns 'saved PATH (SIZE)'."""
    stem = os.path.splitext(path)[0] + "-losses"
    if processes()[0] == 0:
        with atomic_open(path) as f:
            torch.save(state, f)
        if losses is not None:
            with atomic_open(stem + ".csv", "w", encoding="utf-8", newline="") as f:
                writer = csv.DictWriter(f, list(losses[0]) if losses else [], lineterminator="\n")
                writer.writeheader()
                writer.writerows(losses)
            plot_losses(stem + ".png", losses)
    if dist.is_initialized():
        dist.barrier()  # no process runs ahead, or exits, before the checkpoint is whole
    if not os.path.exists(path):  # written by rank 0 on another machine
        return f"saved {path}"
    size = os.path.getsize(path)
    return f"saved {path} ({f'{size / 1e9:.2f} GB' if size >= 1e9 else f'{size / 1e6:.1f} MB'})"


def plot_losses(path, losses):
    """The book's plot_losses: training and validation loss against tokens seen, as a PNG, if matplotlib is here."""
    try:
        from matplotlib.figure import Figure  # without pyplot, no display is needed
    except ImportError:
        return
    fig = Figure(figsize=(5, 3))
    ax = fig.subplots()
    tokens_seen = [row["tokens_seen"] for row in losses]
    ax.plot(tokens_seen, [row["train_loss"] for row in losses], label="Training loss")
    ax.plot(tokens_seen, [row["val_loss"] for row in losses], linestyle="-.", label="Validation loss")
    ax.set(xlabel="Tokens seen", ylabel="Loss")
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic_open(path) as f:
        fig.savefig(f, format="png")


def load_checkpoint(path, kind="gpt"):
    """weights_only=True refuses pickled code instead of running it; mmap reads only the tensors used."""
    if not os.path.isfile(path):
        maker = "`python gpt.py spam`" if kind == "spam" else "`python gpt.py train` or `python gpt.py load-gpt2 124M`"
        raise GPTError(f"{path}: no such checkpoint; {maker} makes one")
    with reading(path, "a spam classifier of gpt.py" if kind == "spam" else "a model checkpoint of gpt.py"):
        if not zipfile.is_zipfile(path):
            raise ValueError("not the zip file that torch.save writes")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if ckpt["kind"] != kind:
            raise ValueError(f"its kind is {ckpt['kind']!r}")
        if not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
            raise ValueError("its config and model are not both dicts")
        if "lora" in ckpt:  # an adapter-only file, as an earlier gpt.py wrote them
            raise ValueError("a LoRA adapter alone, which gpt.py no longer reads; fine-tune again")
    return ckpt


def build_model(cfg, state_dict, source, make=GPTModel):
    """make(cfg), a GPTModel by default, holding `state_dict`'s tensors themselves: no random init, no copy."""
    with reading(source, "a model that fits its config"):
        with torch.device("meta"):
            model = make(cfg)
        model.load_state_dict(state_dict, assign=True)  # strict: a missing or an unknown tensor is an error
    gpt = getattr(model, "gpt", model)  # a SpamClassifier's
    if gpt.out_head.weight.data_ptr() == gpt.tok_emb.weight.data_ptr():
        gpt.out_head.weight = gpt.tok_emb.weight  # saved tied (GPT-2): one parameter again
    return model


@torch.no_grad()
def merge_lora(model):
    """Fold every LinearWithLoRA into its nn.Linear, W + alpha (A B)^T: the same outputs at the base's cost."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, LinearWithLoRA):
                delta = child.lora.alpha * (child.lora.A @ child.lora.B).T  # (in, rank) @ (rank, out) -> (out, in)
                child.linear.weight = nn.Parameter(child.linear.weight + delta)
                setattr(module, name, child.linear)
    return model


# ---- OpenAI's GPT-2 checkpoint, read without TensorFlow ----------------------------------------

GPT2_BASE_URLS = ("https://openaipublic.blob.core.windows.net/gpt-2/models",
                  "https://f001.backblazeb2.com/file/LLMs-from-scratch/gpt2")
GPT2_FILES = ("hparams.json", "model.ckpt.index", "model.ckpt.data-00000-of-00001")  # what the reader reads


# A TensorFlow checkpoint is PREFIX.index, a LevelDB-format table that maps each tensor's name to a
# BundleEntryProto (dtype, shape, byte range), and PREFIX.data-00000-of-00001, the tensors' raw bytes.
# Both formats are simple enough to decode by hand, so reading GPT-2 needs no TensorFlow.

def _varint(buf, pos):
    """The base-128 varint at buf[pos]: (value, position after it)."""
    value = shift = 0
    while True:
        byte, pos = buf[pos], pos + 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_fields(buf):
    """A protobuf message decoded without its schema: {field number: [values]}. proto3 leaves out
    fields that hold their default, so a missing field means 0."""
    fields, pos = {}, 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        if tag & 7 == 0:  # varint
            value, pos = _varint(buf, pos)
        elif tag & 7 in (1, 2, 5):  # fixed64, length-delimited, fixed32
            size, pos = _varint(buf, pos) if tag & 7 == 2 else ({1: 8, 5: 4}[tag & 7], pos)
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise ValueError(f"protobuf wire type {tag & 7}")
        fields.setdefault(tag >> 3, []).append(value)
    if pos != len(buf):
        raise ValueError("a protobuf field runs past the end of its message")
    return fields


def _field(fields, number):
    return fields.get(number, [0])[0]


def _table_block(table, handle):
    """The (key, value) pairs of the table block that a BlockHandle (offset, size) points to."""
    offset, pos = _varint(handle, 0)
    size = _varint(handle, pos)[0]
    if offset + size + 5 > len(table) - 48 or table[offset + size] != 0:  # then a type byte (0: not compressed)
        raise ValueError("truncated, or a compressed block")
    block = table[offset:offset + size]
    end = size - 4 - 4 * int.from_bytes(block[-4:], "little")  # the restart points are only for seeking
    entries, key, pos = [], b"", 0
    while pos < end:
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        key = key[:shared] + block[pos:pos + unshared]  # a key stores only what differs from the last
        pos += unshared + value_size
        entries.append((key, block[pos - value_size:pos]))
    return entries


def read_tf_index(index_path):
    """{tensor name: its BundleEntryProto's fields} from a one-shard TensorFlow checkpoint index."""
    with open(index_path, "rb") as f, reading(index_path, "a one-shard TensorFlow checkpoint index"):
        table = f.read()
        if len(table) < 48 or int.from_bytes(table[-8:], "little") != 0xDB4775248B80FB57:
            raise ValueError("bad magic number")
        footer = table[-48:]
        index_handle = footer[_varint(footer, _varint(footer, 0)[1])[1]:]  # after the metaindex handle
        # The index block's keys only separate data blocks; the tensors are the data blocks' entries.
        entries = {key.decode(): _proto_fields(value) for _, handle in _table_block(table, index_handle)
                   for key, value in _table_block(table, handle)}
        header = entries.pop("", {})  # the empty key holds the BundleHeaderProto: shards, endianness
        if _field(header, 1) != 1 or _field(header, 2) != 0:
            raise ValueError(f"{_field(header, 1)} shards, endianness {_field(header, 2)}")
        return entries


def read_tf_checkpoint(index_path, data_path):
    """Every tensor of a one-shard float32 TensorFlow checkpoint, as numpy views of one copy-on-write
    memory map of the data file: nothing is read until used."""
    entries = read_tf_index(index_path)
    with reading(data_path, f"the float32 tensors that {index_path} points to"):
        data = np.memmap(data_path, dtype=np.uint8, mode="c") if os.path.getsize(data_path) else np.empty(0, np.uint8)
        tensors = {}
        for name, e in entries.items():  # BundleEntryProto: 1 dtype, 2 shape (its 2: dimensions), 4 offset, 7 slices
            shape = [_field(_proto_fields(dim), 1) for dim in _proto_fields(_field(e, 2) or b"").get(2, [])]
            if _field(e, 1) != 1 or 7 in e:
                raise ValueError(f"{name} is not a whole float32 tensor")
            tensors[name] = np.frombuffer(data, "<f4", math.prod(shape), _field(e, 4)).reshape(shape)
        return tensors


def load_gpt2(size, models_dir="models", base_url=None):
    """GPT-2 of one size, OpenAI's files downloaded on first use and read into the book's nested params:
    params["blocks"][3]["attn"]["c_attn"]["w"], params["wte"], params["g"] (ln_f's scale)."""
    bases = [base_url.rstrip("/")] if base_url else GPT2_BASE_URLS
    folder = os.path.join(models_dir, size)
    hparams, index, data = (os.path.join(folder, name) for name in GPT2_FILES)

    def fetch():
        for name in GPT2_FILES:
            download([f"{base}/{size}/{name}" for base in bases], os.path.join(folder, name))
    once_per_machine(fetch)
    settings = read_json(hparams)
    with reading(folder, f"OpenAI's GPT-2 {size}, or its files do not fit each other"):
        cfg = {"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"], "emb_dim": settings["n_embd"],
               "n_heads": settings["n_head"], "n_layers": settings["n_layer"], "drop_rate": 0.0, "qkv_bias": True}
        params = {"blocks": [{} for _ in range(cfg["n_layers"])]}
        for name, array in read_tf_checkpoint(index, data).items():
            while array.ndim > 1 and array.shape[0] == 1:  # Conv1D weights are (1, d_in, d_out)
                array = array[0]
            parts = name.split("/")[1:]  # "model/h3/attn/c_attn/w", "model/ln_f/g", "model/wte"
            target = params["blocks"][int(parts[0][1:])] if parts[0].startswith("h") else params
            for scope in parts[1:-1]:
                target = target.setdefault(scope, {})
            target[parts[-1]] = array
        with torch.device("meta"):  # no memory and no random init: the weights arrive next
            model = GPTModel(cfg)
        return load_weights_into_gpt(model, params), cfg


# ---- Speed: the KV cache, precision, memory ----------------------------------------------------

class KVCache:
    """One layer's keys and values so far, in buffers allocated once for `max_len` positions."""

    def __init__(self, max_len):
        self.max_len, self.len, self.k, self.v = max_len, 0, None, None

    def update(self, k, v):  # k, v of the T new positions: (b, n_heads, T, head_dim) -> all so far
        if self.k is None:
            shape = (*k.shape[:2], self.max_len, k.shape[3])  # (b, n_heads, max_len, head_dim)
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = self.len + k.shape[2]
        self.k[:, :, self.len:end], self.v[:, :, self.len:end] = k, v
        self.len = end
        return self.k[:, :, :end], self.v[:, :, :end]


def autocast(device):
    """bfloat16 matmuls on a CUDA GPU (weights, optimizer, loss stay float32); elsewhere float32."""
    cuda = torch.device(device).type == "cuda"
    return torch.autocast("cuda" if cuda else "cpu", torch.bfloat16, enabled=cuda and torch.cuda.is_bf16_supported())


def keep_freed_memory():
    """glibc gives freed blocks over 32 MB back to the OS, so each step's 154 MB embedding gradient is faulted
    in again 4 KB at a time: keeping up to 1 GB of freed memory makes CPU training ~1.3x faster."""
    if platform.libc_ver()[0] == "glibc":  # elsewhere (macOS, Windows, musl) there is nothing to tune
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: blocks under 1 GB come from the heap...
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: ...and up to 1 GB of it stays when freed


# ---- The command line --------------------------------------------------------------------------

def pick_device(name):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:  # under torchrun, each process its own GPU
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # AssertionError: a build of torch without CUDA
        raise GPTError(f"device '{name}' is not available here; try auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in float32
    return device


def model_from_args(args, outputs=()):
    """(model, config) from --checkpoint or --model. The `outputs` are checked once the checkpoint, an input, is
    read, and before GPT-2 may be downloaded, the long part."""
    ckpt = load_checkpoint(args.checkpoint) if args.checkpoint else None
    for path in outputs:
        writable(path, args.force)
    if ckpt:
        return build_model(ckpt["config"], ckpt["model"], args.checkpoint), ckpt["config"]
    return load_gpt2(args.model, args.models_dir, args.base_url)


RUN_OPTIONS = ("data", "batch_size", "grad_accum", "stride", "lr", "weight_decay", "warmup_steps", "cosine", "min_lr",
               "grad_clip", "eval_freq", "eval_iter", "start_context")  # what `train --resume` takes from the run
ARCHITECTURE = ("context_length", "emb_dim", "n_layers", "n_heads", "drop_rate")  # flags named as config keys


def cmd_train(args, device):
    args.data = [os.path.abspath(path) for path in args.data] if args.data else None  # the same from any folder
    cfg = dict(GPT_CONFIG_124M, **{key: getattr(args, key) for key in ARCHITECTURE})
    resume = None
    if args.resume:
        ckpt = load_checkpoint(args.out)
        with reading(args.out, "a run of `train` to resume (--weights-only saves none)"):
            cfg, run = ckpt["config"], ckpt["run"]
            vars(args).update({key: run[key] for key in RUN_OPTIONS})
            resume = {key: ckpt[key] for key in ("model", "optimizer", "progress", "history", "epoch_seed", "rng")}
            epoch, step = resume["progress"]["epoch"], resume["progress"]["step"]
            torch.Generator().set_state(resume["rng"]["cpu"])  # a generator's state, or an error here
        if epoch >= args.epochs or step >= (args.max_steps or math.inf):
            print(f"nothing left to train: {args.out} has finished {epoch} epoch(s), {step} steps; give a larger "
                  "--epochs or --max-steps to train further")
            return
        if run["processes"] != processes()[1]:  # each step's batch would change
            raise GPTError(f"{args.out} was trained by {run['processes']} process(es); resume it with as many")
    documents = corpus(args.data)
    if resume and documents != run["documents"]:
        raise GPTError(f"the training data changed since {args.out} was saved (files added, removed or modified); "
                       "resume with the data it was trained on")
    writable(args.out, args.force or args.resume, resumable=True)
    ctx, stride = cfg["context_length"], args.stride or cfg["context_length"]
    train_ids, val_ids = token_cache(documents, args.cache_dir)
    train_loader = make_loader(TokenWindows(train_ids, ctx, stride), args.batch_size, shuffle=True, drop_last=True,
                               grad_accum=args.grad_accum)
    val_loader = make_loader(TokenWindows(val_ids, ctx, stride), args.batch_size)
    if len(train_loader) == 0 or len(val_loader) == 0:
        step = args.batch_size * args.grad_accum * processes()[1]
        raise GPTError(f"text too short: {len(train_ids):,} tokens to train on and {len(val_ids):,} to validate, for "
                       f"a step of {step} windows of {ctx} tokens (batch size x grad accum x processes) and one window "
                       "to validate; use more text, or smaller windows or batches")
    model = (build_model(cfg, resume["model"], args.out) if resume else GPTModel(cfg)).to(device)
    optimizer = make_optimizer(model, device, args.lr, args.weight_decay)
    if resume:
        with reading(args.out, "a run whose optimizer state fits its model"):
            optimizer.load_state_dict(resume["optimizer"])
        print(f"resuming at epoch {epoch + 1}, step {step}")
    launch = f"torchrun --nproc_per_node={processes()[1]}" if processes()[1] > 1 else "python"
    again = shlex.join(["gpt.py", *args.argv, *([] if args.resume else ["--resume"])])
    meta = {"kind": "gpt", "config": cfg, "run": dict({key: getattr(args, key) for key in RUN_OPTIONS},
                                                      documents=documents, processes=processes()[1])}

    def save(progress, history, epoch_seed, final):
        run = {} if args.weights_only else dict(optimizer=optimizer.state_dict(), progress=dict(progress),
                                                rng=rng_state(), epoch_seed=epoch_seed)
        saved = save_checkpoint(args.out, dict(meta, model=model.state_dict(), history=history, **run), history)
        if final:
            return saved
        if args.weights_only:
            return saved + "; only its weights (--weights-only): --resume cannot continue it"
        return f"{saved}; continue with `{launch} {again}`"
    announce_training(model, train_loader, device, f"{cfg['n_layers']} layers, emb {cfg['emb_dim']}, context {ctx}")
    start = time.time()
    train_model(model, train_loader, val_loader, optimizer, device, args.epochs, args.eval_freq, args.eval_iter,
                args.start_context or None, get_tokenizer(), warmup_steps=args.warmup_steps,
                min_lr=args.min_lr if args.cosine else None, grad_clip=args.grad_clip, grad_accum=args.grad_accum,
                max_steps=args.max_steps, save=save, resume=resume)
    print(f"done in {time.time() - start:.0f} s")


def announce_training(model, train_loader, device, what):
    """Before any command trains: a line on what trains, and the allocator set for speed."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"training {trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters ({what}) | "
          f"{len(train_loader.dataset):,} examples | device {device}"
          f"{f' x {processes()[1]} processes' if processes()[1] > 1 else ''}", flush=True)
    keep_freed_memory()


def cmd_sample(args, device):
    temperature = args.temperature
    if temperature is None:  # --top-k or --top-p alone mean sampling, not greedy decoding
        temperature = 1.0 if args.top_k or args.top_p else 0.0
    sampling = dict(temperature=temperature, top_k=args.top_k, top_p=args.top_p, use_cache=not args.no_cache)
    model, cfg = model_from_args(args)
    model.to(device).eval()
    tokenizer = get_tokenizer()
    if args.instruction is not None:  # the Alpaca prompt of chapter 7; print only the answer
        print(generate_response(model, {"instruction": args.instruction, "input": args.input}, tokenizer, cfg,
                                device, args.max_new_tokens, **sampling)[0])
        return
    idx = encode_prompt(args.prompt, tokenizer, cfg, device)
    print(args.prompt, end="", flush=True)
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a token may end mid-character
    for token in generate_stream(model, idx, args.max_new_tokens, cfg["context_length"], eos_id=tokenizer.eot_token,
                                 **sampling):
        print(utf8.decode(tokenizer.decode_single_token_bytes(token.item())), end="", flush=True)
    print(utf8.decode(b"", final=True))


def cmd_load_gpt2(args, device):
    out = args.out or f"checkpoints/gpt2-{args.size}.pt"
    writable(out, args.force)
    start = time.time()
    model, cfg = load_gpt2(args.size, args.models_dir, args.base_url)
    print(f"GPT-2 {args.size}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"read in {time.time() - start:.1f} s")
    print(save_checkpoint(out, {"kind": "gpt", "config": cfg, "model": model.state_dict()}))
    tokenizer = get_tokenizer()  # the book's sample: top-k 50, temperature 1.5, seed 123
    idx = generate(model.to(device).eval(), encode_prompt(args.prompt, tokenizer, cfg, device),
                   25, cfg["context_length"], temperature=1.5, top_k=50)
    print(token_ids_to_text(idx, tokenizer))


def fine_tune(args, device, model, data, collate_fn, meta, what, report=None, **options):
    """What spam and instruct share: `model` (with --lora, frozen, with LoRA adapters) trained by the one loop on
    data {"train", "validation", "test"}, and saved at the end as --out with `meta`, the adapters merged. A stop
    before the end saves nothing: no --resume. report(model, loaders): see train_model. Returns the loaders."""
    step = args.batch_size * args.grad_accum * processes()[1]
    if len(data["train"]) < step or not all(data.values()):
        raise GPTError(f"too few examples: {', '.join(f'{len(part)} {name}' for name, part in data.items())}; "
                       f"training needs a step of {step} (batch size x grad accum x processes), the others one each")
    if meta["config"]["vocab_size"] < 50257:  # any text may hold any token
        raise GPTError(f"the model knows {meta['config']['vocab_size']} tokens; fine-tuning needs GPT-2's 50,257")
    loaders = {name: make_loader(part, args.batch_size, name == "train", name == "train", args.grad_accum,
                                 collate_fn=collate_fn) for name, part in data.items()}
    if args.lora:
        model.requires_grad_(False)
        replace_linear_with_lora(model, args.lora, args.lora_alpha)
        what = f"LoRA rank {args.lora}, alpha {args.lora_alpha:g}"
    optimizer = make_optimizer(model.to(device), device, args.lr, 0.1)

    def save(progress, history, epoch_seed, final):
        if not final:
            return f"nothing saved: `{args.command}` saves only at its end (it has no --resume)"
        return save_checkpoint(args.out, dict(meta, model=merge_lora(model).state_dict()), history)
    announce_training(model, loaders["train"], device, what)
    train_model(model, loaders["train"], loaders["validation"], optimizer, device, args.epochs, save=save,
                grad_accum=args.grad_accum, max_steps=args.max_steps,
                report=report and (lambda model: report(model, loaders)), **options)
    return loaders


def cmd_spam(args, device):
    tokenizer = get_tokenizer()
    if args.classify:
        if not all(text.strip() for text in args.classify):
            raise GPTError("--classify takes a message, not an empty text")
        ckpt = load_checkpoint(args.out, kind="spam")
        model = build_model(ckpt["config"], ckpt["model"], args.out,
                            lambda cfg: SpamClassifier(GPTModel(cfg), ckpt["trainable"]))
        texts = encode_sms([(0, text) for text in args.classify], tokenizer, ckpt["config"]["context_length"])
        with torch.no_grad():
            logits = model.to(device).eval()(collate_spam(texts)[0].to(device))[:, -1]  # (n, 2)
        for text, p in zip(args.classify, torch.softmax(logits, -1)[:, 1].tolist()):
            print(f"{'spam' if p > 0.5 else 'not spam'} (spam probability {p:.3f}): {text}")
        return
    gpt, cfg = model_from_args(args, [args.out])
    data = {name: encode_sms(rows, tokenizer, cfg["context_length"])
            for name, rows in prepare_sms_spam(args.data_dir).items()}
    model = SpamClassifier(gpt, args.trainable)
    start = time.time()

    def accuracy(loader, num_batches=None):
        return all_reduce(calc_accuracy_loader(loader, model, device, num_batches))[0]
    meta = {"kind": "spam", "config": cfg, "trainable": args.trainable}
    loaders = fine_tune(args, device, model, data, collate_spam, meta, args.trainable, eval_freq=50, eval_iter=5,
                        report=lambda model, loaders: {"train_acc": accuracy(loaders["train"], 5),
                                                       "val_acc": accuracy(loaders["validation"], 5)})
    print(f"done in {time.time() - start:.0f} s: " + ", ".join(f"{name} accuracy {accuracy(loader):.2%}"
                                                               for name, loader in loaders.items()))


def cmd_instruct(args, device):
    if args.responses and not args.judge:
        raise GPTError("--responses is for judging an existing responses file: add --judge MODEL")
    if args.judge:  # before hours of training and generating, not after
        check_ollama(args.judge, args.ollama_url)
    if args.responses:
        judge(args, load_instruction_data(args.responses, "model_response"))
        return
    entries = load_instruction_data(args.data) if args.data else None
    name = os.path.splitext(args.checkpoint)[0] if args.checkpoint else f"checkpoints/gpt2-{args.model}"
    args.out = args.out or name + "-sft.pt"
    responses_path = os.path.splitext(args.out)[0] + "-responses.json"
    gpt, cfg = model_from_args(args, [args.out, responses_path])
    if not args.data:
        path = os.path.join(args.data_dir, "instruction-data.json")
        once_per_machine(lambda: download([INSTRUCTION_URL], path))
        entries = load_instruction_data(path)
    train_data, test_data, val_data = split_instruction_data(entries)
    tokenizer = get_tokenizer()
    max_length = min(1024, cfg["context_length"])  # longer entries are cut
    data = {name: InstructionDataset(part, tokenizer, args.mask_instruction)
            for name, part in (("train", train_data), ("validation", val_data), ("test", test_data))}
    if args.mask_instruction and max((n for part in data.values() for n, _ in part), default=0) >= max_length:
        raise GPTError(f"a prompt fills the model's context of {max_length} tokens, so --mask-instruction leaves "
                       "nothing of its response to learn; shorten it, or leave out the flag")
    start = time.time()
    loaders = fine_tune(args, device, gpt, data, partial(custom_collate_fn, allowed_max_length=max_length),
                        {"kind": "gpt", "config": cfg}, "all", eval_freq=5, eval_iter=5, tokenizer=tokenizer,
                        start_context=format_input(val_data[0]) if val_data else None)
    val_loss, test_loss = all_reduce(*evaluate_model(gpt, loaders["validation"], loaders["test"], device, None))
    print(f"done in {time.time() - start:.0f} s: val loss {val_loss:.3f}, test loss {test_loss:.3f}", flush=True)
    if processes()[0]:
        return  # rank 0 answers
    responses, start, n_tokens = [], time.time(), 0
    for i, entry in enumerate(test_data, 1):
        response, n = generate_response(gpt.eval(), entry, tokenizer, cfg, device)
        responses.append(dict(entry, model_response=response))
        n_tokens += n
        print(f"\rresponses: {i}/{len(test_data)}, {n_tokens / (time.time() - start):.0f} tokens/s",
              end="" if i < len(test_data) else "\n", file=sys.stderr, flush=True)
    with atomic_open(responses_path, "w", encoding="utf-8") as f:
        json.dump(responses, f, indent=4)
    print(f"wrote {responses_path}", flush=True)
    if args.judge:
        judge(args, responses)


def judge(args, responses):
    scores = generate_model_scores(responses, "model_response", args.judge, args.ollama_url.rstrip("/") + "/api/chat")
    print(f"{args.judge}'s average score: {sum(scores) / max(len(scores), 1):.2f} "
          f"(of {len(scores)}/{len(responses)} scored responses)")


class ArgParser(argparse.ArgumentParser):
    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):  # one line, not argparse's usage block
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # "(default: X)" only where there is one
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


class Source(argparse.Action):
    """--model and --checkpoint say where the model comes from: the one given replaces the command's default."""

    def __call__(self, parser, args, value, option=None):
        args.model, args.checkpoint = (value, None) if self.dest == "model" else (None, value)


def number(kind, low, high=math.inf, low_open=False):
    """An argparse type: a number of `kind` in [low, high] ((low, high] with low_open)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high or (low_open and value == low):  # NaN, inf
            raise argparse.ArgumentTypeError(f"{value} is outside {'(' if low_open else '['}{low}, {high}]")
        return value
    return parse


def make_parser():
    parser = ArgParser(prog="gpt.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    count, positive, fraction = number(int, 1), number(float, 0, low_open=True), number(float, 0, 1)

    def command(name, func, help, **defaults):  # a command's flags are its own, so are their defaults
        p = commands.add_parser(name, help=help, description=help)
        p.set_defaults(func=func, **defaults)
        p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
        p.add_argument("--seed", type=number(int, 0, 2 ** 63 - 1), default=123, help="torch's random seed")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        return p

    def gpt2_flags(p, model=None, checkpoint=None, source=True):
        p.add_argument("--models-dir", default="models", help="where GPT-2's files are kept")
        p.add_argument("--base-url", default=os.environ.get("GPT2_BASE_URL"), help="download GPT-2 from this host")
        if source:
            which = p.add_mutually_exclusive_group()
            which.add_argument("--model", choices=GPT2_SIZES, default=model, action=Source, help="GPT-2's weights")
            which.add_argument("--checkpoint", default=checkpoint, action=Source, help="a checkpoint of this tool")

    def training_flags(p, epochs, batch_size, lr):
        p.add_argument("--force", action="store_true", help="replace an existing --out")
        p.add_argument("--epochs", type=number(int, 0), default=epochs, help="passes over the training data")
        p.add_argument("--batch-size", type=count, default=batch_size, help="sequences per batch and process")
        p.add_argument("--grad-accum", type=count, default=1, help="batches per step (their gradients add up)")
        p.add_argument("--max-steps", type=count, help="stop after this many steps, even mid-epoch")
        p.add_argument("--lr", type=positive, default=lr, help="AdamW's (peak) learning rate")
        p.add_argument("--weights-only", action="store_true", help="save the model without AdamW's state, so no "
                       "--resume (what spam and instruct always do)")

    def lora_flags(p, group):  # --lora excludes spam's other choices of what trains
        group.add_argument("--lora", type=count, metavar="RANK", help="train only LoRA adapters (appendix E)")
        p.add_argument("--lora-alpha", type=positive, default=16, help="LoRA's scale (the book's: alpha, not / rank)")

    p = command("train", cmd_train, "pretrain a GPT (book chapter 5: the defaults are its run)")
    training_flags(p, epochs=10, batch_size=2, lr=4e-4)
    p.add_argument("--out", default="checkpoints/verdict.pt", help="checkpoint to write")
    p.add_argument("--data", nargs="+", metavar="PATH", help="UTF-8 text files or folders of *.txt (default: the "
                   "book's the-verdict.txt, downloaded)")
    p.add_argument("--cache-dir", default=CACHE_DIR, help="where tokenized corpora are kept")
    p.add_argument("--resume", action="store_true", help="continue the run in --out with its options: of the flags, "
                   "only --epochs, --max-steps, --weights-only and --cache-dir apply")
    p.add_argument("--context-length", type=count, default=256, help="tokens per training window")
    p.add_argument("--stride", type=count, help="window step (default: the context length)")
    p.add_argument("--emb-dim", type=count, default=768, help="embedding size")
    p.add_argument("--n-layers", type=count, default=12, help="transformer blocks")
    p.add_argument("--n-heads", type=count, default=12, help="attention heads per block")
    p.add_argument("--drop-rate", type=fraction, default=0.1, help="dropout probability")
    p.add_argument("--weight-decay", type=number(float, 0), default=0.1, help="AdamW's weight decay")
    p.add_argument("--warmup-steps", type=number(int, 0), default=0, help="linear warmup to --lr")
    p.add_argument("--cosine", action="store_true", help="cosine decay from --lr to --min-lr")
    p.add_argument("--min-lr", type=number(float, 0), default=4e-5, help="where --cosine ends")
    p.add_argument("--grad-clip", type=positive, help="clip the gradient norm")
    p.add_argument("--eval-freq", type=count, default=5, help="evaluate every N steps")
    p.add_argument("--eval-iter", type=count, default=5, help="batches per evaluation")
    p.add_argument("--start-context", default="Every effort moves you", help="prompt sampled each epoch")

    p = command("sample", cmd_sample, "continue a prompt, printing tokens as they come")
    gpt2_flags(p, checkpoint="checkpoints/verdict.pt")
    p.add_argument("--prompt", default="Every effort moves you", help="text to continue")
    p.add_argument("--max-new-tokens", type=number(int, 0), default=50, help="tokens to generate at most")
    p.add_argument("--temperature", type=number(float, 0), help="0: greedy (default: 1 if --top-k or --top-p)")
    p.add_argument("--top-k", type=count, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=number(float, 0, 1, low_open=True), help="sample from the smallest set this likely")
    p.add_argument("--no-cache", action="store_true", help="recompute every position each step (the book's way)")
    p.add_argument("--instruction", help="ask an instruction-tuned model (see instruct); prints only the response")
    p.add_argument("--input", default="", help="the input that goes with --instruction")

    p = command("load-gpt2", cmd_load_gpt2, "download OpenAI's GPT-2 once, save it as a checkpoint, print a sample")
    gpt2_flags(p, source=False)
    p.add_argument("size", metavar="SIZE", choices=GPT2_SIZES, help=", ".join(GPT2_SIZES))
    p.add_argument("--out", help="checkpoint to write (default: checkpoints/gpt2-SIZE.pt)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--prompt", default="Every effort moves you", help="text for the book's sample")

    p = command("spam", cmd_spam, "fine-tune GPT-2 to classify SMS spam (book chapter 6), or --classify texts")
    gpt2_flags(p, model="124M")
    training_flags(p, epochs=5, batch_size=8, lr=5e-5)
    p.add_argument("--out", default="checkpoints/spam-classifier.pt", help="classifier to write, or to --classify with")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--trainable", choices=TRAINABLE, default="last-two-blocks", help="what trains with the new head")
    lora_flags(p, what)
    p.add_argument("--data-dir", default="data", help="where the data set is downloaded and split")
    p.add_argument("--classify", action="append", metavar="TEXT", help="print spam or not spam for TEXT (repeatable)")

    p = command("instruct", cmd_instruct, "fine-tune GPT-2 on instructions (book chapter 7), answer the test set, and "
                "let an Ollama model score the answers")
    gpt2_flags(p, model="355M")
    training_flags(p, epochs=2, batch_size=8, lr=5e-5)
    p.add_argument("--out", help="checkpoint to write (default: checkpoints/gpt2-SIZE-sft.pt, or CHECKPOINT-sft.pt); "
                   "the answers go to NAME-responses.json beside NAME.pt")
    lora_flags(p, p)
    p.add_argument("--data", help="JSON list of {instruction, input, output} (default: the book's, downloaded)")
    p.add_argument("--data-dir", default="data", help="where the book's data is downloaded")
    p.add_argument("--mask-instruction", action="store_true", help="no loss on the prompt (exercise 7.2)")
    p.add_argument("--judge", metavar="MODEL", help="score the responses with this Ollama model, e.g. llama3")
    p.add_argument("--ollama-url", default="http://localhost:11434", help="the Ollama server of --judge")
    p.add_argument("--responses", metavar="PATH", help="only judge this file of responses, as instruct writes it")
    return parser


OUT_OF_MEMORY = re.compile("out of memory|can't allocate memory|not enough memory")  # CUDA, MPS, the CPU allocator


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = make_parser().parse_args(argv)
    args.argv = argv  # the command line, for the command that continues a stopped run
    if hasattr(sys.stdout, "reconfigure"):  # a terminal that cannot show a character shows '?', not a traceback
        sys.stdout.reconfigure(errors="replace")
    # Under torchrun rank 0 prints the log, and each machine's first process prints the errors, so that each
    # terminal shows them once
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    device = args.device  # until pick_device() turns it into a torch.device
    previous_handler = signal.signal(signal.SIGTERM, terminate)
    try:
        device = pick_device(args.device)
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: nccl between CUDA GPUs, gloo between CPUs
            # one process per machine may download GPT-2 (6 GB) or tokenize a corpus while the others wait
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
            sys.stdout = sys.stdout if dist.get_rank() == 0 else open(os.devnull, "w")
        torch.manual_seed(args.seed)  # before any command draws: GPT-2 and checkpoints load on "meta"
        args.func(args, device)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return 0
    except BrokenPipeError:  # `... | head` stopped reading: end quietly, as command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is still buffered goes nowhere
        return 141  # 128 + SIGPIPE, as a shell reports a tool the closed pipe ended
    except (GPTError, OSError, RuntimeError, MemoryError) as e:  # OSError: on a path the user gave
        oom = isinstance(e, MemoryError) or isinstance(e, RuntimeError) and OUT_OF_MEMORY.search(str(e))
        if args.debug or isinstance(e, RuntimeError) and not oom:
            raise
        message = str(e)
        if oom:
            advice = "lower --batch-size" if "batch_size" in vars(args) else "use a smaller model"
            message = f"out of memory on {device}; {advice}"
        elif isinstance(e, OSError) and e.filename:
            message = f"{e.filename}: {e.strerror}"
        if first:
            print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: not an error; a training run says what it saved
        if first:
            print(str(e) or "stopped", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        if dist.is_initialized():  # DDP's wrapper sits in reference cycles: free it while its process group
            gc.collect()  # lives, or at exit a thread it left may abort the process ("terminate called ...")
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
