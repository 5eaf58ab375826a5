"""Tests for gpt.py: `python -m pytest -q`. Offline, tiny models, values asserted against references: the book's
own code (testdata/book.pt, made by testdata/make_book_reference.py), HuggingFace's logits, uninterrupted runs."""
import contextlib
import csv
import importlib.util
import http.server
import io
import json
import os
import shutil
import signal
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
BOOK = torch.load(TESTDATA / "book.pt", weights_only=True)
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
    """The largest difference between two checkpoints' tensors (their names must agree: no DDP prefixes)."""
    assert list(a["model"]) == list(b["model"])
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


def entries(n):
    return [{"instruction": f"Name the number {i}.", "input": f"{i} + 0" if i % 2 else "",
             "output": f"The number is {i}."} for i in range(n)]


def write_sms(path, spam=SPAM, ham=HAM):
    """The SMS file testdata/make_book_reference.py splits with the book's code."""
    rows = [("ham", t) for t in ham] + [("spam", t) for t in spam]
    rows = [rows[i] for i in np.random.RandomState(0).permutation(len(rows))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")


@pytest.fixture
def serve(tmp_path):
    """A local HTTPS server over a folder; yields (base_url, folder, paths requested). /to-http/X redirects to
    plain HTTP, /to-here/X to /X; /lying/X announces 10 bytes more than it sends."""
    root, seen = tmp_path / "www", []
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def send_head(self):
            seen.append(self.path)
            head, _, rest = self.path[1:].partition("/")
            if head in ("to-http", "to-here"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:9/{rest}" if head == "to-http" else f"/{rest}")
                self.end_headers()
                return io.BytesIO(b"")
            if head != "lying" or not (root / rest).is_file():
                return super().send_head()
            self.send_response(200)
            self.send_header("Content-Length", str((root / rest).stat().st_size + 10))
            self.end_headers()
            return io.BytesIO((root / rest).read_bytes())

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
    """float32 tensors as TensorFlow lays out a one-shard checkpoint (see gpt.py): the raw bytes, and an index table
    of one data block, its index block and the footer."""
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
    footer = (varint(0) + varint(0) + varint(len(table)) + varint(len(index))).ljust(40, b"\0")
    Path(f"{prefix}.index").write_bytes(table + index + bytes(5) + footer + (0xDB4775248B80FB57).to_bytes(8, "little"))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(data)


@pytest.fixture(scope="session")
def gpt2_models(tmp_path_factory):
    """A models folder with GPT-2 "124M" in OpenAI's files: the TensorFlow-written fixture's weights, its token
    embedding grown to GPT-2's 50,257 rows, so that spam and instruct can tokenize any text."""
    folder = tmp_path_factory.mktemp("models") / "124M"
    folder.mkdir()
    tensors = gpt.read_tf_checkpoint(*(str(TESTDATA / "gpt2-tiny" / f"model.ckpt.{ext}")
                                       for ext in ("index", "data-00000-of-00001")))
    extra = np.random.default_rng(0).normal(0, 0.02, (50257 - 512, 16)).astype(np.float32)
    tensors["model/wte"] = np.concatenate([tensors["model/wte"], extra])
    write_tf_checkpoint(folder / "model.ckpt", tensors)
    hparams = json.loads((TESTDATA / "gpt2-tiny" / "hparams.json").read_text())
    (folder / "hparams.json").write_text(json.dumps(dict(hparams, n_vocab=50257)))
    return folder.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The book's chapter 5 run, shrunk (testdata/book.pt): one epoch of a tiny model on the-verdict.txt; a str,
    the checkpoint's path, with the run's output as .log."""
    path, log = tmp_path_factory.mktemp("trained") / "tiny.pt", io.StringIO()
    with contextlib.redirect_stdout(log):
        assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", str(path)]) == 0
    trained = Checkpoint(path)
    trained.log = log.getvalue()
    return trained


class Checkpoint(str):
    """A checkpoint's path, with what its run printed."""


# ---- Part 1: the book -------------------------------------------------------------------------

def test_the_verdict_the_tokenizer_and_the_dataloader_as_in_the_book():
    text, tok = VERDICT.read_text(encoding="utf-8"), gpt.get_tokenizer()
    assert len(text) == 20479 and len(tok.encode(text)) == 5145
    inputs, targets = next(iter(gpt.create_dataloader_v1(text, batch_size=1, max_length=4, stride=1, shuffle=False)))
    assert inputs.tolist() == [[40, 367, 2885, 1464]] and targets.tolist() == [[367, 2885, 1464, 1807]]
    ids = gpt.text_to_token_ids("Hello, world. <|endoftext|>", tok)
    assert ids.tolist() == [[15496, 11, 995, 13, 220, 50256]]
    assert gpt.token_ids_to_text(ids, tok) == "Hello, world. <|endoftext|>"


@pytest.mark.parametrize("fused", [True, False])
def test_attention_is_the_masked_softmax_and_caches_give_the_full_forward(monkeypatch, fused):
    monkeypatch.setattr(gpt.MultiHeadAttention, "fused", fused)
    torch.manual_seed(1)
    att = gpt.MultiHeadAttention(d_in=12, d_out=12, context_length=8, dropout=0.0, num_heads=3).eval()
    x, (b, T, h, d) = torch.randn(2, 7, 12), (2, 7, 3, 4)
    q, k, v = (W(x).view(b, T, h, d).transpose(1, 2) for W in (att.W_query, att.W_key, att.W_value))
    scores = (q @ k.transpose(2, 3) / d ** 0.5).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    assert (att(x) - att.out_proj((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, T, 12))).abs().max() < 1e-5
    # Chunked prefill: 5 tokens cached, then 3 at once, then 1 (is_causal alone would align the mask top-left)
    model, idx = tiny_model(seed=2), torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full, caches = model(idx), [gpt.KVCache(32) for _ in model.trf_blocks]
        for start, end in ((0, 5), (5, 8), (8, 9)):
            assert (model(idx[:, start:end], caches)[:, -1] - full[:, end - 1]).abs().max() <= 1e-5
    for prompt_len, new in ((5, 30), (20, 40)):  # the second runs past the context
        idx = torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(0))
        assert torch.equal(gpt.generate(model, idx, new, 32), gpt.generate(model, idx, new, 32, use_cache=False))


def test_the_books_model_its_state_dict_sampling_and_the_schedule():
    x, ln = torch.randn(3, 5, 16), gpt.LayerNorm(16)
    torch.nn.init.uniform_(ln.scale)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    assert torch.allclose(ln(x), ln.scale * (x - mean) / torch.sqrt(var + 1e-5) + ln.shift, atol=1e-5)
    assert torch.allclose(gpt.GELU()(x), 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3))))
    torch.manual_seed(123)
    model = gpt.GPTModel(gpt.GPT_CONFIG_124M).eval()
    assert sum(p.numel() for p in model.parameters()) == 163_009_536
    out = gpt.generate(model, gpt.text_to_token_ids("Hello, I am", gpt.get_tokenizer()), 10, 1024)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267, 49706, 43231, 47062, 34657]]
    book = BOOK["gpt"]  # the book's own GPTModel, saved with its attention masks, which ours builds when needed
    ours = gpt.GPTModel(book["cfg"]).eval()
    ours.load_state_dict(book["state_dict"], strict=True)
    assert (ours(book["input_ids"]) - book["logits"]).abs().max() <= 1e-5
    model, idx = tiny_model(), torch.tensor([[1, 2, 3]])
    greedy = gpt.generate(model, idx, 12, 32)
    assert torch.equal(greedy, gpt.generate(model, idx, 12, 32, temperature=1.0, top_k=1))
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert {gpt.next_token(logits, temperature=1.0, top_p=0.75).item() for _ in range(300)} == {0, 1}
    assert gpt.generate(model, idx, 5, 32, eos_id=greedy[0, 3].item()).tolist() == [[1, 2, 3]]
    model, x = model.to(torch.bfloat16), torch.randint(0, 50257, (2, 8))
    assert gpt.calc_loss_batch(x, x, model, "cpu").dtype == torch.float32
    assert gpt.learning_rate(0, 100, 1e-3, warmup_steps=10) == pytest.approx(1e-4)
    assert gpt.learning_rate(100, 100, 1e-3, 10, min_lr=1e-4) == pytest.approx(1e-4)


def test_lora_matches_the_books_code_and_merges_at_the_base_cost():
    book = BOOK["lora"]  # the book's appendix E: freeze, replace every nn.Linear, one AdamW step
    x = book["input_ids"]
    torch.manual_seed(123)
    model = gpt.GPTModel(book["cfg"]).requires_grad_(False)
    gpt.replace_linear_with_lora(model, book["rank"], book["alpha"])
    optimizer = gpt.make_optimizer(model, "cpu", 5e-5, 0.1)
    gpt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu").backward()
    optimizer.step()
    with torch.no_grad():
        logits = model(x[:, :-1])
        assert (logits[..., :256] - book["logits"]).abs().max() <= 1e-5
        assert logits.double().sum().item() == pytest.approx(book["logits_sum"], rel=1e-5)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == book["trainable"]
        merged = gpt.merge_lora(model)
        assert (merged(x[:, :-1]) - logits).abs().max() <= 1e-5
    assert not any(isinstance(m, (gpt.LinearWithLoRA, gpt.LoRALayer)) for m in merged.modules())


# ---- OpenAI's checkpoint, and fine-tuning from it: the path a user takes -----------------------

def test_load_gpt2_reads_openais_files_as_huggingface_does_downloads_once_and_samples(serve, tmp_path, capsys):
    base, root, seen = serve
    shutil.copytree(TESTDATA / "gpt2-tiny", root / "124M")
    args = ["load-gpt2", "124M", "--base-url", f"{base}/to-here", "--models-dir", str(tmp_path / "models"),
            "--out", str(tmp_path / "g.pt"), "--prompt", " the, and."]
    assert gpt.main(args) == 0 and seen == [p for n in gpt.GPT2_FILES for p in (f"/to-here/124M/{n}", f"/124M/{n}")]
    assert f"saved {tmp_path / 'g.pt'} (" in capsys.readouterr().out
    assert gpt.main(args + ["--force"]) == 0 and len(seen) == 6  # everything present: not one request
    capsys.readouterr()
    expected = np.load(TESTDATA / "gpt2-tiny.expected.npz")
    ckpt = gpt.load_checkpoint(str(tmp_path / "g.pt"))
    model = gpt.build_model(ckpt["config"], ckpt["model"], "g.pt").eval()
    assert model.out_head.weight is model.tok_emb.weight  # tied, as GPT-2 is
    with torch.no_grad():
        assert (model(torch.from_numpy(expected["input_ids"])) - torch.from_numpy(expected["logits"])).abs().max() < 1e-4
    prompt = torch.from_numpy(expected["greedy_prompt"])[None]
    assert gpt.generate(model, prompt, 20, 64)[0].tolist() == expected["greedy_ids"].tolist()
    assert gpt.main(["sample", "--checkpoint", str(tmp_path / "g.pt"), "--prompt", " the, and.",
                     "--max-new-tokens", "8"]) == 0
    tok = gpt.get_tokenizer()
    want = gpt.generate(model, gpt.text_to_token_ids(" the, and.", tok), 8, 64, eos_id=tok.eot_token)
    assert capsys.readouterr().out == gpt.token_ids_to_text(want, tok) + "\n"
    tensors = gpt.read_tf_checkpoint(*(str(TESTDATA / "multiblock" / f"model.ckpt.{ext}")
                                       for ext in ("index", "data-00000-of-00001")))
    # Written by TensorFlow with 1,150 long names, so its index has two data blocks; numpy redraws the values
    assert list(tensors) == [f"v{i:04d}/" + "abcdefghij" * 22 for i in range(1150)]
    rng = np.random.default_rng(0)
    for i, t in enumerate(tensors.values()):
        np.testing.assert_array_equal(t, rng.standard_normal([] if i % 3 == 0 else [i % 5] if i % 3 == 1 else
                                                             [2, i % 4]).astype(np.float32))


@pytest.mark.parametrize("command, source", [("spam", "checkpoint"), ("instruct", "model")])
def test_fine_tuning_from_openais_files_takes_the_steps_it_takes_from_contiguous_weights(
        gpt2_models, tmp_path, command, source):
    """GPT-2's loaded W_query .. ff weights are views (thirds and transposes of OpenAI's matrices), and AdamW's
    fused kernel once updated the wrong elements of such views: through load-gpt2 or --model, a fine-tuning must
    end where it ends from the same weights made contiguous."""
    write_sms(tmp_path / "SMSSpamCollection")
    (tmp_path / "d.json").write_text(json.dumps(entries(20)))
    loaded, copy = str(tmp_path / "gpt2.pt"), str(tmp_path / "copy.pt")
    assert gpt.main(["load-gpt2", "124M", "--models-dir", str(gpt2_models), "--out", loaded]) == 0
    ckpt = gpt.load_checkpoint(loaded)
    assert not ckpt["model"]["trf_blocks.0.att.W_query.weight"].is_contiguous()
    gpt.save_checkpoint(copy, dict(ckpt, model={k: v.contiguous() for k, v in ckpt["model"].items()}))
    run = {"spam": ["spam", "--trainable", "all", "--epochs", "1", "--data-dir", str(tmp_path)],
           "instruct": ["instruct", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3", "--data",
                        str(tmp_path / "d.json")]}[command]
    given = ["--model", "124M", "--models-dir", str(gpt2_models)] if source == "model" else ["--checkpoint", loaded]
    assert gpt.main([*run, *given, "--out", str(tmp_path / "a.pt")]) == 0
    assert gpt.main([*run, "--checkpoint", copy, "--out", str(tmp_path / "b.pt")]) == 0
    a, b = (gpt.load_checkpoint(str(tmp_path / f"{x}.pt"), "spam" if command == "spam" else "gpt") for x in "ab")
    name = "gpt." * (command == "spam") + "trf_blocks.0.att.W_query.weight"
    assert weights_differ(a, b) <= 1e-6 and (a["model"][name] - ckpt["model"][name[4 * (command == "spam"):]]).abs(
    ).max() > 1e-5  # it trained
    assert set(a) == ({"kind", "config", "model", "trainable"} if command == "spam" else {"kind", "config", "model"})


# ---- Training runs: the book's numbers, stops and exact resume, scale --------------------------

def test_train_gives_the_books_losses_and_sample_and_saves_what_it_says(trained, tmp_path, capsys):
    book, folder = BOOK["train"], Path(trained).parent
    with open(folder / "tiny-losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 21, 41, 61]  # the book's steps 0, 20, 40, 60
    assert [int(r["tokens_seen"]) for r in rows] == book["tokens_seen"]
    assert np.allclose([float(r["train_loss"]) for r in rows], book["train_losses"], atol=1e-4)
    assert np.allclose([float(r["val_loss"]) for r in rows], book["val_losses"], atol=1e-4)
    ckpt = gpt.load_checkpoint(trained)
    assert ckpt["progress"] == {"epoch": 1, "batch": 0, "step": book["steps"], "tokens_seen": 72 * 64}
    plotted = importlib.util.find_spec("matplotlib") is not None  # optional: the plot only where it is installed
    assert sorted(os.listdir(folder)) == sorted(["tiny.pt", "tiny-losses.csv"] + ["tiny-losses.png"] * plotted)
    umask = os.umask(0o022)
    os.umask(umask)
    assert all((folder / name).stat().st_mode & 0o777 == 0o666 & ~umask for name in os.listdir(folder))
    assert gpt.main(["sample", "--checkpoint", trained, "--prompt", "Every effort", "--max-new-tokens", "5"]) == 0
    model, tok = gpt.build_model(ckpt["config"], ckpt["model"], trained).eval(), gpt.get_tokenizer()
    expected = gpt.generate(model, gpt.text_to_token_ids("Every effort", tok), 5, 32, eos_id=tok.eot_token)
    assert capsys.readouterr().out == gpt.token_ids_to_text(expected, tok) + "\n"
    assert book["sample"] + "\n" in trained.log  # the epoch's sample, as the book prints it
    light = str(tmp_path / "light.pt")
    assert gpt.main(["train", *TINY_TRAIN, "--max-steps", "2", "--out", light, "--weights-only"]) == 0
    assert set(gpt.load_checkpoint(light)) == {"kind", "config", "run", "model", "history"}
    assert os.path.getsize(light) < 0.4 * os.path.getsize(trained)


STORY = ["--data", "story.txt", "--warmup-steps", "4", "--cosine", "--grad-clip", "0.5", "--grad-accum", "2"]


@pytest.mark.parametrize("signum, call", [(signal.SIGINT, 11), (signal.SIGTERM, 15), (signal.SIGINT, "sample")])
def test_a_stop_saves_and_the_command_it_prints_continues_to_the_uninterrupted_run(
        tmp_path, monkeypatch, capsys, signum, call):
    """Stopped mid-epoch (call 11: step 3), in an epoch's last step (call 15: step 5 of 5; its sample is not
    printed), or during the last sample (the run is whole): the printed command resumes to the run that never
    stopped."""
    monkeypatch.chdir(tmp_path)
    Path("story.txt").write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")  # 5 steps an epoch
    run = ["train", *TINY_TRAIN, "--drop-rate", "0.1", *STORY, "--epochs", "2", "--out"]
    assert gpt.main([*run, "whole.pt"]) == 0
    calls, real = [0], gpt.calc_loss_batch

    def stop(*args):  # a real Ctrl-C or kill; calls: 2 a step, and 6 for the evaluation after step 1
        calls[0] += 1
        if calls[0] == call:
            os.kill(os.getpid(), signum)
        return real(*args)
    monkeypatch.setattr(gpt, "calc_loss_batch", stop)
    samples = []

    def sample(*args):  # the last epoch's: the run is whole when the signal comes
        samples.append(args)
        if len(samples) == 2:
            os.kill(os.getpid(), signum)
    if call == "sample":
        monkeypatch.setattr(gpt, "generate_and_print_sample", sample)
    capsys.readouterr()
    assert gpt.main([*run, "stopped.pt"]) == 128 + signum
    out, err = capsys.readouterr()
    where = {11: "epoch 1, step 3", 15: "the end of epoch 1, step 5", "sample": "the end of epoch 2, step 10"}[call]
    line = err.splitlines()[-1]  # not an error: no "error:"
    assert line.startswith(f"stopped at {where}; saved stopped.pt (") and "Every effort" not in out
    monkeypatch.setattr(gpt, "calc_loss_batch", real)
    if call != "sample":
        command = line.split("continue with `")[1][:-1]
        assert command == f"python gpt.py {' '.join(run)} stopped.pt --resume"
        progress = gpt.load_checkpoint("stopped.pt")["progress"]
        assert gpt.main(command.split()[2:]) == 0
        assert f"resuming at epoch {progress['epoch'] + 1}, step {progress['step']}\n" in capsys.readouterr().out
    a, b = gpt.load_checkpoint("whole.pt"), gpt.load_checkpoint("stopped.pt")
    assert a["progress"] == b["progress"] and a["history"] == b["history"] and weights_differ(a, b) == 0
    assert Path("whole-losses.csv").read_text() == Path("stopped-losses.csv").read_text()
    before = snapshot(tmp_path)
    assert gpt.main(["train", "--out", "stopped.pt", "--resume", "--epochs", "2"]) == 0  # done: a note, not a run
    assert capsys.readouterr().out.startswith("nothing left to train") and snapshot(tmp_path) == before


def test_two_processes_accumulating_stop_at_sigterm_with_the_weights_of_one_process_and_batch_4(tmp_path):
    """2 gloo processes x batch 1 x 2 batches a step = 1 x batch 4, stopped by SIGTERM (as a scheduler sends it to
    the whole job)."""
    run = ["train", *TINY_TRAIN, "--drop-rate", "0", "--eval-iter", "2", "--out"]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(HERE / "gpt.py"), *run, str(tmp_path / "ddp.pt"), "--batch-size", "1", "--grad-accum",
                            "2"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                           start_new_session=True)
    for line in job.stdout:  # only rank 0 prints
        if line.startswith("Ep 1 (Step 000001)"):
            os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate()[1]
    stopped = gpt.load_checkpoint(str(tmp_path / "ddp.pt"))
    step = stopped["progress"]["step"]
    assert job.returncode != 0 and f"stopped at epoch 1, step {step}; saved {tmp_path / 'ddp.pt'}" in err, err
    assert err.count("stopped at") == 1 and "torchrun --nproc_per_node=2 gpt.py train" in err
    assert gpt.main([*run, str(tmp_path / "one.pt"), "--batch-size", "4", "--max-steps", str(step)]) == 0
    one = gpt.load_checkpoint(str(tmp_path / "one.pt"))
    assert one["progress"] == stopped["progress"] and weights_differ(stopped, one) <= 1e-5


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
    for rank in range(3):  # 3 processes, batch 2: each batch of 6 windows dealt out, the last ones repeated
        monkeypatch.setattr(gpt, "processes", lambda: (rank, 3))
        shares.append([b.tolist() for b in gpt.make_loader(windows, 2, grad_accum=2)])
    assert sorted(sum(shares[0][:1] + shares[1][:1] + shares[2][:1], [])) == list(range(6))
    assert [len(share) for share in shares] == [7, 7, 7] and [s[-1] for s in shares] == [[36], [0], [1]]
    calls = []
    monkeypatch.setattr(gpt.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(gpt.dist, "barrier", lambda: calls.append("wait"))
    for local_rank in ("0", "1"):  # one process per machine downloads, the others wait
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        gpt.once_per_machine(lambda: calls.append("download"))
    assert calls == ["download", "wait", "wait"]


def test_the_token_cache_holds_the_books_tokens_of_files_and_folders(tmp_path, monkeypatch):
    tok, text, cache = gpt.get_tokenizer(), VERDICT.read_text(encoding="utf-8"), str(tmp_path / "cache")
    split = int(0.9 * len(text))  # the book's split, by characters
    train, val = gpt.token_cache(gpt.corpus([str(VERDICT)]), cache, piece=300)  # ~60 pieces
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


# ---- Files, downloads, and one line for every mistake -----------------------------------------

@pytest.mark.parametrize("failure", [RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64"),
                                     OSError(28, "No space left on device")])
def test_a_failed_save_is_one_line_and_keeps_the_previous_file(trained, tmp_path, monkeypatch, capsys, failure):
    path = tmp_path / "g.pt"
    shutil.copy(trained, path)
    before = snapshot(tmp_path)

    def fails_midway(obj, f):
        f.write(b"half a checkpoint")
        raise failure
    monkeypatch.setattr(gpt.torch, "save", fails_midway)
    assert gpt.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", str(path), "--force"]) == 1
    reason = "No space left on device" if isinstance(failure, OSError) else str(failure)
    assert capsys.readouterr().err == f"error: cannot save {path} ({reason}); the previous {path} is kept\n"
    assert snapshot(tmp_path) == before  # and no temporary file left


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def bad_inputs(tmp, trained, base):
    """(argv, exit code, what the one line on stderr says) for each kind of mistake a user can make."""
    shutil.copytree(TESTDATA / "gpt2-tiny", tmp / "www" / "124M")
    shutil.copytree(TESTDATA / "gpt2-tiny", tmp / "bad" / "124M")
    (tmp / "bad" / "124M" / "hparams.json").write_text('{"n_vocab": 512}')
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "notours.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp / "bad.json").write_text('[{"instruction": "Add 1 and 2.", "output": "3"}]')
    (tmp / "out-dir.pt").mkdir()
    (tmp / "existing.pt").write_bytes(b"hours of training")
    (tmp / "empty").mkdir()
    (tmp / "short.txt").write_text("A few words only. " * 20)
    (tmp / "long.json").write_text(json.dumps([dict(e, instruction="Say it. " * 20) for e in entries(12)]))
    ckpt = gpt.load_checkpoint(trained)
    for name, state in (("otherconfig", dict(ckpt, config=dict(ckpt["config"], emb_dim=64))),
                        ("weights", {k: ckpt[k] for k in ("kind", "config", "run", "model", "history")}),
                        ("twoprocs", dict(ckpt, run=dict(ckpt["run"], processes=2)))):
        gpt.save_checkpoint(str(tmp / f"{name}.pt"), state)
    torch.save({"kind": "gpt", "config": TINY, "model": Exploit()}, tmp / "evil.pt")
    (tmp / "zip").mkdir()
    (tmp / "zip" / "sms_spam_collection.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    (tmp / "sms" / "SMSSpamCollection").parent.mkdir()
    (tmp / "sms" / "SMSSpamCollection").write_text("ham\tSee you at 5\nspam WIN a prize now\n")
    write_sms(tmp / "few" / "SMSSpamCollection", spam=SPAM[:2], ham=HAM[:2])
    sample = ["sample", "--checkpoint"]
    train = ["train", *TINY_TRAIN, "--cache-dir", f"{tmp}-cache", "--out", str(tmp / "new.pt")]  # a cache: no output
    spam, instruct = ["spam", "--checkpoint", trained, "--data-dir"], ["instruct", "--checkpoint", trained, "--data"]
    load = ["load-gpt2", "124M", "--out", str(tmp / "g.pt"), "--models-dir", str(tmp / "models")]
    return [
        (sample + [str(tmp / "notours.pt")], 1, "notours.pt: not a 'gpt' checkpoint of gpt.py ("),
        (sample + [str(tmp / "evil.pt")], 1, "evil.pt: not a 'gpt' checkpoint of gpt.py (Weights only load failed"),
        (sample + [str(tmp / "otherconfig.pt")], 1, "otherconfig.pt: not a model that fits its config"),
        (sample + [str(tmp / "gone.pt")], 1, "gone.pt: no such checkpoint; `python gpt.py train` or"),
        (["train", "--out", str(tmp / "weights.pt"), "--resume"], 1, "(--weights-only saves none) (no 'optimizer')"),
        (["train", "--out", str(tmp / "twoprocs.pt"), "--resume"], 1, "trained by 2 process(es); resume it with as"),
        (["spam", "--out", trained, "--classify", "hello"], 1, "not a 'spam' checkpoint of gpt.py (its kind is 'gpt')"),
        (load[:-1] + [str(tmp / "bad")], 1, "bad/124M: not OpenAI's GPT-2 124M, or its files do not fit each other (no 'n_ctx')"),
        (load, 1, "cannot download https://127.0.0.1:9/124M/hparams.json (cannot reach 127.0.0.1); put the file at"),
        (load + ["--base-url", f"{base}/to-http"], 1, "hparams.json (refusing plain HTTP: http://127.0.0.1:9/124M/"),
        (load + ["--base-url", f"{base}/lying"], 1, "/lying/124M/hparams.json (the connection broke off)"),
        (load + ["--base-url", f"{base}/none"], 1, f"json (HTTP 404); put the file at {tmp}/models/124M/hparams.json"),
        (spam + [str(tmp / "zip")], 1, "sms_spam_collection.zip: not the SMS Spam Collection zip; delete it and retry"),
        (spam + [str(tmp / "sms")], 1, "SMSSpamCollection, line 2: expected 'ham' or 'spam'"),
        (spam + [str(tmp / "few")], 1, "too few examples: 2 train, 0 validation, 2 test"),
        (instruct + [str(tmp / "bad.json")], 1, "bad.json: not a JSON list of objects with the strings instruction, "
                                                "input, output (no 'input')"),
        (instruct + [str(tmp / "none.json"), "--out", str(tmp / "existing.pt")], 1, "none.json: No such file"),
        (instruct + [str(tmp / "long.json"), "--mask-instruction", "--batch-size", "2"], 1, "a prompt fills the"),
        (train[:-1] + [str(tmp / "existing.pt")], 1, "existing.pt already exists; use --force to replace it, --resume"),
        (train[:-1] + [str(tmp / "out-dir.pt")], 1, "out-dir.pt is a folder; name the file to write"),
        (train + ["--data", str(tmp / "latin1.txt")], 1, "latin1.txt: not UTF-8 text; convert it (iconv -t utf-8)"),
        (train + ["--data", str(tmp / "empty")], 1, "empty: no *.txt file in this folder"),
        (train + ["--data", str(tmp / "short.txt")], 1, "text too short: 91 tokens to train on, 11 to validate"),
        (train + ["--emb-dim", str(2 ** 33)], 1, "out of memory on cpu; lower --batch-size"),
        (train + ["--lr", "inf"], 2, "argument --lr: inf is outside (0, inf]"),
        (sample + [trained, "--top-k", "0"], 2, "argument --top-k: 0 is outside [1, inf]"),
        (sample + [trained, "--device", "cuda:7"], 1, "device 'cuda:7' is not available here"),
        (sample + [trained, "--prompt", ""], 1, "the prompt is empty"),
        (["instruct", "--checkpoint", trained, "--judge", "llama3", "--ollama-url", "http://127.0.0.1:9"], 1,
         "no Ollama server at http://127.0.0.1:9: start one with `ollama serve`, then `ollama pull llama3`"),
    ]


def test_every_user_mistake_is_one_short_line_and_changes_nothing(tmp_path, trained, serve, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    wrong = []
    for argv, code, mention in bad_inputs(tmp_path, trained, serve[0]):
        before = snapshot(tmp_path)
        try:
            got = gpt.main(argv)
        except SystemExit as e:  # argparse exits by itself
            got = e.code
        err = capsys.readouterr().err
        one_line = err.startswith("error: ") and err.count("\n") == 1 and len(err) < 200 + len(str(tmp_path))
        if not (got == code and one_line and mention in err) or snapshot(tmp_path) != before:
            wrong.append((argv, got, err))
    assert not wrong, "\n".join(map(str, wrong))


# ---- Chapters 6 and 7 through the command line -------------------------------------------------

@pytest.mark.parametrize("what", [["--trainable", "last-block"], ["--lora", "4", "--lr", "1e-2"]])
def test_spam_splits_as_the_book_trains_what_it_says_saves_at_its_end_and_classifies(tmp_path, capsys, what):
    write_sms(tmp_path / "SMSSpamCollection")
    assert gpt.prepare_sms_spam(str(tmp_path)) == {name: [tuple(row) for row in rows]
                                                    for name, rows in BOOK["spam_split"].items()}
    model = gpt.SpamClassifier(tiny_model(), "last-block")  # it reads each message's last real token
    batch, _ = gpt.collate_spam([([5, 6, 7, 8], 0), ([9, 10], 1)])
    with torch.no_grad():
        alone = torch.cat([model.gpt(torch.tensor([r]))[:, -1:] for r in ([5, 6, 7, 8], [9, 10])])
        assert torch.allclose(model(batch), alone, atol=1e-5)
    lm, out = str(tmp_path / "lm.pt"), str(tmp_path / "spam.pt")
    gpt.save_checkpoint(lm, {"kind": "gpt", "config": TINY, "model": tiny_model().state_dict()})
    run = ["spam", "--checkpoint", lm, "--data-dir", str(tmp_path), "--out", out, "--lr", "1e-3", *what]
    with pytest.MonkeyPatch.context() as m:  # a stop before the end saves nothing, and says so
        m.setattr(gpt, "calc_loss_batch", lambda *a, real=gpt.calc_loss_batch: os.kill(os.getpid(), 2) or real(*a))
        assert gpt.main(run) == 130 and not os.path.exists(out)
    assert "stopped at epoch 1, step 1; nothing saved: `spam` saves only at its end" in capsys.readouterr().err
    assert gpt.main(run + ["--epochs", "8"]) == 0 and "train accuracy 100.00%" in capsys.readouterr().out
    base, ckpt = gpt.load_checkpoint(lm)["model"], gpt.load_checkpoint(out, "spam")
    assert set(ckpt) == {"kind", "config", "model", "trainable"} and not any("lora" in k for k in ckpt["model"])
    changed = {k for k in base if not torch.equal(base[k], ckpt["model"]["gpt." + k])}
    assert ("trf_blocks.0.att.W_query.weight" in changed) == ("--lora" in what) and "tok_emb.weight" not in changed
    assert gpt.main(["spam", "--out", out, "--classify", SPAM[3], "--classify", HAM[5]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("spam (spam probability") and lines[1].startswith("not spam (spam probability")


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


def test_instruct_collates_as_the_book_answers_beside_its_checkpoint_and_is_judged(tmp_path, capsys, ollama):
    inputs, targets = gpt.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    tok, entry = gpt.get_tokenizer(), entries(2)[1]
    prompt, response = tok.encode(gpt.format_input(entry)), tok.encode("\n\n### Response:\n" + entry["output"])
    masked = gpt.InstructionDataset([entry], tok, mask_instruction=True)[0]
    assert gpt.custom_collate_fn([masked])[1][0].tolist() == [-100] * (len(prompt) - 1) + response + [50256]
    url, seen = ollama
    data, lm, out = tmp_path / "d.json", str(tmp_path / "tiny.pt"), str(tmp_path / "sft.pt")
    data.write_text(json.dumps(entries(20)))  # 17 training, 2 test, 1 validation entries
    cfg = dict(TINY, context_length=320)  # room for a prompt and 256 new tokens: the cache never slides
    gpt.save_checkpoint(lm, {"kind": "gpt", "config": cfg, "model": tiny_model(**cfg).state_dict()})
    argv = ["instruct", "--checkpoint", lm, "--data", str(data), "--out", out, "--batch-size", "4", "--epochs", "1",
            "--lr", "1e-3", "--ollama-url", url]
    assert gpt.main(argv + ["--judge", "mistral"]) == 1  # not pulled: said before any training
    assert capsys.readouterr().err == f"error: Ollama at {url} has no mistral (llama3:latest pulled): run " \
                                      "`ollama pull mistral` first\n"
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


def test_help_shows_real_defaults_and_output_survives_closed_pipes_and_narrow_encodings(trained, monkeypatch, capsys):
    for command, default in (("sample", "checkpoints/verdict.pt"), ("spam", "124M"), ("instruct", "355M")):
        with pytest.raises(SystemExit):
            gpt.main([command, "--help"])
        assert f"(default: {default})" in " ".join(capsys.readouterr().out.split()) and "default: None" not in default
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` has exited
    monkeypatch.setattr(sys, "stdout", open(write_end, "w"))
    assert gpt.main(["sample", "--checkpoint", trained, "--max-new-tokens", "3"]) == 141
    assert capsys.readouterr().err == ""
    latin1 = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(latin1, encoding="latin-1"))  # PYTHONIOENCODING=latin-1
    assert gpt.main(["sample", "--checkpoint", trained, "--prompt", "café → naïve", "--max-new-tokens", "0"]) == 0
    assert latin1.getvalue() == "café ? naïve\n".encode("latin-1")
