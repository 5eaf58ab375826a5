"""Tests for gpt.py: `python -m pytest -q`. Offline, tiny models, values asserted against references."""
import csv
import http.server
import io
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(HERE.parent / "shared" / "tiktoken-cache"))
os.environ["REQUESTS_CA_BUNDLE"] = str(HERE / "testdata" / "localhost.pem")  # the local server's own certificate

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gpt  # noqa: E402

VERDICT, TESTDATA = HERE / "the-verdict.txt", HERE / "testdata"
TINY = dict(gpt.GPT_CONFIG_124M, context_length=32, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0)
TINY_TRAIN = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "32", "--eval-freq", "20"]
SPAM = [f"WINNER!! Claim your free prize {i} now, call 0800 {i}" for i in range(12)]
HAM = [f"ok see you at home later {i} lol" for i in range(20)]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return gpt.GPTModel(dict(TINY, **overrides)).eval()


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def weights_differ(a, b):
    """The largest difference between two checkpoints' tensors (their names must agree)."""
    assert list(a["model"]) == list(b["model"])  # no DDP "module." prefixes
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


def entries(n):
    return [{"instruction": f"Name the number {i}.", "input": f"{i} + 0" if i % 2 else "",
             "output": f"The number is {i}."} for i in range(n)]


def write_sms(path, spam=SPAM, ham=HAM):
    rows = [("ham", t) for t in ham] + [("spam", t) for t in spam]
    rows = [rows[i] for i in np.random.RandomState(0).permutation(len(rows))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return rows


@pytest.fixture
def serve(tmp_path):
    """A local HTTPS server over a folder; yields (base_url, folder, requests seen as (path, Range)). /to-http/X
    redirects to plain HTTP, /to-here/X to /X; /cut/X sends half of X and no size; /lying/X claims 10 bytes more."""
    root, seen = tmp_path / "www", []
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def send_head(self):
            seen.append((self.path, self.headers.get("Range")))
            head, _, rest = self.path[1:].partition("/")
            if head in ("to-http", "to-here"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:9/{rest}" if head == "to-http" else f"/{rest}")
                self.end_headers()
                return io.BytesIO(b"")
            path = Path(self.translate_path(self.path if head not in ("cut", "lying") else "/" + rest))
            if not path.is_file():
                return super().send_head()
            data = path.read_bytes()
            start = int(self.headers["Range"].split("=")[1].rstrip("-")) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            if head != "cut":
                self.send_header("Content-Length", str(len(data) - start + 10 * (head == "lying")))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            return io.BytesIO(data[start:len(data) // 2 if head == "cut" else None])

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TESTDATA / "localhost.pem", TESTDATA / "localhost.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", root, seen
    server.shutdown()


def write_tf_checkpoint(prefix, tensors):
    """float32 tensors as TensorFlow lays out a one-shard checkpoint (the reader's format, see gpt.py): the
    raw bytes, and an index table of one data block, its index block and the footer."""
    def varint(n):
        return bytes([n & 0x7F | 0x80]) + varint(n >> 7) if n > 0x7F else bytes([n])

    def field(number, value):  # bytes length-delimited, an int as a varint
        if isinstance(value, bytes):
            return varint(number << 3 | 2) + varint(len(value)) + value
        return varint(number << 3) + varint(value)

    def block(pairs):  # every key whole, one restart point
        return b"".join(varint(0) + varint(len(k)) + varint(len(v)) + k + v for k, v in pairs) + bytes(4) + b"\1\0\0\0"
    data, pairs = b"", [(b"", field(1, 1))]  # the header: one shard
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name], "<f4")
        shape = b"".join(field(2, field(1, n)) for n in array.shape)
        pairs.append((name.encode(), field(1, 1) + field(2, shape) + field(4, len(data)) + field(5, array.nbytes)))
        data += array.tobytes()
    table = block(pairs) + bytes(5)  # each block is followed by its type (0) and a checksum
    index = block([(b"\xff", varint(0) + varint(len(table) - 5))])
    footer = (varint(0) + varint(0) + varint(len(table)) + varint(len(index) - 0)).ljust(40, b"\0")
    Path(f"{prefix}.index").write_bytes(table + index + bytes(5) + footer + (0xDB4775248B80FB57).to_bytes(8, "little"))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)


@pytest.fixture(scope="session")
def gpt2_models(tmp_path_factory):
    """A models folder with GPT-2 "124M" in OpenAI's files: the TensorFlow-written fixture's weights, its token
    embedding grown to GPT-2's 50,257 rows, so that spam and instruct can tokenize any text."""
    folder = tmp_path_factory.mktemp("models") / "124M"
    folder.mkdir()
    tensors = gpt.read_tf_checkpoint(str(TESTDATA / "gpt2-tiny" / "model.ckpt.index"),
                                     str(TESTDATA / "gpt2-tiny" / "model.ckpt.data-00000-of-00001"))
    extra = np.random.default_rng(0).normal(0, 0.02, (50257 - 512, 16)).astype(np.float32)
    tensors["model/wte"] = np.concatenate([tensors["model/wte"], extra])
    write_tf_checkpoint(folder / "model.ckpt", tensors)
    hparams = json.loads((TESTDATA / "gpt2-tiny" / "hparams.json").read_text())
    (folder / "hparams.json").write_text(json.dumps(dict(hparams, n_vocab=50257)))
    return folder.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny checkpoint trained for one epoch on the-verdict.txt, shared by the tests below (read-only)."""
    path = str(tmp_path_factory.mktemp("trained") / "tiny.pt")
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", path]) == 0
    return path


# ---- Part 1: the book -------------------------------------------------------------------------

def test_the_verdict_and_the_tokenizer_as_in_the_book():
    text = VERDICT.read_text(encoding="utf-8")
    assert len(text) == 20479 and len(gpt.get_tokenizer().encode(text)) == 5145
    inputs, targets = next(iter(gpt.create_dataloader_v1(text, batch_size=1, max_length=4, stride=1, shuffle=False)))
    assert inputs.tolist() == [[40, 367, 2885, 1464]] and targets.tolist() == [[367, 2885, 1464, 1807]]
    ids = gpt.text_to_token_ids("Hello, world. <|endoftext|>", gpt.get_tokenizer())
    assert ids.tolist() == [[15496, 11, 995, 13, 220, 50256]]
    assert gpt.token_ids_to_text(ids, gpt.get_tokenizer()) == "Hello, world. <|endoftext|>"


def test_attention_is_the_masked_softmax_fused_or_explicit(monkeypatch):
    torch.manual_seed(1)
    att = gpt.MultiHeadAttention(d_in=12, d_out=12, context_length=8, dropout=0.0, num_heads=3).eval()
    x, (b, T, h, d) = torch.randn(2, 7, 12), (2, 7, 3, 4)
    q, k, v = (W(x).view(b, T, h, d).transpose(1, 2) for W in (att.W_query, att.W_key, att.W_value))
    scores = (q @ k.transpose(2, 3) / d ** 0.5).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    expected = att.out_proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, T, 12))
    for fused in (True, False):
        monkeypatch.setattr(gpt.MultiHeadAttention, "fused", fused)
        assert (att(x) - expected).abs().max() <= 1e-5
        x2 = x.clone()
        x2[:, 4:] = torch.randn(2, 3, 12)  # change the future: the past must not move
        assert torch.allclose(att(x2)[:, :4], att(x)[:, :4], atol=1e-6)


@pytest.mark.parametrize("fused", [True, False])
def test_cached_chunks_give_the_full_forward(monkeypatch, fused):
    """Chunked prefill: 5 tokens cached, then 3 at once, then 1: the last logits of each call are the full
    forward's at that position (is_causal alone would align the mask top-left and get 3 of them wrong)."""
    monkeypatch.setattr(gpt.MultiHeadAttention, "fused", fused)
    model, idx = tiny_model(seed=2), torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        caches = [gpt.KVCache(32) for _ in model.trf_blocks]
        for start, end in ((0, 5), (5, 8), (8, 9)):
            assert (model(idx[:, start:end], caches)[:, -1] - full[:, end - 1]).abs().max() <= 1e-5


@pytest.mark.parametrize("prompt_len, new", [(5, 30), (20, 40)])  # the second runs past the context
def test_kv_cache_and_explicit_attention_give_the_same_tokens(monkeypatch, prompt_len, new):
    model, idx = tiny_model(seed=3), torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    cached = gpt.generate(model, idx, new, 32)
    assert torch.equal(cached, gpt.generate(model, idx, new, 32, use_cache=False))
    monkeypatch.setattr(gpt.MultiHeadAttention, "fused", False)
    assert torch.equal(cached, gpt.generate(model, idx, new, 32))


def test_layernorm_gelu_and_the_books_model():
    x, ln = torch.randn(3, 5, 16), gpt.LayerNorm(16)
    torch.nn.init.uniform_(ln.scale)
    torch.nn.init.uniform_(ln.shift)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    assert torch.allclose(ln(x), ln.scale * (x - mean) / torch.sqrt(var + 1e-5) + ln.shift, atol=1e-5)
    gelu = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    assert torch.allclose(gpt.GELU()(x), gelu, atol=1e-6)
    torch.manual_seed(123)
    model = gpt.GPTModel(gpt.GPT_CONFIG_124M).eval()
    assert sum(p.numel() for p in model.parameters()) == 163_009_536
    out = gpt.generate(model, gpt.text_to_token_ids("Hello, I am", gpt.get_tokenizer()), 10, 1024)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267, 49706, 43231, 47062, 34657]]


def test_the_books_own_model_and_state_dict_load_unchanged():
    book = pytest.importorskip("llms_from_scratch.ch04")  # the book's package: not a dependency
    cfg = dict(TINY, qkv_bias=True)
    torch.manual_seed(0)
    theirs = book.GPTModel(cfg).eval()
    ours = gpt.GPTModel(cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # with its attention masks, which ours builds
    x = torch.randint(0, 50257, (2, 16))
    assert (ours(x) - theirs(x)).abs().max() <= 1e-5


def test_sampling_greedy_top_k_top_p_and_eos():
    model, idx = tiny_model(), torch.tensor([[1, 2, 3]])
    greedy = gpt.generate(model, idx, 12, 32)
    torch.manual_seed(5)
    assert torch.equal(greedy, gpt.generate(model, idx, 12, 32, temperature=1.0, top_k=1))
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    assert {gpt.next_token(logits, temperature=1.0, top_p=0.75).item() for _ in range(300)} == {0, 1}
    assert gpt.generate(model, idx, 5, 32, eos_id=greedy[0, 3].item()).tolist() == [[1, 2, 3]]
    long = torch.randint(0, 50257, (1, 50))  # longer than the context of 32: cropped
    assert torch.equal(gpt.generate(model, long, 3, 32)[:, :50], long)


def test_loss_is_float32_and_the_learning_rate_schedule():
    model, x = tiny_model().to(torch.bfloat16), torch.randint(0, 50257, (2, 8))
    loss = gpt.calc_loss_batch(x, x, model, "cpu")
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(torch.nn.functional.cross_entropy(
        model(x).float().flatten(0, 1), x.flatten()).item())
    assert gpt.learning_rate(0, 100, 1e-3, warmup_steps=10) == pytest.approx(1e-4)
    assert gpt.learning_rate(50, 100, 1e-3) == 1e-3
    assert gpt.learning_rate(100, 100, 1e-3, 10, min_lr=1e-4) == pytest.approx(1e-4)


# ---- OpenAI's checkpoint, and fine-tuning from it: the path a user takes -----------------------

def test_gpt2_fixture_matches_huggingface_logits_and_greedy_text():
    expected = np.load(TESTDATA / "gpt2-tiny.expected.npz")
    model, cfg = gpt.load_gpt2("gpt2-tiny", str(TESTDATA))  # all there: nothing to download
    assert cfg == {"vocab_size": 512, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 12,
                   "drop_rate": 0.0, "qkv_bias": True} and model.out_head.weight is model.tok_emb.weight
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(expected["input_ids"]))
    assert (logits - torch.from_numpy(expected["logits"])).abs().max() <= 1e-4
    for use_cache in (True, False):
        out = gpt.generate(model, torch.from_numpy(expected["greedy_prompt"])[None], 20, 64, use_cache=use_cache)
        assert out[0].tolist() == expected["greedy_ids"].tolist()
    tensors = gpt.read_tf_checkpoint(*(str(TESTDATA / "multiblock" / f"model.ckpt.{ext}")
                                       for ext in ("index", "data-00000-of-00001")))
    # Written by TensorFlow with 1,150 long names, so its index has two data blocks; numpy redraws the values
    assert list(tensors) == [f"v{i:04d}/" + "abcdefghij" * 22 for i in range(1150)]
    rng = np.random.default_rng(0)
    for i, t in enumerate(tensors.values()):
        np.testing.assert_array_equal(t, rng.standard_normal([] if i % 3 == 0 else [i % 5] if i % 3 == 1 else
                                                             [2, i % 4]).astype(np.float32))


def test_load_gpt2_downloads_once_over_https_saves_and_samples(serve, tmp_path, capsys):
    base, root, seen = serve
    shutil.copytree(TESTDATA / "gpt2-tiny", root / "124M")
    args = ["load-gpt2", "124M", "--base-url", base, "--models-dir", str(tmp_path / "models"),
            "--out", str(tmp_path / "g.pt"), "--prompt", " the, and."]
    assert gpt.main(args) == 0 and sorted(p for p, _ in seen) == sorted(f"/124M/{n}" for n in gpt.GPT2_FILES)
    assert f"saved {tmp_path / 'g.pt'} (" in capsys.readouterr().out
    assert gpt.main(args + ["--force"]) == 0 and len(seen) == 3  # everything present: not one request
    model, cfg = gpt.load_gpt2("124M", str(tmp_path / "models"))
    assert gpt.main(["sample", "--checkpoint", str(tmp_path / "g.pt"), "--prompt", " the, and.", "--max-new-tokens",
                     "8"]) == 0
    tok = gpt.get_tokenizer()
    want = gpt.generate(model.eval(), gpt.text_to_token_ids(" the, and.", tok), 8, 64, eos_id=tok.eot_token)
    assert capsys.readouterr().out.endswith(gpt.token_ids_to_text(want, tok) + "\n")


FINE_TUNING = {  # fine-tuning runs from GPT-2's weights, each short
    "spam": ["spam", "--trainable", "all", "--epochs", "1", "--batch-size", "8"],
    "instruct": ["instruct", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"]}


@pytest.mark.parametrize("source", ["checkpoint", "model"])
@pytest.mark.parametrize("command", FINE_TUNING)
def test_fine_tuning_from_gpt2s_files_takes_the_steps_it_takes_from_contiguous_weights(
        gpt2_models, tmp_path, capsys, command, source):
    """load_weights_into_gpt makes W_query .. ff's weights views (thirds and transposes of OpenAI's matrices),
    and load-gpt2's checkpoint keeps them so: AdamW's fused kernel once updated the wrong elements of such
    views. From OpenAI's files, through load-gpt2 or --model, the run must end where it ends from the same
    weights made contiguous."""
    write_sms(tmp_path / "SMSSpamCollection")
    (tmp_path / "d.json").write_text(json.dumps(entries(20)))
    loaded, copy = str(tmp_path / "gpt2.pt"), str(tmp_path / "copy.pt")
    assert gpt.main(["load-gpt2", "124M", "--models-dir", str(gpt2_models), "--out", loaded]) == 0
    ckpt = gpt.load_checkpoint(loaded)
    assert not ckpt["model"]["trf_blocks.0.att.W_query.weight"].is_contiguous()
    gpt.save_checkpoint(copy, **dict(ckpt, model={k: v.contiguous() for k, v in ckpt["model"].items()}))
    run = FINE_TUNING[command] + (["--data-dir", str(tmp_path)] if command == "spam" else ["--data", str(tmp_path /
                                                                                                      "d.json")])
    given = ["--model", "124M", "--models-dir", str(gpt2_models)] if source == "model" else ["--checkpoint", loaded]
    assert gpt.main([*run, *given, "--out", str(tmp_path / "a.pt")]) == 0
    assert gpt.main([*run, "--checkpoint", copy, "--out", str(tmp_path / "b.pt")]) == 0
    a, b = (gpt.load_checkpoint(str(tmp_path / f"{x}.pt"), command if command == "spam" else "gpt") for x in "ab")
    name = "gpt." * (command == "spam") + "trf_blocks.0.att.W_query.weight"
    assert weights_differ(a, b) <= 1e-6 and (a["model"][name] - ckpt["model"]["trf_blocks.0.att.W_query.weight"]).abs(
    ).max() > 1e-5  # it trained
    if command == "instruct":  # the responses, named after the checkpoint, follow the overwrite rule
        assert json.loads((tmp_path / "a-responses.json").read_text())[0]["output"] == "The number is 17."
        capsys.readouterr()
        assert gpt.main([*run, "--checkpoint", copy, "--out", str(tmp_path / "b.pt"), "--epochs", "0"]) == 1
        assert "b.pt already exists; use --force" in capsys.readouterr().err


def test_the_fused_optimizer_takes_torchs_reference_step_on_a_view():
    base = torch.randn(8, 24)
    weights = [base.chunk(3, dim=-1)[1].T, base.chunk(3, dim=-1)[1].T.contiguous()]  # a view, and a copy
    for p in weights:
        model = torch.nn.Linear(8, 8, bias=False)
        model.weight = torch.nn.Parameter(p.clone() if p.is_contiguous() else p)
        optimizer = gpt.make_optimizer(model, "cpu", 1e-2, 0.0)
        model.weight.grad = torch.ones(8, 8)
        optimizer.step()
        reference = torch.optim.AdamW([torch.nn.Parameter(p.clone())], lr=1e-2, weight_decay=0.0, foreach=False)
        reference.param_groups[0]["params"][0].grad = torch.ones(8, 8)
        reference.step()
        assert (model.weight - reference.param_groups[0]["params"][0]).abs().max() <= 1e-7
