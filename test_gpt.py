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

gpt.VERDICT_URL = gpt.INSTRUCTION_URL = "https://127.0.0.1:9/none"  # no test goes online: a file not here fails
gpt.SMS_URLS = gpt.GPT2_BASE_URLS = ("https://127.0.0.1:9",)
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
    model = tiny_model(seed=3)
    idx = torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(0))
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
    """One step on a transposed third of a matrix, as GPT-2's loaded W_query is: torch's reference step, and the
    other thirds (W_key, W_value) untouched."""
    base = torch.randn(8, 24)
    before, reference = base.clone(), torch.nn.Parameter(base[:, 8:16].T.contiguous())
    model = torch.nn.Linear(8, 8, bias=False)
    model.weight = torch.nn.Parameter(base.chunk(3, dim=-1)[1].T)
    for p, optimizer in ((model.weight, gpt.make_optimizer(model, "cpu", 1e-2, 0.0)),
                         (reference, torch.optim.AdamW([reference], lr=1e-2, weight_decay=0.0, foreach=False))):
        p.grad = torch.ones(8, 8)
        optimizer.step()
    assert (model.weight - reference).abs().max() <= 1e-7 and (reference - before[:, 8:16].T).abs().min() > 0
    assert torch.equal(base[:, :8], before[:, :8]) and torch.equal(base[:, 16:], before[:, 16:])


# ---- Part 2: training runs, resume, scale ------------------------------------------------------

def test_train_logs_saves_and_samples_leaving_no_stray_file(trained, tmp_path, capsys, monkeypatch):
    ckpt, folder = gpt.load_checkpoint(trained), Path(trained).parent
    assert ckpt["progress"]["epoch"] == 1 and sorted(os.listdir(folder)) == ["tiny-losses.csv", "tiny-losses.png",
                                                                             "tiny.pt"]  # no lock, no temp file
    with open(folder / "tiny-losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "21", "41", "61"] and rows[1]["tokens_seen"] == str(21 * 2 * 32)
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"]) - 0.2
    assert gpt.main(["sample", "--checkpoint", trained, "--prompt", "Every effort", "--max-new-tokens", "5"]) == 0
    model, tok = gpt.build_model(ckpt["config"], ckpt["model"], trained).eval(), gpt.get_tokenizer()
    expected = gpt.generate(model, gpt.text_to_token_ids("Every effort", tok), 5, 32, eos_id=tok.eot_token)
    assert capsys.readouterr().out == gpt.token_ids_to_text(expected, tok) + "\n"
    light, text = str(tmp_path / "light.pt"), tmp_path / "short.txt"
    text.write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")  # 10 steps, not 72
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", light, "--weights-only", "--data", str(text)]) == 0
    assert "`pip install matplotlib` to also get their plot" in capsys.readouterr().out
    assert set(gpt.load_checkpoint(light)) == {"kind", "config", "run", "model"}
    assert os.path.getsize(light) < 0.4 * os.path.getsize(trained)
    assert gpt.main(["train", "--out", light, "--resume"]) == 1
    assert "not a run of `train` to resume (--weights-only saves none) (no 'progress')" in capsys.readouterr().err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_saves_and_the_printed_command_resumes_to_the_uninterrupted_run(
        trained, tmp_path, monkeypatch, capsys, signum):
    path, calls, real = str(tmp_path / "i.pt"), [0], gpt.calc_loss_batch

    def stop_in_step_5(*args):  # calls: step 1, its evaluation (5 + 5 batches), steps 2-5
        calls[0] += 1
        if calls[0] == 15:
            os.kill(os.getpid(), signum)  # a real Ctrl-C or kill, mid-epoch
        return real(*args)
    monkeypatch.setattr(gpt, "calc_loss_batch", stop_in_step_5)
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", path]) == 128 + signum
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    command = f"python gpt.py train {' '.join(TINY_TRAIN)} --epochs 1 --out {path} --resume"
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {what} at epoch 1, step 5; {gpt.saved(path)}; "
                                                        f"continue with `{command}`")
    assert gpt.load_checkpoint(path)["progress"]["batch"] == 5 and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    monkeypatch.setattr(gpt, "calc_loss_batch", real)
    assert gpt.main(command.split()[2:]) == 0  # what the message says, as it says it
    a, b = gpt.load_checkpoint(trained), gpt.load_checkpoint(path)
    assert a["progress"] == b["progress"] and a["history"] == b["history"] and weights_differ(a, b) == 0
    assert Path(path[:-3] + "-losses.csv").read_text() == Path(trained[:-3] + "-losses.csv").read_text()
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert gpt.main(command.split()[2:]) == 0  # already done: a note, not a run
    assert capsys.readouterr().out == (f"nothing left to train: {path} has finished 1 epoch(s), 72 steps; give a "
                                       "larger --epochs or --max-steps to train further\n")
    assert snapshot(tmp_path) == before


def test_a_stop_during_the_last_sample_ends_as_a_stop_and_saves_once(tmp_path, monkeypatch, capsys):
    saves, real_save, text = [], gpt.save_checkpoint, tmp_path / "short.txt"
    text.write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")  # 10 steps an epoch
    monkeypatch.setattr(gpt, "save_checkpoint", lambda path, **state: saves.append(state["progress"]) or real_save(
        path, **state))
    monkeypatch.setattr(gpt, "generate_and_print_sample", lambda *a: os.kill(os.getpid(), signal.SIGINT))
    run = ["train", *TINY_TRAIN, "--data", str(text), "--out", str(tmp_path / "s.pt"), "--save-every", "10"]
    assert gpt.main(run + ["--epochs", "1"]) == 130
    assert "error: interrupted at the end of epoch 1, step 10;" in capsys.readouterr().err  # the run is whole
    assert saves == [{"epoch": 1, "batch": 0, "step": 10, "tokens_seen": 640}]  # one save at the epoch's end, not two


def test_a_second_run_on_the_same_checkpoint_is_refused_while_the_first_runs(tmp_path, capsys):
    path, first_run = str(tmp_path / "l.pt"), open(tmp_path / "l.pt.lock", "a")
    gpt.fcntl.flock(first_run, gpt.fcntl.LOCK_EX)
    assert gpt.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", path]) == 1
    assert capsys.readouterr().err == f"error: {path} is being written by another run; wait for it to end, or use " \
                                      "another --out\n"
    assert os.listdir(tmp_path) == ["l.pt.lock"]


def test_resume_continues_the_schedule_and_refuses_changed_data(tmp_path, monkeypatch, capsys):
    (tmp_path / "story.txt").write_text(VERDICT.read_text(encoding="utf-8")[:6000], encoding="utf-8")
    schedule = ["--warmup-steps", "100", "--cosine", "--grad-clip", "0.5", "--batch-size", "3", "--data", "story.txt"]
    monkeypatch.chdir(tmp_path)
    assert gpt.main(["train", *TINY_TRAIN, *schedule, "--epochs", "2", "--out", "a.pt"]) == 0
    assert gpt.main(["train", *TINY_TRAIN, *schedule, "--epochs", "1", "--out", "b.pt"]) == 0
    monkeypatch.chdir(HERE)  # the run's options, its data's path included, come from the checkpoint
    assert gpt.main(["train", "--epochs", "2", "--lr", "1", "--out", str(tmp_path / "b.pt"), "--resume"]) == 0
    a, b = gpt.load_checkpoint(str(tmp_path / "a.pt")), gpt.load_checkpoint(str(tmp_path / "b.pt"))
    assert a["progress"] == b["progress"] and weights_differ(a, b) == 0
    with open(tmp_path / "story.txt", "a") as f:
        f.write("One more line.")
    capsys.readouterr()
    assert gpt.main(["train", "--epochs", "3", "--out", str(tmp_path / "b.pt"), "--resume"]) == 1
    assert capsys.readouterr().err == (f"error: the training data changed since {tmp_path / 'b.pt'} was saved (files "
                                       "added, removed or modified); resume with the data it was trained on\n")


def test_token_cache_holds_the_books_tokens_for_files_folders_and_pipes(tmp_path, monkeypatch, capsys):
    tok, text, cache = gpt.get_tokenizer(), VERDICT.read_text(encoding="utf-8"), str(tmp_path / "cache")
    split = int(0.9 * len(text))
    train, val = gpt.token_cache(gpt.corpus([str(VERDICT)]), cache, piece=300)  # ~70 pieces, cut mid-text
    assert train.dtype == np.uint16 and train.tolist() == tok.encode(text[:split])
    assert val.tolist() == tok.encode(text[split:])
    folder = tmp_path / "books"  # a folder: every *.txt below it, sorted by path, joined by <|endoftext|>
    (folder / "b").mkdir(parents=True)
    docs = {"a.txt": "First book, one line.\n" * 10, "b/c.txt": "Second one <|endoftext|> here.\n" * 10}
    for name, doc in docs.items():
        (folder / name).write_text(doc)
    (folder / "notes.md").write_text("not a document")
    train, val = gpt.token_cache(gpt.corpus([str(folder)]), cache, piece=50)
    one, two = (tok.encode(doc, allowed_special={"<|endoftext|>"}) for doc in docs.values())
    cut = [len(tok.encode(doc[:int(0.9 * len(doc))], allowed_special={"<|endoftext|>"})) for doc in docs.values()]
    assert train.tolist() == one[:cut[0]] + [50256] + two[:cut[1]]
    assert val.tolist() == one[cut[0]:] + [50256] + two[cut[1]:]
    monkeypatch.setattr(gpt, "get_tokenizer", None)  # the same corpus again: read from the cache, not tokenized
    assert gpt.token_cache(gpt.corpus([str(folder)]), cache)[1].tolist() == val.tolist()
    monkeypatch.undo()
    for resume in ([], ["--resume"]):  # `--data <(cat the-verdict.txt)`: a pipe, read once
        read, write = os.pipe()
        threading.Thread(target=lambda fd=write: os.write(fd, text.encode()) and os.close(fd)).start()
        run = ["train", *TINY_TRAIN, "--data", f"/dev/fd/{read}", "--out", str(tmp_path / "p.pt"), "--max-steps"]
        assert gpt.main(run + [str(2 + len(resume)), "--cache-dir", cache, *resume]) == 0
        os.close(read)
    assert "note: --resume cannot check that /dev/fd/" in capsys.readouterr().err
    train, _ = gpt.token_cache(gpt.load_checkpoint(str(tmp_path / "p.pt"))["run"]["documents"], cache)
    assert train.tolist() == tok.encode(text[:split])


def test_loaders_draw_as_the_books_and_give_each_process_an_equal_share(monkeypatch):
    windows = list(range(37))
    for shuffle, drop_last in ((True, True), (False, False)):
        torch.manual_seed(5)
        book = [b.tolist() for b in torch.utils.data.DataLoader(windows, 4, shuffle=shuffle, drop_last=drop_last)]
        after = torch.rand(3)
        torch.manual_seed(5)
        ours = gpt.make_loader(windows, 4, shuffle, drop_last)
        assert [b.tolist() for b in ours] == book and len(ours) == len(book) and torch.equal(torch.rand(3), after)
    shares = []
    for rank in range(3):  # 3 processes, batch 2: each batch of 6 windows dealt out, the last one repeated
        monkeypatch.setattr(gpt, "processes", lambda: (rank, 3))
        shares.append([b.tolist() for b in gpt.make_loader(windows, 2, grad_accum=2)])
    assert sorted(sum(shares[0][:1] + shares[1][:1] + shares[2][:1], [])) == list(range(6))
    assert [len(share) for share in shares] == [7, 7, 7] and [s[-1] for s in shares] == [[36], [0], [1]]


def tiny_run(out, *flags):
    return ["train", *TINY_TRAIN, "--drop-rate", "0", "--eval-iter", "2", "--out", str(out), "--force", *flags]


def batch_of_4(folder, steps):
    """The checkpoint of one process with batch 4 after `steps` steps."""
    assert gpt.main(tiny_run(folder / f"{steps}.pt", "--batch-size", "4", "--max-steps", str(steps))) == 0
    return gpt.load_checkpoint(str(folder / f"{steps}.pt"))


def test_gradient_accumulation_gives_the_weights_of_a_bigger_batch(tmp_path):
    assert gpt.main(tiny_run(tmp_path / "a.pt", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "6")) == 0
    accumulated, expected = gpt.load_checkpoint(str(tmp_path / "a.pt")), batch_of_4(tmp_path, 6)
    assert accumulated["progress"] == expected["progress"] and weights_differ(accumulated, expected) <= 1e-5


def torchrun(*args):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(HERE / "gpt.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)


def test_two_processes_stop_at_sigterm_resume_and_match_one_process(tmp_path):
    """Two gloo processes x batch 2 = one x batch 4, stopped by SIGTERM (as a scheduler sends it to the whole
    job) in epoch 1, resumed, and compared with one process."""
    out = tmp_path / "ddp.pt"
    job = torchrun(*tiny_run(out, "--batch-size", "2"))
    for line in job.stdout:  # only rank 0 prints
        if line.startswith("Ep 1 (Step 000001)"):
            os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate()[1]
    stopped = gpt.load_checkpoint(str(out))
    step = stopped["progress"]["step"]
    assert 1 <= step < 6 and f"error: terminated at epoch 1, step {step}; saved {out}" in err, err
    assert err.count("error: ") == 1  # once, not once a process
    assert weights_differ(stopped, batch_of_4(tmp_path, step)) <= 1e-5
    job = torchrun(*tiny_run(out, "--resume", "--max-steps", "6"))
    assert job.wait() == 0, job.communicate()[1]
    resumed, expected = gpt.load_checkpoint(str(out)), batch_of_4(tmp_path, 6)
    assert resumed["progress"] == expected["progress"] and weights_differ(resumed, expected) <= 1e-5


def test_one_process_per_machine_downloads_the_others_wait(monkeypatch):
    calls = []
    monkeypatch.setattr(gpt.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(gpt.dist, "barrier", lambda: calls.append("wait"))
    for local_rank in ("0", "1"):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        gpt.once_per_machine(lambda: calls.append("download"))
    assert calls == ["download", "wait", "wait"]


# ---- Part 2: files, downloads, and one line for every mistake ---------------------------------

def test_downloads_resume_fall_back_and_follow_only_https(serve, tmp_path):
    base, root, seen = serve
    payload = os.urandom(300_000)
    (root / "f.bin").write_bytes(payload)
    dest = tmp_path / "f.bin"
    Path(f"{dest}.{socket.gethostname()}.part").write_bytes(payload[:100_000])  # an interrupted earlier download
    gpt.download([f"{base}/missing", f"{base}/to-here/f.bin"], str(dest))
    assert dest.read_bytes() == payload and seen == [("/missing", "bytes=100000-"), ("/to-here/f.bin", "bytes=100000-"),
                                                     ("/f.bin", "bytes=100000-")]
    gpt.download([f"{base}/f.bin"], str(dest))
    assert len(seen) == 3  # present: no request at all
    for url, problem in ((f"{base}/to-http/f.bin", "refusing to download over plain HTTP: http://127.0.0.1:9/f.bin"),
                         (f"http://127.0.0.1:{base.rsplit(':', 1)[1]}/f.bin", "refusing to download over plain HTTP"),
                         (f"{base}/lying/f.bin", "IncompleteRead(300000 bytes read, 10 more expected)"),
                         (f"{base}/cut/f.bin", "got 150000 bytes, expected 300000")):
        with pytest.raises(gpt.GPTError, match=re.escape(problem)):
            gpt.download([url], str(tmp_path / "g.bin"), size=300_000)
        assert not (tmp_path / "g.bin").exists()


@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64"),
                                     OSError(28, "No space left on device")])
def test_a_failed_save_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, capsys, failure):
    path = tmp_path / "g.pt"
    assert gpt.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", str(path)]) == 0
    before = snapshot(tmp_path)

    def fails_midway(obj, f):
        f.write(b"half a checkpoint")
        raise failure
    monkeypatch.setattr(gpt.torch, "save", fails_midway)
    assert gpt.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", str(path), "--force"]) == 1
    reason = "No space left on device" if isinstance(failure, OSError) else str(failure)
    assert capsys.readouterr().err == f"error: cannot save {path} ({reason}); the previous {path} is kept\n"
    assert snapshot(tmp_path) == before  # and no temporary file left
    other = tmp_path / "g.pt.7kq2.tmp"  # a save in progress on another machine sharing the folder
    other.write_bytes(b"half")
    monkeypatch.undo()
    with gpt.atomic_open(str(path)) as a, gpt.atomic_open(str(path)) as b:  # two saves at once
        a.write(b"a")
        b.write(b"b")
    assert a.name != b.name and path.read_bytes() == b"a" and other.read_bytes() == b"half"


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def gpt2_dir(folder, **hparams):
    """A models folder with the fixture as GPT-2 124M, `hparams` changed."""
    shutil.copytree(TESTDATA / "gpt2-tiny", folder / "124M")
    settings = json.loads((folder / "124M" / "hparams.json").read_text())
    (folder / "124M" / "hparams.json").write_text(json.dumps({k: v for k, v in dict(settings, **hparams).items()
                                                              if v is not None}))
    return str(folder)


def bad_inputs(tmp, trained, base):
    """(argv, exit code, what the one line on stderr must say) for mistakes a user can make."""
    for name, content in (("empty.txt", "   \n"), ("short.txt", "A few words only. " * 20), ("tiny.txt", "Too short."),
                          ("bad.json", '[{"instruction": "Add 1 and 2.", "output": "3"}]'), ("dict.json", "{}"),
                          ("deep.json", "[" * 100_000 + "]" * 100_000), ("few.json", json.dumps(entries(9))),
                          ("long.json", json.dumps([dict(e, instruction="Say it. " * 20) for e in entries(12)]))):
        (tmp / name).write_text(content)
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "notours.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp / "truncated.pt").write_bytes(Path(trained).read_bytes()[:5000])
    ckpt, small = gpt.load_checkpoint(trained), dict(TINY, vocab_size=64, emb_dim=8, n_layers=1)
    for name, state in (("otherconfig", dict(ckpt, config=dict(ckpt["config"], emb_dim=64))),
                        ("nokey", dict(kind="gpt", config={k: v for k, v in TINY.items() if k != "n_heads"}, model={})),
                        ("strkey", dict(kind="gpt", config=dict(TINY, n_layers="2"), model={})),
                        ("existing", dict(kind="gpt", config=TINY, model={})),
                        ("nomodel", dict(kind="gpt", config=TINY)),
                        ("badlora", dict(kind="gpt", config=TINY, model={}, lora={"rank": 2, "alpha": 16})),
                        ("sft", dict(kind="gpt", config=TINY, model={}, progress=ckpt["progress"])),
                        ("norng", dict({k: v for k, v in ckpt.items() if k != "rng"}, model={})),
                        ("badopt", dict(ckpt, config=small, model=gpt.GPTModel(small).state_dict())),
                        ("badspam", dict(kind="spam", config=TINY, model={}, trainable="first-block")),
                        ("adapter", dict(kind="gpt", config=TINY, model={}, lora={"rank": 2, "alpha": 16, "base": {
                            "model": None, "checkpoint": trained, "fingerprint": "another model"}})),
                        ("orphan", dict(kind="gpt", config=TINY, model={}, lora={"rank": 2, "alpha": 16, "base": {
                            "model": None, "checkpoint": str(tmp / "gone.pt"), "fingerprint": "x"}}))):
        gpt.save_checkpoint(str(tmp / f"{name}.pt"), **state)
    torch.save({"kind": "gpt", "config": TINY, "model": Exploit(str(tmp / "pwned"))}, tmp / "evil.pt")
    for name, method, flags, corrupt in (("zip-corrupt", 8, 0, True), ("zip-encrypted", 8, 1, False),
                                         ("zip-method", 97, 0, False)):  # 97: WavPack, which zipfile cannot read
        (tmp / name).mkdir()
        with zipfile.ZipFile(tmp / name / "sms_spam_collection.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("SMSSpamCollection", "ham\tSee you at 5\n" * 50)
        data = bytearray((tmp / name / "sms_spam_collection.zip").read_bytes())
        for header, offset in ((0, 6), (data.index(b"PK\x01\x02"), 8)):  # the local header's and the directory's
            data[header + offset:header + offset + 4] = flags.to_bytes(2, "little") + method.to_bytes(2, "little")
        data[50:60] = b"\xff" * 10 if corrupt else data[50:60]
        (tmp / name / "sms_spam_collection.zip").write_bytes(bytes(data))
    (tmp / "dir-as-file" / "SMSSpamCollection").mkdir(parents=True)
    (tmp / "out-dir.pt").mkdir()
    (tmp / "answered-responses.json").write_text("[]")  # the responses of an instruct run whose checkpoint is gone
    (tmp / "sms").mkdir()
    (tmp / "sms" / "SMSSpamCollection").write_text("ham\tSee you at 5\nspam WIN a prize now\n")
    write_sms(tmp / "small-sms" / "SMSSpamCollection", spam=SPAM[:2], ham=HAM[:2])
    write_sms(tmp / "full" / "SMSSpamCollection")
    truncated = gpt2_dir(tmp / "trunc")
    Path(truncated, "124M", "model.ckpt.data-00000-of-00001").write_bytes(b"x" * 1000)
    sample, train = ["sample", "--checkpoint"], ["train", *TINY_TRAIN, "--out", str(tmp / "new.pt")]
    spam = ["spam", "--checkpoint", trained, "--out", str(tmp / "s.pt"), "--data-dir"]
    instruct = ["instruct", "--checkpoint", trained, "--out", str(tmp / "new-sft.pt"), "--data"]
    load = ["load-gpt2", "124M", "--out", str(tmp / "g.pt"), "--models-dir"]
    return [  # malformed files: checkpoints, GPT-2's, zips, JSON; folders where files belong
        (sample + [str(tmp / "nokey.pt")], 1, "nokey.pt: not a model that fits its config (no 'n_heads')"),
        (sample + [str(tmp / "strkey.pt")], 1, "strkey.pt: not a model that fits its config"),
        (sample + [str(tmp / "nomodel.pt")], 1, "nomodel.pt: not a 'gpt' checkpoint of gpt.py (no 'model')"),
        (sample + [str(tmp / "badlora.pt")], 1, "badlora.pt: not a LoRA checkpoint of gpt.py (no 'base')"),
        (sample + [str(tmp / "evil.pt")], 1, "evil.pt: not a 'gpt' checkpoint of gpt.py (Weights only load failed"),
        (sample + [str(tmp / "notours.pt")], 1, "notours.pt: not a 'gpt' checkpoint of gpt.py"),
        (sample + [str(tmp / "truncated.pt")], 1, "truncated.pt: not a 'gpt' checkpoint of gpt.py"),
        (sample + [str(tmp / "otherconfig.pt")], 1, "otherconfig.pt: not a model that fits its config (Error(s)"),
        (sample + [str(tmp / "adapter.pt")], 1, "is not the model this adapter was trained on"),
        (sample + [str(tmp / "orphan.pt")], 1, "gone.pt, is gone; put the model it was trained on back"),
        (sample + [str(tmp / "nothing.pt")], 1, "nothing.pt: no such checkpoint; make one with `python gpt.py train"),
        (sample + [str(tmp / "x-sft.pt")], 1, "no such checkpoint; `python gpt.py instruct` makes one"),
        (["train", "--out", str(tmp / "norng.pt"), "--resume"], 1, "norng.pt: not a run of `train` to resume"),
        (["train", "--out", str(tmp / "sft.pt"), "--resume"], 1, "sft.pt: not a run of `train` to resume"),
        (["train", "--out", str(tmp / "badopt.pt"), "--resume"], 1, "not a run whose optimizer state fits its model"),
        (["spam", "--out", str(tmp / "badspam.pt"), "--classify", "hi"], 1, "badspam.pt: not a model that fits"),
        (["spam", "--out", trained, "--classify", "hello"], 1, "not a 'spam' checkpoint of gpt.py (its kind is 'gpt')"),
        (load + [gpt2_dir(tmp / "hp1", n_layer=None)], 1, "not OpenAI's GPT-2 124M, or its files do not fit each "
                                                          "other (no 'n_layer')"),
        (load + [gpt2_dir(tmp / "hp2", n_embd="16")], 1, "hp2/124M: not OpenAI's GPT-2 124M"),
        (load + [gpt2_dir(tmp / "hp3", n_head=0)], 1, "hp3/124M: not OpenAI's GPT-2 124M"),
        (load + [gpt2_dir(tmp / "hp4", n_layer=13)], 1, "hp4/124M: not OpenAI's GPT-2 124M, or its files do not fit"),
        (load + [gpt2_dir(tmp / "hp5", n_embd=32)], 1, "size mismatch for tok_emb.weight"),
        (load + [truncated], 1, "not the float32 tensors that"),
        (load + [str(tmp / "m7"), "--base-url", f"{base}/to-http"], 1,
         "refusing to download over plain HTTP: http://127.0.0.1:9/124M/hparams.json"),
        (load[:-1] + ["--models-dir", str(tmp / "m8"), "--base-url", f"{base}/cut"], 1,
         "could not download hparams.json"),
        (["load-gpt2", "355M", "--models-dir", str(tmp), "--base-url", f"{base}/none", "--out", str(tmp / "g.pt")], 1,
         f"put OpenAI's {', '.join(gpt.GPT2_FILES)} for GPT-2 355M into {tmp / '355M'}/ yourself"),
        (spam + [str(tmp / "zip-corrupt")], 1, "not the SMS Spam Collection zip; delete it and retry"),
        (spam + [str(tmp / "zip-encrypted")], 1, "SMSSpamCollection' is encrypted"),
        (spam + [str(tmp / "zip-method")], 1, "That compression method is not supported"),
        (spam + [str(tmp / "empty.txt")], 1, "empty.txt: File exists"),
        (spam + [str(tmp / "dir-as-file")], 1, "SMSSpamCollection: Is a directory"),
        (spam + [str(tmp / "sms")], 1, "SMSSpamCollection, line 2: expected 'ham' or 'spam'"),
        (instruct + [str(tmp / "deep.json")], 1, "deep.json: not JSON (maximum recursion depth"),
        (instruct + [str(tmp)], 1, f"{tmp}: Is a directory"),
        (instruct + [str(tmp / "bad.json")], 1, "bad.json: not a JSON list of objects with the strings instruction, "
                                                "input, output (no 'input')"),
        (instruct + [str(tmp / "dict.json")], 1, "dict.json: not a JSON list of objects"),
        (train + ["--data", str(tmp / "missing.txt")], 1, "missing.txt: No such file or directory"),
        (train + ["--data", str(tmp / "sms")], 1, "no *.txt file in this folder"),
        (train + ["--data", str(tmp / "latin1.txt")], 1, "latin1.txt: not UTF-8 text; convert it first"),
        # outputs that cannot be written, found before any work
        (train[:-1] + [str(tmp / "out-dir.pt")], 1, "out-dir.pt is a folder; name the file to write"),
        (train[:-1] + [str(tmp / "empty.txt" / "x.pt")], 1, "cannot write"),
        (["train", *TINY_TRAIN, "--out", str(tmp / "existing.pt")], 1, "--force to replace it, --resume to continue"),
        (["train", *TINY_TRAIN, "--out", str(tmp / "nothing.pt"), "--resume"], 1, "no such checkpoint"),
        (["load-gpt2", "124M", "--out", str(tmp / "existing.pt")], 1, "--force"),
        (["spam", "--checkpoint", trained, "--out", str(tmp / "existing.pt")], 1, "--force"),
        (["instruct", "--checkpoint", trained, "--out", str(tmp / "existing.pt")], 1, "--force"),
        (["instruct", "--checkpoint", trained, "--out", str(tmp / "answered.pt")], 1, "answered-responses.json alr"),
        # degenerate sizes, numbers, memory
        (train + ["--data", str(tmp / "tiny.txt"), "--batch-size", "1", "--stride", "1"], 1, "needs at least 33"),
        (train + ["--data", str(tmp / "empty.txt")], 1, "has 3 tokens, needs at least"),  # whitespace only
        (train + ["--data", str(tmp / "short.txt")], 1, "tokens, needs at least"),
        (spam + [str(tmp / "small-sms")], 1, "too few messages: 2 train, 0 validation, 2 test"),
        (spam + [str(tmp / "full"), "--grad-accum", "100"], 1, "too few messages: 16 train, 2 validation, 6 test"),
        (instruct + [str(tmp / "few.json"), "--batch-size", "2"], 1, "9 entries are too few"),
        (instruct + [str(tmp / "long.json"), "--batch-size", "2", "--mask-instruction"], 1, "a prompt has"),
        (train + ["--emb-dim", str(2 ** 33)], 1, "out of memory on cpu; lower --batch-size"),
        (train + ["--lr", "inf"], 2, "--lr: inf is outside (0, inf)"),
        (train + ["--grad-clip", "inf"], 2, "--grad-clip"),
        (sample + [trained, "--seed", "99999999999999999999999"], 2, "--seed"),
        (sample + [trained, "--model", "124M"], 2, "not allowed with"),
        (sample + [trained, "--temperature", "nan"], 2, "--temperature"),
        (sample + [trained, "--temperature", "-0.5"], 2, "--temperature"),
        (sample + [trained, "--top-k", "0"], 2, "--top-k"),
        (sample + [trained, "--top-p", "1.5"], 2, "--top-p"),
        (sample + [trained, "--max-new-tokens", "-1"], 2, "--max-new-tokens"),
        (sample + [trained, "--device", "cuda:7"], 1, "not available"),
        (sample + [trained, "--device", "cuda:abc"], 1, "unknown device"),
        (sample + [trained, "--prompt", ""], 1, "prompt is empty"),
        (["load-gpt2", "7B"], 2, "invalid choice"),
        (["frobnicate"], 2, "invalid choice"),
        (["spam", "--checkpoint", trained, "--classify", "hi"], 1, "--classify takes"),
        (["spam", "--checkpoint", trained, "--lora", "4", "--trainable", "all"], 2, "not allowed with"),
        (["spam", "--checkpoint", trained, "--lora", "0"], 2, "--lora"),
        (["instruct", "--checkpoint", trained, "--judge", "llama3", "--ollama-url", "http://127.0.0.1:9"], 1,
         "no Ollama server at http://127.0.0.1:9: start one with `ollama serve`, then `ollama pull llama3`"),
        (["instruct", "--responses", str(tmp / "bad.json")], 1, "--responses is for judging"),
    ]


def test_every_user_mistake_is_one_line_and_changes_nothing(tmp_path, trained, capsys, serve):
    wrong = []
    for argv, code, mention in bad_inputs(tmp_path, trained, serve[0]):
        before = {p: data for p, data in snapshot(tmp_path).items() if not p.name.endswith(".part")}
        try:
            got = gpt.main(argv)
        except SystemExit as e:  # argparse exits by itself
            got = e.code
        err = capsys.readouterr().err
        after = {p: data for p, data in snapshot(tmp_path).items() if not p.name.endswith(".part")}
        one_line = err.startswith("error: ") and err.count("\n") == 1
        if not (got == code and one_line and mention in err) or after != before:
            wrong.append((argv, got, err))
    assert not wrong


# ---- Chapters 6 and 7, appendix E, through the command line -----------------------------------

def test_spam_splits_as_the_book_reads_the_last_real_token_and_trains_what_it_names(tmp_path):
    rows = write_sms(tmp_path / "SMSSpamCollection")
    ham = [(0, t) for label, t in rows if label == "ham"]
    balanced = [ham[i] for i in np.random.RandomState(123).choice(20, 12, replace=False)]
    balanced += [(1, t) for label, t in rows if label == "spam"]
    balanced = [balanced[i] for i in np.random.RandomState(123).permutation(24)]  # pandas' draws, as the book
    splits = gpt.prepare_sms_spam(str(tmp_path))
    assert [len(p) for p in splits.values()] == [16, 2, 6] and sum(splits.values(), []) == balanced
    with open(tmp_path / "test.csv", newline="") as f:
        assert list(csv.reader(f)) == [["Label", "Text"]] + [[str(y), t] for y, t in balanced[18:]]
    model = gpt.SpamClassifier(tiny_model(), "last-block")
    batch, targets = gpt.collate_spam([([5, 6, 7, 8], 0), ([9, 10], 1)])
    assert batch.tolist()[1] == [9, 10, 50256, 50256] and targets.tolist() == [[0], [1]]
    with torch.no_grad():
        alone = torch.cat([model.gpt(torch.tensor([r]))[:, -1:] for r in ([5, 6, 7, 8], [9, 10])])
        assert torch.allclose(model(batch), alone, atol=1e-5)
    gpt.calc_loss_batch(batch, targets, model, "cpu").backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {
        n for n, _ in model.named_parameters() if n.startswith(("gpt.final_norm", "gpt.out_head", "gpt.trf_blocks.1."))}


@pytest.mark.parametrize("lora", [[], ["--lora", "4", "--lr", "1e-2"]])
def test_spam_overfits_16_messages_then_classifies(tmp_path, capsys, lora):
    write_sms(tmp_path / "SMSSpamCollection")
    lm, out = str(tmp_path / "lm.pt"), str(tmp_path / "spam.pt")
    gpt.save_checkpoint(lm, kind="gpt", config=TINY, model=tiny_model().state_dict())
    assert gpt.main(["spam", "--checkpoint", lm, "--data-dir", str(tmp_path), "--out", out, "--lr", "1e-3",
                     "--epochs", "8", *lora]) == 0
    log = capsys.readouterr().out
    assert "train accuracy 100.00%" in log and ("(LoRA rank 4, alpha 16)" in log) == bool(lora)
    with open(tmp_path / "spam-losses.csv", newline="") as f:  # 2 steps an epoch: one evaluation, at step 1
        assert [r["step"] for r in csv.DictReader(f)] == ["1"]
    ckpt = gpt.load_checkpoint(out, kind="spam")
    if lora:  # the adapter alone, A and B of each linear and the new head, with its base's fingerprint
        assert len(ckpt["model"]) == 2 * (2 * 6 + 1) + 2 and os.path.getsize(out) < os.path.getsize(lm) / 50
        assert ckpt["lora"]["base"] == {"model": None, "checkpoint": lm,
                                        "fingerprint": gpt.fingerprint(gpt.load_checkpoint(lm)["model"])}
    assert gpt.main(["spam", "--out", out, "--classify", SPAM[3], "--classify", HAM[5]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("spam (spam probability") and lines[1].startswith("not spam (spam probability")
    gpt.save_checkpoint(lm, kind="gpt", config=TINY, model=tiny_model(seed=1).state_dict())  # another base
    assert gpt.main(["spam", "--out", out, "--classify", SPAM[3]]) == (1 if lora else 0)
    assert ("is not the model this adapter was trained on" in capsys.readouterr().err) == bool(lora)


def test_instruction_data_collates_masks_and_splits_as_the_book():
    inputs, targets = gpt.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    tok, entry = gpt.get_tokenizer(), entries(2)[1]
    prompt, response = tok.encode(gpt.format_input(entry)), tok.encode("\n\n### Response:\n" + entry["output"])
    assert gpt.format_input(entry).endswith("### Instruction:\nName the number 1.\n\n### Input:\n1 + 0")
    masked = gpt.InstructionDataset([entry], tok, mask_instruction=True)[0]
    assert masked == (len(prompt), prompt + response)
    assert gpt.custom_collate_fn([masked])[1][0].tolist() == [-100] * (len(prompt) - 1) + response + [50256]
    train, test, val = gpt.split_instruction_data(entries(1100))
    assert (len(train), len(test), len(val)) == (935, 110, 55) and test[0] == entries(1100)[935]


@pytest.fixture
def ollama():
    """A fake Ollama server with llama3 pulled: records each /api/chat request, streams the score "85" in two."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"models": [{"name": "llama3:latest"}]}')

        def do_POST(self):
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"message": {"content": "8"}}\n{"message": {"content": "5"}}\n')

        def log_message(self, *a):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_instruct_trains_writes_responses_beside_its_checkpoint_and_judges(tmp_path, capsys, ollama):
    url, seen = ollama
    data, lm, out = tmp_path / "d.json", str(tmp_path / "tiny.pt"), str(tmp_path / "sft.pt")
    data.write_text(json.dumps(entries(20)))  # 17 training, 2 test, 1 validation entries
    cfg = dict(TINY, context_length=320)  # room for a prompt and 256 new tokens: the cache never slides
    gpt.save_checkpoint(lm, kind="gpt", config=cfg, model=tiny_model(**cfg).state_dict())
    argv = ["instruct", "--checkpoint", lm, "--data", str(data), "--out", out, "--batch-size", "4", "--epochs", "1",
            "--lr", "1e-3", "--ollama-url", url]
    assert gpt.main(argv + ["--judge", "mistral"]) == 1  # not pulled: said before any training
    assert capsys.readouterr() == ("", f"error: Ollama at {url} has no mistral (llama3:latest pulled): run "
                                       "`ollama pull mistral` first\n")
    assert gpt.main(argv + ["--judge", "llama3"]) == 0
    assert "llama3's average score: 85.00 (of 2/2 scored responses)" in capsys.readouterr().out
    responses = json.loads((tmp_path / "sft-responses.json").read_text())
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == entries(20)[17:19]
    prompt = (f"Given the input `{gpt.format_input(entries(20)[18])}` and correct output `The number is 18.`, score "
              f"the model response `{responses[1]['model_response']}` on a scale from 0 to 100, where 100 is the best "
              "score. Respond with the integer number only.")
    assert seen[1] == {"model": "llama3", "messages": [{"role": "user", "content": prompt}],
                       "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    assert gpt.main(["sample", "--checkpoint", out, "--instruction", responses[1]["instruction"], "--input",
                     responses[1]["input"], "--max-new-tokens", "256"]) == 0
    assert capsys.readouterr().out == responses[1]["model_response"] + "\n"
    assert gpt.main(["instruct", "--responses", str(tmp_path / "sft-responses.json"), "--judge", "llama3",
                     "--ollama-url", url]) == 0  # judging again: no training, no generation
    assert capsys.readouterr().out == "llama3's average score: 85.00 (of 2/2 scored responses)\n" and len(seen) == 4


def test_lora_matches_the_books_code_and_merges_at_the_base_cost():
    book = pytest.importorskip("llms_from_scratch.appendix_e")
    x = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for ours in (True, False):
        torch.manual_seed(123)
        if ours:
            model = gpt.with_lora(gpt.GPTModel(TINY), lambda m: m, 4, 16)[0]
            optimizer = gpt.make_optimizer(model, "cpu", 5e-5, 0.1)
        else:  # the book's appendix E, verbatim
            model = gpt.GPTModel(TINY).requires_grad_(False)
            book.replace_linear_with_lora(model, rank=4, alpha=16)
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
        gpt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu").backward()
        optimizer.step()
        logits.append(model(x[:, :-1]))
    assert (logits[0] - logits[1]).abs().max() <= 1e-6
    with torch.no_grad():
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        merged = gpt.merge_lora(model)
        assert (merged(x[:, :-1]) - logits[1]).abs().max() <= 1e-5 and n_lora == 205_764
    assert {type(m) for m in merged.modules()}.isdisjoint({gpt.LinearWithLoRA, gpt.LoRALayer})


def test_bench_closed_pipes_and_unencodable_text(trained, monkeypatch, capsys):
    monkeypatch.setitem(gpt.GPT2_SIZES, "tiny", {"emb_dim": 16, "n_layers": 1, "n_heads": 2})
    assert gpt.main(["bench", "--model", "tiny", "--new-tokens", "5", "--steps", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train \(context 256, batch 2, AdamW\): [\d,.]+ tokens/s", out)
    assert re.search(r"with KV cache: [\d,.]+ tokens/s .*\n.*without KV cache: [\d,.]+ tokens/s", out)
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` has exited
    monkeypatch.setattr(sys, "stdout", open(write_end, "w"))
    assert gpt.main(["sample", "--checkpoint", trained, "--max-new-tokens", "3"]) == 141
    assert capsys.readouterr().err == ""
    latin1 = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(latin1, encoding="latin-1"))  # PYTHONIOENCODING=latin-1
    assert gpt.main(["sample", "--checkpoint", trained, "--prompt", "café → naïve", "--max-new-tokens", "0"]) == 0
    assert latin1.getvalue() == "café ? naïve\n".encode("latin-1")
