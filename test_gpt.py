"""Tests for gpt.py: `python -m pytest -q`. Offline, tiny models, values asserted."""
import http.server
import io
import json
import re
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(HERE.parent / "shared" / "tiktoken-cache"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

import gpt  # noqa: E402

VERDICT = HERE / "the-verdict.txt"
TINY = dict(gpt.GPT_CONFIG_124M, context_length=32, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0)
TINY_TRAIN = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "32", "--eval-freq", "20"]


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return gpt.GPTModel(dict(TINY, **overrides)).eval()


@pytest.fixture
def serve(tmp_path):
    """A local HTTP server over a folder; yields (base_url, folder, requests seen as (path, Range))."""
    root, seen = tmp_path / "www", []
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def send_head(self):
            seen.append((self.path, self.headers.get("Range")))
            rng = self.headers.get("Range")
            path = Path(self.translate_path(self.path))
            if {"to-http", "to-here"} & set(path.parts):  # redirects elsewhere over plain HTTP, or back here
                rest = self.path.split("/to-", 1)[1].split("/", 1)[1]
                self.send_response(302)
                to = f"http://example.invalid/{rest}" if "to-http" in path.parts else f"/{rest}"
                self.send_header("Location", to)
                self.end_headers()
                return io.BytesIO(b"")
            if "cut" in path.parts and path.is_file():  # announces no size, and the body stops halfway
                data = path.read_bytes()
                self.send_response(200)
                self.end_headers()
                return io.BytesIO(data[:len(data) // 2])
            if path.parent.name == "lying" and path.is_file():  # announces 10 bytes it never sends
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data) + 10))
                self.end_headers()
                return io.BytesIO(data)
            if rng and path.is_file():  # SimpleHTTPRequestHandler has no Range support: add it
                data = path.read_bytes()
                start = int(rng.split("=")[1].rstrip("-"))
                self.send_response(206)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                return io.BytesIO(data[start:])
            return super().send_head()

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root, seen
    server.shutdown()


@pytest.fixture(scope="session")
def verdict_problem():
    """None once the book's the-verdict.txt is beside gpt.py (downloaded on first use), else what to do."""
    try:
        gpt.corpus(None)
    except gpt.GPTError as e:
        return f"the tests that train need {VERDICT}: copy the book's the-verdict.txt there ({e})"


VERDICT_FAILED = []


def need_verdict(problem):
    """Without the-verdict.txt the first test that needs it fails, saying what to do; the others skip."""
    if problem and not VERDICT_FAILED:
        VERDICT_FAILED.append(problem)
        pytest.fail(problem, pytrace=False)
    if problem:
        pytest.skip("needs the-verdict.txt: see the one failure that says what to do")


@pytest.fixture
def verdict(verdict_problem):
    need_verdict(verdict_problem)


# ---- 1-2. tokenizer and data ------------------------------------------------------------------

def test_the_verdict_as_in_the_book(verdict):
    text = VERDICT.read_text(encoding="utf-8")
    assert len(text) == 20479
    assert len(gpt.get_tokenizer().encode(text)) == 5145
    loader = gpt.create_dataloader_v1(text, batch_size=1, max_length=4, stride=1, shuffle=False)
    inputs, targets = next(iter(loader))
    assert inputs.tolist() == [[40, 367, 2885, 1464]]
    assert targets.tolist() == [[367, 2885, 1464, 1807]]


def test_token_round_trip_and_endoftext():
    tok = gpt.get_tokenizer()
    ids = gpt.text_to_token_ids("Hello, world. <|endoftext|>", tok)
    assert ids.tolist() == [[15496, 11, 995, 13, 220, 50256]]
    assert gpt.token_ids_to_text(ids, tok) == "Hello, world. <|endoftext|>"


def test_download_fetches_once_and_resumes(serve, tmp_path):
    base, root, seen = serve
    payload = os.urandom(300_000)
    (root / "f.bin").write_bytes(payload)
    dest = tmp_path / "out" / "f.bin"
    Path(str(dest) + ".part").parent.mkdir(parents=True)
    Path(str(dest) + ".part").write_bytes(payload[:100_000])  # an interrupted earlier download
    gpt.download([f"{base}/f.bin"], str(dest))
    assert dest.read_bytes() == payload
    assert seen == [("/f.bin", "bytes=100000-")]
    gpt.download([f"{base}/f.bin"], str(dest))
    assert len(seen) == 1  # present and complete: no request at all


def test_download_falls_back_then_fails_in_one_line(serve, tmp_path):
    base, root, seen = serve
    (root / "f.txt").write_text("mirror")
    gpt.download([f"{base}/missing.txt", f"{base}/f.txt"], str(tmp_path / "f.txt"))
    assert (tmp_path / "f.txt").read_text() == "mirror"
    gpt.download([f"{base}/to-here/f.txt"], str(tmp_path / "r.txt"))  # a redirect that stays on HTTPS (here: local)
    assert (tmp_path / "r.txt").read_text() == "mirror" and seen[-2:] == [("/to-here/f.txt", None), ("/f.txt", None)]
    with pytest.raises(gpt.GPTError, match="could not download g.txt"):
        gpt.download([f"{base}/nothing"], str(tmp_path / "g.txt"))
    assert not (tmp_path / "g.txt").exists()
    with pytest.raises(gpt.GPTError, match="plain HTTP"):
        gpt.download(["http://example.com/x"], str(tmp_path / "x"))


# ---- 3. attention -----------------------------------------------------------------------------

def test_attention_equals_masked_softmax_and_never_sees_the_future(monkeypatch):
    torch.manual_seed(1)
    att = gpt.MultiHeadAttention(d_in=12, d_out=12, context_length=8, dropout=0.0, num_heads=3).eval()
    x = torch.randn(2, 7, 12)
    b, T, h, d = 2, 7, 3, 4
    q, k, v = (W(x).view(b, T, h, d).transpose(1, 2) for W in (att.W_query, att.W_key, att.W_value))
    scores = q @ k.transpose(2, 3) / d ** 0.5
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    expected = att.out_proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, T, 12))
    y = att(x)
    assert (y - expected).abs().max() <= 1e-5
    x2 = x.clone()
    x2[:, 4:] = torch.randn(2, 3, 12)  # change the future: the past must not move
    assert torch.equal(att(x2)[:, :4], y[:, :4])
    monkeypatch.setattr(gpt.MultiHeadAttention, "fused", False)  # the book's explicit maths, in the file
    assert (att(x) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("prompt_len, new", [(5, 30), (20, 40)])
def test_explicit_attention_matches_the_fused_kernel_with_a_kv_cache(monkeypatch, prompt_len, new):
    model, prompt = tiny_model(), torch.randint(0, 50257, (2, prompt_len))
    fused = gpt.generate(model, prompt, new, 32)
    logits = model(prompt)
    monkeypatch.setattr(gpt.MultiHeadAttention, "fused", False)
    assert (model(prompt) - logits).abs().max() <= 1e-4
    assert torch.equal(gpt.generate(model, prompt, new, 32), fused)


def test_layernorm_and_gelu_match_the_book_formulas():
    x = torch.randn(3, 5, 16)
    ln = gpt.LayerNorm(16)
    with torch.no_grad():
        ln.scale.uniform_()
        ln.shift.uniform_()
    mean, var = x.mean(-1, keepdim=True), x.var(-1, keepdim=True, unbiased=False)
    assert torch.allclose(ln(x), ln.scale * (x - mean) / torch.sqrt(var + 1e-5) + ln.shift, atol=1e-5)
    gelu = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x ** 3)))
    assert torch.allclose(gpt.GELU()(x), gelu, atol=1e-6)


# ---- 4. the model -----------------------------------------------------------------------------

def test_book_model_size_and_greedy_text():
    torch.manual_seed(123)
    model = gpt.GPTModel(gpt.GPT_CONFIG_124M).eval()
    assert sum(p.numel() for p in model.parameters()) == 163_009_536
    idx = gpt.text_to_token_ids("Hello, I am", gpt.get_tokenizer())
    out = gpt.generate(model, idx, max_new_tokens=10, context_size=1024)
    assert out.tolist() == [[15496, 11, 314, 716, 27018, 24086, 47843, 30961, 42348, 7267,
                             49706, 43231, 47062, 34657]]


def test_state_dict_saved_by_the_books_code_loads_strictly():
    cfg = dict(TINY, n_layers=1, qkv_bias=True)
    V, E, C = cfg["vocab_size"], cfg["emb_dim"], cfg["context_length"]
    shapes = {"tok_emb.weight": (V, E), "pos_emb.weight": (C, E), "final_norm.scale": (E,),
              "final_norm.shift": (E,), "out_head.weight": (V, E)}
    block = {"att.mask": (C, C), "ff.layers.0.weight": (4 * E, E), "ff.layers.0.bias": (4 * E,),
             "ff.layers.2.weight": (E, 4 * E), "ff.layers.2.bias": (E,), "att.out_proj.weight": (E, E),
             "att.out_proj.bias": (E,), "norm1.scale": (E,), "norm1.shift": (E,), "norm2.scale": (E,),
             "norm2.shift": (E,)}
    for w in ("W_query", "W_key", "W_value"):
        block.update({f"att.{w}.weight": (E, E), f"att.{w}.bias": (E,)})
    shapes.update({f"trf_blocks.0.{k}": s for k, s in block.items()})
    torch.manual_seed(0)
    book = {k: torch.randn(s) for k, s in shapes.items()}
    model = gpt.GPTModel(cfg)
    model.load_state_dict(book, strict=True)
    assert torch.equal(model.trf_blocks[0].att.W_key.bias, book["trf_blocks.0.att.W_key.bias"])
    assert set(model.state_dict()) == set(shapes) - {"trf_blocks.0.att.mask"}


# ---- 6. sampling ------------------------------------------------------------------------------

def test_greedy_is_deterministic_and_top_k_1_is_greedy():
    model, idx = tiny_model(), torch.tensor([[1, 2, 3]])
    greedy = gpt.generate(model, idx, 12, 32)
    assert torch.equal(greedy, gpt.generate(model, idx, 12, 32))
    torch.manual_seed(5)
    assert torch.equal(greedy, gpt.generate(model, idx, 12, 32, temperature=1.0, top_k=1))
    torch.manual_seed(5)
    sampled = gpt.generate(model, idx, 12, 32, temperature=1.5, top_p=0.9)
    torch.manual_seed(5)
    assert torch.equal(sampled, gpt.generate(model, idx, 12, 32, temperature=1.5, top_p=0.9))
    assert not torch.equal(sampled, greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    torch.manual_seed(0)
    picks = {gpt.next_token(logits, temperature=1.0, top_p=0.75).item() for _ in range(300)}
    assert picks == {0, 1}
    assert gpt.next_token(logits, temperature=1.0, top_p=0.4).item() == 0


def test_eos_stops_and_long_prompts_are_cropped():
    model = tiny_model()
    idx = torch.tensor([[1, 2, 3]])
    first = gpt.generate(model, idx, 5, 32)[0, 3].item()
    assert gpt.generate(model, idx, 5, 32, eos_id=first).tolist() == [[1, 2, 3]]
    long = torch.randint(0, 50257, (1, 50))  # longer than the context of 32
    out = gpt.generate(model, long, 3, 32)
    assert out.shape == (1, 53)
    assert torch.equal(out[:, :50], long)


@pytest.mark.parametrize("prompt_len, new", [(5, 30), (20, 40)])  # the second runs past the context
def test_kv_cache_gives_the_same_tokens(prompt_len, new):
    model = tiny_model(seed=3)
    idx = torch.randint(0, 50257, (2, prompt_len), generator=torch.Generator().manual_seed(0))
    cached = gpt.generate(model, idx, new, 32)
    assert torch.equal(cached, gpt.generate(model, idx, new, 32, use_cache=False))


# ---- 5. training and the command line ---------------------------------------------------------

def test_train_lowers_the_loss_and_sample_reads_the_checkpoint(verdict, tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "tiny.pt")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import fails
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", out]) == 0
    log = capsys.readouterr().out
    evals = re.findall(r"Ep 1 \(Step (\d+)\): Train loss ([\d.]+), Val loss ([\d.]+) \| ([\d,]+) tokens", log)
    losses = [float(train) for _, train, _, _ in evals]
    assert len(evals) == 4 and losses[-1] < losses[0] - 0.2
    ckpt = gpt.load_checkpoint(out)
    assert ckpt["config"]["emb_dim"] == 32 and ckpt["progress"]["epoch"] == 1
    assert log.splitlines()[-1].endswith(f"; saved {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    # every evaluation, as printed, in the CSV beside the checkpoint; the plot needs matplotlib
    with open(tmp_path / "tiny-losses.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], int(r["step"]), r["tokens_seen"]) for r in rows] == [
        ("1", int(step), tokens.replace(",", "")) for step, *_, tokens in evals]
    assert [(f"{float(r['train_loss']):.3f}", f"{float(r['val_loss']):.3f}") for r in rows] == [e[1:3] for e in evals]
    assert rows[1]["tokens_seen"] == str(21 * 2 * 32)  # step 21, batch 2, context 32
    assert f"losses: {tmp_path / 'tiny-losses'}.csv; `pip install matplotlib` to also get their plot\n" in log
    assert not (tmp_path / "tiny-losses.png").exists()
    assert gpt.main(["sample", "--checkpoint", out, "--prompt", "Every effort", "--max-new-tokens", "5"]) == 0
    model = gpt.build_model(ckpt["config"], ckpt["model"], out).eval()
    tok = gpt.get_tokenizer()
    expected = gpt.generate(model, gpt.text_to_token_ids("Every effort", tok), 5, 32, eos_id=tok.eot_token)
    assert capsys.readouterr().out == gpt.token_ids_to_text(expected, tok) + "\n"
    # --weights-only keeps what the book saves, the model alone: sample reads it, --resume cannot continue it
    light, text = str(tmp_path / "light.pt"), tmp_path / "short.txt"
    text.write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")  # 10 steps, not 72
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", light, "--weights-only", "--data", str(text)]) == 0
    ckpt = gpt.load_checkpoint(light)
    assert set(ckpt) == {"kind", "config", "run", "model"} and os.path.getsize(light) < 0.4 * os.path.getsize(out)
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"saved {light} ({os.path.getsize(light) / 1e6:.1f} MB)")
    assert gpt.main(["sample", "--checkpoint", light, "--prompt", "Every effort", "--max-new-tokens", "5"]) == 0
    model = gpt.build_model(ckpt["config"], ckpt["model"], light).eval()
    expected = gpt.generate(model, gpt.text_to_token_ids("Every effort", tok), 5, 32, eos_id=tok.eot_token)
    assert capsys.readouterr().out == gpt.token_ids_to_text(expected, tok) + "\n"
    assert gpt.main(["train", "--out", light, "--resume"]) == 1
    assert "only its weights were: there is no run to resume" in capsys.readouterr().err


def test_resume_after_one_epoch_matches_two_straight(verdict, tmp_path):
    straight, resumed = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    schedule = ["--warmup-steps", "100", "--cosine", "--grad-clip", "0.5", "--batch-size", "3"]
    assert gpt.main(["train", *TINY_TRAIN, *schedule, "--epochs", "2", "--out", straight]) == 0
    assert gpt.main(["train", *TINY_TRAIN, *schedule, "--epochs", "1", "--out", resumed]) == 0
    # the resumed run takes its model, data and schedule from the checkpoint, not from these flags
    assert gpt.main(["train", "--epochs", "2", "--batch-size", "1", "--lr", "1", "--out", resumed, "--resume"]) == 0
    a, b = gpt.load_checkpoint(straight), gpt.load_checkpoint(resumed)
    assert b["progress"] == a["progress"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_token_cache_holds_the_books_tokens_and_follows_the_corpus(tmp_path, monkeypatch):
    tok, text, cache = gpt.get_tokenizer(), VERDICT.read_text(encoding="utf-8"), str(tmp_path / "cache")
    split = int(0.9 * len(text))
    train, val = gpt.token_cache(gpt.corpus([str(VERDICT)]), cache, piece=300)  # ~70 pieces, cut mid-text
    assert train.dtype == np.uint16 and train.tolist() == tok.encode(text[:split]) and val.tolist() == tok.encode(
        text[split:])
    assert sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache)) == 2 * (len(train) + len(val))
    folder = tmp_path / "books"  # a folder: every *.txt below it, sorted by path, joined by <|endoftext|>
    (folder / "b").mkdir(parents=True)
    docs = {"a.txt": "First book, one line.\n" * 10, "b/c.txt": "Second one <|endoftext|> here.\n" * 10}
    for name, doc in docs.items():
        (folder / name).write_text(doc)
    (folder / "notes.md").write_text("not a document")
    documents = gpt.corpus([str(folder)])
    assert [path for path, _, _ in documents] == [str(folder / "a.txt"), str(folder / "b" / "c.txt")]
    train, val = gpt.token_cache(documents, cache, piece=50)
    one, two = docs.values()
    encode = lambda t: tok.encode(t, allowed_special={"<|endoftext|>"})  # noqa: E731
    assert train.tolist() == encode(one[:int(0.9 * len(one))]) + [50256] + encode(two[:int(0.9 * len(two))])
    assert val.tolist() == encode(one[int(0.9 * len(one)):]) + [50256] + encode(two[int(0.9 * len(two)):])
    monkeypatch.setattr(gpt, "get_tokenizer", None)  # the same corpus again: read from the cache, not tokenized
    assert gpt.token_cache(documents, cache)[1].tolist() == val.tolist()
    monkeypatch.undo()
    (folder / "a.txt").write_text(one + "More.\n")  # a changed corpus gets a cache of its own
    assert gpt.token_cache(gpt.corpus([str(folder)]), cache)[1].tolist() != val.tolist()
    assert len(os.listdir(cache)) == 6


def test_resume_reads_the_same_data_from_anywhere_and_refuses_changed_data(tmp_path, monkeypatch, capsys):
    shutil.copy(VERDICT, tmp_path / "story.txt")
    run = ["train", *TINY_TRAIN, "--out", str(tmp_path / "r.pt"), "--cache-dir", str(tmp_path / "cache")]
    monkeypatch.chdir(tmp_path)
    assert gpt.main(run + ["--data", "story.txt", "--max-steps", "2"]) == 0
    monkeypatch.chdir(HERE)
    assert gpt.main(run + ["--resume", "--max-steps", "3"]) == 0
    assert gpt.load_checkpoint(str(tmp_path / "r.pt"))["progress"]["step"] == 3
    with open(tmp_path / "story.txt", "a") as f:
        f.write("One more line.")
    capsys.readouterr()
    assert gpt.main(run + ["--resume", "--max-steps", "4"]) == 1
    assert capsys.readouterr().err == (f"error: the training data changed since {tmp_path / 'r.pt'} was saved "
                                       f"({tmp_path / 'story.txt'}: added, removed or modified); resume with the "
                                       "data it was trained on\n")


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
    for rank in range(3):  # 3 processes, batch 2, accumulation 2: global batches of 12, 4 per process
        monkeypatch.setattr(gpt, "processes", lambda: (rank, 3))
        loader = gpt.make_loader(windows, 2, grad_accum=2)
        shares.append([b.tolist() for b in loader])
        assert len(loader) == len(shares[-1]) == 7
    assert sum(shares[0][:2] + shares[1][:2] + shares[2][:2], []) == list(range(12))  # the first global batch
    assert [share[-1] for share in shares] == [[36], [36], [36]]  # the 37th window, repeated: none is empty


def tiny_run(out, *flags):
    return ["train", *TINY_TRAIN, "--drop-rate", "0", "--eval-iter", "2", "--out", str(out), "--force", *flags]


def batch_of_4(folder, steps):
    """The checkpoint of one process with batch 4 after `steps` steps."""
    assert gpt.main(tiny_run(folder / f"{steps}.pt", "--batch-size", "4", "--max-steps", str(steps))) == 0
    return gpt.load_checkpoint(str(folder / f"{steps}.pt"))


def assert_same_weights(a, b, atol):
    assert list(a["model"]) == list(b["model"])  # no "module." prefixes
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=atol, rtol=0), k


def test_gradient_accumulation_gives_the_weights_of_a_bigger_batch(tmp_path):
    assert gpt.main(tiny_run(tmp_path / "a.pt", "--batch-size", "2", "--grad-accum", "2", "--max-steps", "6")) == 0
    accumulated, expected = gpt.load_checkpoint(str(tmp_path / "a.pt")), batch_of_4(tmp_path, 6)
    assert accumulated["progress"] == expected["progress"]
    assert_same_weights(accumulated, expected, atol=1e-5)


def torchrun(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(HERE / "gpt.py"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def test_two_processes_stop_at_sigterm_resume_and_match_one_process(tmp_path):
    """Two gloo processes x batch 2 = one x batch 4, stopped by SIGTERM (as a scheduler sends it to
    the whole job) in epoch 1, resumed, and compared with one process, allclose 1e-5."""
    out = tmp_path / "ddp.pt"
    job = torchrun(*tiny_run(out, "--batch-size", "2"))
    for line in job.stdout:  # only rank 0 prints
        if line.startswith("Ep 1 (Step 000001)"):
            os.killpg(job.pid, signal.SIGTERM)
    err = job.communicate()[1]
    stopped = gpt.load_checkpoint(str(out))
    step = stopped["progress"]["step"]
    assert 1 <= step < 6 and f"error: terminated at epoch 1, step {step}; saved {out}" in err, err
    assert_same_weights(stopped, batch_of_4(tmp_path, step), atol=1e-5)
    job = torchrun(*tiny_run(out, "--resume", "--max-steps", "6"))
    assert job.wait() == 0, job.communicate()[1]
    resumed, expected = gpt.load_checkpoint(str(out)), batch_of_4(tmp_path, 6)
    assert resumed["progress"] == expected["progress"]
    assert_same_weights(resumed, expected, atol=1e-5)


def test_loss_is_float32_even_from_bfloat16_logits():
    model = tiny_model().to(torch.bfloat16)
    x = torch.randint(0, 50257, (2, 8))
    loss = gpt.calc_loss_batch(x, x, model, "cpu")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(
        model(x).float().flatten(0, 1), x.flatten()).item())


def test_learning_rate_schedule():
    assert gpt.learning_rate(0, 100, 1e-3, warmup_steps=10) == pytest.approx(1e-4)
    assert gpt.learning_rate(9, 100, 1e-3, warmup_steps=10) == pytest.approx(1e-3)
    assert gpt.learning_rate(50, 100, 1e-3) == 1e-3
    assert gpt.learning_rate(10, 100, 1e-3, 10, min_lr=1e-4) == pytest.approx(1e-3)
    assert gpt.learning_rate(100, 100, 1e-3, 10, min_lr=1e-4) == pytest.approx(1e-4)


def test_readme_mentions_every_subcommand():
    readme = (HERE / "README.md").read_text()
    choices = gpt.make_parser()._subparsers._group_actions[0].choices
    for name in choices:
        assert f"python gpt.py {name}" in readme, name


@pytest.fixture
def no_verdict(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt, "HERE", str(tmp_path))
    return tmp_path


def test_default_corpus_is_downloaded_on_first_use(verdict, serve, no_verdict, monkeypatch):
    base, root, seen = serve
    shutil.copy(VERDICT, root / "the-verdict.txt")
    monkeypatch.setattr(gpt, "VERDICT_URL", f"{base}/the-verdict.txt")
    assert [path for path, _, _ in gpt.corpus(None)] == [str(no_verdict / "the-verdict.txt")]
    assert (no_verdict / "the-verdict.txt").read_text() == VERDICT.read_text() and len(seen) == 1


# ---- 7. GPT-2's weights -----------------------------------------------------------------------

TESTDATA = HERE / "testdata"
EXPECTED = TESTDATA / "gpt2-tiny.expected.npz"


def load_fixture():
    cfg, params = gpt.load_gpt2_params(str(TESTDATA / "gpt2-tiny"))
    return gpt.load_weights_into_gpt(gpt.GPTModel(cfg), params).eval(), cfg


def test_gpt2_fixture_matches_huggingface_logits_and_greedy_text():
    expected = np.load(EXPECTED)
    model, cfg = load_fixture()
    assert cfg == {"vocab_size": 512, "context_length": 64, "emb_dim": 16, "n_heads": 2, "n_layers": 12,
                   "drop_rate": 0.0, "qkv_bias": True}
    with torch.no_grad():
        logits = model(torch.from_numpy(expected["input_ids"]))
    assert (logits - torch.from_numpy(expected["logits"])).abs().max() <= 1e-4
    prompt = torch.from_numpy(expected["greedy_prompt"])[None]
    for use_cache in (True, False):
        out = gpt.generate(model, prompt, 20, cfg["context_length"], use_cache=use_cache)
        assert out[0].tolist() == expected["greedy_ids"].tolist()
    assert model.out_head.weight is model.tok_emb.weight  # tied, as GPT-2: one matrix


def test_reader_walks_every_block_of_a_multi_block_index():
    tensors = gpt.read_tf_checkpoint(str(TESTDATA / "multiblock" / "model.ckpt"))
    # Written by TensorFlow with 1,150 long names, so its index table has two data blocks; each
    # tensor was drawn in name order from one generator, so numpy can redraw them.
    assert list(tensors) == [f"v{i:04d}/" + "abcdefghij" * 22 for i in range(1150)]
    rng = np.random.default_rng(0)
    for i, t in enumerate(tensors.values()):
        shape = [] if i % 3 == 0 else [i % 5] if i % 3 == 1 else [2, i % 4]
        np.testing.assert_array_equal(t, rng.standard_normal(shape).astype(np.float32))


@pytest.fixture
def tiny_ckpt(tmp_path):
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001", "hparams.json", "checkpoint"):
        shutil.copy(TESTDATA / "gpt2-tiny" / name, tmp_path / name)
    return tmp_path


def test_reader_errors_name_the_file_and_the_problem(tiny_ckpt):
    data, index = tiny_ckpt / "model.ckpt.data-00000-of-00001", tiny_ckpt / "model.ckpt.index"
    prefix = str(tiny_ckpt / "model.ckpt")
    data.write_bytes(data.read_bytes()[:-100])
    with pytest.raises(gpt.GPTError, match=f"{data}: truncated data file, .* delete it"):
        gpt.read_tf_checkpoint(prefix)
    index.write_bytes(index.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(gpt.GPTError, match=f"{index}: bad magic number"):
        gpt.read_tf_checkpoint(prefix)
    index.unlink()
    with pytest.raises(FileNotFoundError, match="model.ckpt.index"):  # main() says "error: PATH: No such file..."
        gpt.load_gpt2_params(str(tiny_ckpt))


def test_load_gpt2_downloads_once_saves_and_samples(serve, tmp_path, capsys):
    base, root, seen = serve
    (root / "124M").mkdir()
    for name in gpt.GPT2_FILES:
        src = TESTDATA / "gpt2-tiny" / name
        (root / "124M" / name).write_bytes(src.read_bytes() if src.exists() else b"unused by the reader")
    args = ["load-gpt2", "124M", "--base-url", base, "--models-dir", str(tmp_path / "models"),
            "--out", str(tmp_path / "g.pt"), "--prompt", " the, and."]
    assert gpt.main(args) == 0
    assert sorted(p for p, _ in seen) == sorted(f"/124M/{n}" for n in gpt.GPT2_FILES)
    for name in gpt.GPT2_FILES:
        assert (tmp_path / "models" / "124M" / name).read_bytes() == (root / "124M" / name).read_bytes()
    first = capsys.readouterr().out
    assert f"saved {tmp_path / 'g.pt'} ({os.path.getsize(tmp_path / 'g.pt') / 1e6:.1f} MB)\n" in first
    assert gpt.main(args) == 1  # the same rule as every command: an existing checkpoint needs --force
    assert "g.pt already exists; use --force to replace it, or --out" in capsys.readouterr().err
    assert gpt.main(args + ["--force"]) == 0
    assert len(seen) == len(gpt.GPT2_FILES)  # everything present: not one request
    assert capsys.readouterr().out.splitlines()[-1] == first.splitlines()[-1]  # same seed, same text
    model, cfg = load_fixture()
    assert gpt.main(["sample", "--checkpoint", str(tmp_path / "g.pt"), "--prompt", " the, and.",
                     "--max-new-tokens", "8"]) == 0
    tok = gpt.get_tokenizer()
    want = gpt.generate(model, gpt.text_to_token_ids(" the, and.", tok), 8, 64, eos_id=tok.eot_token)
    assert capsys.readouterr().out == gpt.token_ids_to_text(want, tok) + "\n"


def test_download_detects_a_wrong_size(serve, tmp_path):
    base, root, seen = serve
    (root / "lying").mkdir()
    (root / "lying" / "f.bin").write_bytes(b"x" * 1000)  # served with a Content-Length of 1010
    with pytest.raises(gpt.GPTError, match="could not download f.bin"):
        gpt.download([f"{base}/lying/f.bin"], str(tmp_path / "f.bin"))
    assert not (tmp_path / "f.bin").exists() and len(seen) == 3  # retried, never renamed


def test_a_body_cut_short_without_a_size_never_gets_the_final_name(serve, tmp_path, monkeypatch, capsys):
    base, root, seen = serve
    shutil.copytree(TESTDATA / "gpt2-tiny", root / "cut" / "124M")  # served halfway, with no Content-Length
    models = Path(gpt2_dir(tmp_path / "models")) / "124M"
    data = models / "model.ckpt.data-00000-of-00001"
    data.unlink()
    assert gpt.main(["load-gpt2", "124M", "--base-url", f"{base}/cut", "--models-dir", str(tmp_path / "models"),
                     "--out", str(tmp_path / "g.pt")]) == 1
    assert "could not download model.ckpt.data-00000-of-00001" in capsys.readouterr().err and not data.exists()
    (models / "hparams.json").unlink()
    with pytest.raises(gpt.GPTError, match="cannot read as JSON"):
        gpt.load_gpt2("124M", str(tmp_path / "models"), f"{base}/cut")
    assert not (models / "hparams.json").exists()
    write_zip(root / "cut" / "sms.zip")
    monkeypatch.setattr(gpt, "SMS_URLS", (f"{base}/cut/sms.zip",))
    with pytest.raises(gpt.GPTError, match="not the SMS Spam Collection zip"):
        gpt.download_sms_spam(str(tmp_path / "sms"))
    assert os.listdir(tmp_path / "sms") == ["sms_spam_collection.zip.part"]  # resumed by the next attempt
    shutil.copy(VERDICT, root / "cut" / "the-verdict.txt")
    monkeypatch.setattr(gpt, "VERDICT_URL", f"{base}/cut/the-verdict.txt")
    monkeypatch.setattr(gpt, "HERE", str(tmp_path))
    with pytest.raises(gpt.GPTError, match="got 10239 bytes, expected 20479"):
        gpt.corpus(None)
    assert not (tmp_path / "the-verdict.txt").exists()


# ---- reliability: one-line errors, nothing lost, nothing executed ------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, verdict_problem):
    """A tiny checkpoint trained for one epoch, shared by the tests below (read-only)."""
    need_verdict(verdict_problem)
    path = str(tmp_path_factory.mktemp("trained") / "tiny.pt")
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", path]) == 0
    return path


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def gpt2_dir(folder, **hparams):
    """A models folder holding GPT-2 124M's files: the fixture's, with `hparams` changed (None: removed)."""
    models = folder / "124M"
    models.mkdir(parents=True)
    for name in gpt.GPT2_FILES:
        src = TESTDATA / "gpt2-tiny" / name
        (models / name).write_bytes(src.read_bytes() if src.exists() else b"x")
    settings = json.loads((TESTDATA / "gpt2-tiny" / "hparams.json").read_text())
    settings.update(hparams)
    (models / "hparams.json").write_text(json.dumps({k: v for k, v in settings.items() if v is not None}))
    return str(folder)


def write_zip(path, method=zipfile.ZIP_DEFLATED, flags=0, corrupt=False):
    """A zip of one SMSSpamCollection, patched after writing: another compression method number, other
    flag bits (1: encrypted), or its compressed bytes garbled."""
    path.parent.mkdir(exist_ok=True)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("SMSSpamCollection", "ham\tSee you at 5\n" * 50)
    data = bytearray(path.read_bytes())
    central = data.index(b"PK\x01\x02")
    for header, offset in ((0, 6), (central, 8)):  # the local header's flag bits and method, the directory's
        data[header + offset:header + offset + 4] = flags.to_bytes(2, "little") + method.to_bytes(2, "little")
    if corrupt:
        data[50:60] = b"\xff" * 10
    path.write_bytes(bytes(data))


def bad_inputs(tmp, trained, base):
    """(argv, exit code, what stderr must mention) for mistakes a user can make."""
    (tmp / "empty.txt").write_text("   \n")
    (tmp / "short.txt").write_text("A few words only. " * 20)
    (tmp / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp / "notours.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    (tmp / "truncated.pt").write_bytes(Path(trained).read_bytes()[:5000])
    ckpt = gpt.load_checkpoint(trained)
    gpt.save_checkpoint(str(tmp / "otherconfig.pt"), kind="gpt", config=dict(ckpt["config"], emb_dim=64),
                        model=ckpt["model"])
    gpt.save_checkpoint(str(tmp / "existing.pt"), kind="gpt", config=dict(ckpt["config"], n_layers=1),
                        model={})
    gpt.save_checkpoint(str(tmp / "sft.pt"), kind="gpt", config=ckpt["config"], model={},
                        progress=ckpt["progress"])  # as `instruct` saves: a run, but not one of `train`
    gpt.save_checkpoint(str(tmp / "adapter.pt"), kind="gpt", config=ckpt["config"], model={}, lora={
        "rank": 2, "alpha": 16, "base": {"model": None, "checkpoint": trained, "fingerprint": "another model"}})
    gpt.save_checkpoint(str(tmp / "orphan.pt"), kind="gpt", config=ckpt["config"], model={}, lora={
        "rank": 2, "alpha": 16, "base": {"model": None, "checkpoint": str(tmp / "gone.pt"), "fingerprint": "x"}})
    models = tmp / "models" / "124M"
    models.mkdir(parents=True)
    for name in gpt.GPT2_FILES:
        src = TESTDATA / "gpt2-tiny" / name
        (models / name).write_bytes(src.read_bytes() if src.exists() else b"x")
    data = models / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    (tmp / "sms").mkdir()
    (tmp / "sms" / "SMSSpamCollection").write_text("ham\tSee you at 5\nspam WIN a prize now\n")
    (tmp / "bad.json").write_text('[{"instruction": "Add 1 and 2.", "output": "3"}]')
    cfg, no_optimizer = ckpt["config"], {"state": {}, "param_groups": []}  # small files: snapshot() reads them
    gpt.save_checkpoint(str(tmp / "nokey.pt"), kind="gpt", config={k: v for k, v in cfg.items() if k != "n_heads"},
                        model={})
    gpt.save_checkpoint(str(tmp / "strkey.pt"), kind="gpt", config=dict(cfg, n_layers="2"), model={})
    gpt.save_checkpoint(str(tmp / "nomodel.pt"), kind="gpt", config=cfg)
    gpt.save_checkpoint(str(tmp / "badlora.pt"), kind="gpt", config=cfg, model={}, lora={"rank": 2, "alpha": 16})
    gpt.save_checkpoint(str(tmp / "norng.pt"), **dict({k: v for k, v in ckpt.items() if k != "rng"}, model={},
                                                      optimizer=no_optimizer))
    small = dict(cfg, vocab_size=64, emb_dim=8, n_layers=1)
    gpt.save_checkpoint(str(tmp / "badopt.pt"), **dict(ckpt, config=small, model=gpt.GPTModel(small).state_dict(),
                                                       optimizer=no_optimizer))
    gpt.save_checkpoint(str(tmp / "badspam.pt"), kind="spam", config=cfg, model={}, trainable="first-block")
    (tmp / "tiny.txt").write_text("Too short for a window.")
    (tmp / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp / "few.json").write_text(json.dumps(entries(9)))  # 7 to train, 0 to test, 2 to validate
    long = [dict(e, instruction="Say it. " * 20) for e in entries(12)]  # prompts of ~66 tokens, context 32
    (tmp / "long.json").write_text(json.dumps(long))
    for name, kind in (("zip-corrupt", dict(corrupt=True)), ("zip-encrypted", dict(flags=1)),
                       ("zip-method", dict(method=97))):  # 97: WavPack, which zipfile cannot read
        write_zip(tmp / name / "sms_spam_collection.zip", **kind)
    (tmp / "dir-as-file" / "SMSSpamCollection").mkdir(parents=True)
    (tmp / "out-dir.pt").mkdir()
    for name in ("small-sms", "full"):
        (tmp / name).mkdir()
    write_sms(tmp / "small-sms" / "SMSSpamCollection", spam=SPAM[:2], ham=HAM[:2])
    write_sms(tmp / "full" / "SMSSpamCollection")
    os.symlink("/dev/full", tmp / "full" / f"train.csv.tmp{os.getpid()}")  # a full disk, for this process
    sample = ["sample", "--checkpoint", trained]
    train = ["train", *TINY_TRAIN, "--out", str(tmp / "new.pt")]
    spam = ["spam", "--checkpoint", trained, "--out", str(tmp / "s.pt"), "--data-dir"]
    instruct = ["instruct", "--checkpoint", trained, "--out", str(tmp / "new-sft.pt"), "--data-dir", str(tmp), "--data"]
    load = ["load-gpt2", "124M", "--out", str(tmp / "g.pt"), "--models-dir"]
    return [
        # 1. malformed inputs: checkpoints, GPT-2's files, zips, JSON, folders where files belong
        (sample[:-1] + [str(tmp / "nokey.pt")], 1, "nokey.pt: the model's n_heads is None"),
        (sample[:-1] + [str(tmp / "strkey.pt")], 1, "the model's n_layers is '2'"),
        (sample[:-1] + [str(tmp / "nomodel.pt")], 1, "nomodel.pt: model is missing, expected dict"),
        (sample[:-1] + [str(tmp / "badlora.pt")], 1, "badlora.pt: lora.base is missing, expected dict"),
        (["train", "--out", str(tmp / "norng.pt"), "--resume"], 1, "norng.pt: rng is missing, expected dict"),
        (["train", "--out", str(tmp / "badopt.pt"), "--resume"], 1, "its optimizer state does not fit its model"),
        (["spam", "--out", str(tmp / "badspam.pt"), "--classify", "hi"], 1, "trainable is 'first-block'"),
        (load + [gpt2_dir(tmp / "hp1", n_layer=None)], 1, "hparams.json: n_layer is missing, expected int"),
        (load + [gpt2_dir(tmp / "hp2", n_embd="16")], 1, "hparams.json: n_embd is '16', expected int"),
        (load + [gpt2_dir(tmp / "hp3", n_head=0)], 1, "the model's n_heads is 0"),
        (load + [gpt2_dir(tmp / "hp4", n_layer=13)], 1, "holds 148 tensors, hparams.json's 13 layers make 160"),
        (load + [gpt2_dir(tmp / "hp5", n_embd=32)], 1, "model/h0/attn/c_attn/b is (48,), expected (96,)"),
        (spam + [str(tmp / "zip-corrupt")], 1, "not the SMS Spam Collection zip"),
        (spam + [str(tmp / "zip-encrypted")], 1, "SMSSpamCollection' is encrypted"),
        (spam + [str(tmp / "zip-method")], 1, "not the SMS Spam Collection zip (That compression method"),
        (spam + [str(tmp / "empty.txt")], 1, "empty.txt: File exists"),
        (spam + [str(tmp / "dir-as-file")], 1, "SMSSpamCollection: Is a directory"),
        (instruct + [str(tmp / "deep.json")], 1, "deep.json: cannot read as JSON (maximum recursion depth"),
        (instruct + [str(tmp)], 1, f"{tmp}: Is a directory"),
        # 2. outputs that cannot be written, found before any work
        (train[:-1] + [str(tmp / "out-dir.pt")], 1, "out-dir.pt is a folder; name the file to write"),
        (spam + [str(tmp / "full")], 1, "train.csv (No space left on device); nothing was written"),
        # 4. degenerate sizes
        (train + ["--data", str(tmp / "tiny.txt"), "--batch-size", "1", "--stride", "1"], 1, "needs at least 33"),
        (spam + [str(tmp / "small-sms")], 1, "too few messages: 2 train, 0 validation, 2 test"),
        (spam + [str(tmp / "full"), "--grad-accum", "100"], 1, "too few messages: 16 train, 2 validation, 6 test"),
        (instruct + [str(tmp / "few.json"), "--batch-size", "2"], 1, "9 entries are too few"),
        (instruct + [str(tmp / "long.json"), "--batch-size", "2", "--mask-instruction"], 1, "a prompt has"),
        # 5. numbers and memory
        (train + ["--lr", "inf"], 2, "--lr: inf is outside (0, inf)"),
        (train + ["--grad-clip", "inf"], 2, "--grad-clip"),
        (sample + ["--temperature", "inf"], 2, "--temperature"),
        (train + ["--emb-dim", str(2 ** 33)], 1, "out of memory on cpu; lower --batch-size"),
        # 7. https on every hop
        (load + [str(tmp / "m7"), "--base-url", f"{base}/to-http"], 1,
         "refusing to download over plain HTTP: http://example.invalid/124M/checkpoint"),
        (train + ["--data", str(tmp / "missing.txt")], 1, "missing.txt"),
        (train + ["--data", str(tmp / "sms")], 1, "no *.txt file in this folder"),
        (train + ["--data", str(tmp / "latin1.txt")], 1, "UTF-8"),
        (train + ["--data", str(tmp / "empty.txt")], 1, "has 3 tokens, needs at least"),  # whitespace only
        (train + ["--data", str(tmp / "short.txt")], 1, "tokens, needs at least"),
        (["train", *TINY_TRAIN, "--out", str(tmp / "existing.pt")], 1, "--force"),
        (["train", *TINY_TRAIN, "--out", str(tmp / "nothing.pt"), "--resume"], 1, "no such checkpoint"),
        (["train", *TINY_TRAIN, "--out", trained], 1, "--resume"),
        (["train", "--out", str(tmp / "existing.pt"), "--resume"], 1, "no run to resume"),
        (["train", "--out", str(tmp / "sft.pt"), "--resume"], 1, "no run to resume"),
        (train[:-1] + [str(tmp / "empty.txt" / "x.pt")], 1, "cannot write"),
        (sample + ["--seed", "99999999999999999999999"], 2, "--seed"),
        (["sample", "--checkpoint", trained, "--model", "124M"], 2, "not allowed with"),
        (["spam", "--checkpoint", trained, "--classify", "hi"], 1, "--classify takes"),
        (["spam", "--checkpoint", trained, "--lora", "4", "--trainable", "all"], 2, "not allowed with"),
        (["spam", "--checkpoint", trained, "--lora", "0"], 2, "--lora"),
        (["sample", "--checkpoint", str(tmp / "adapter.pt")], 1, "is not the model this adapter was trained on"),
        (["sample", "--checkpoint", str(tmp / "orphan.pt")], 1, "gone.pt, is gone; put the model it was trained on"),
        (["sample", "--checkpoint", str(tmp / "nothing.pt")], 1, "python gpt.py train"),
        (["sample", "--checkpoint", str(tmp / "notours.pt")], 1, "not a gpt.py checkpoint"),
        (["sample", "--checkpoint", str(tmp / "truncated.pt")], 1, "not a gpt.py checkpoint"),
        (["sample", "--checkpoint", str(tmp / "otherconfig.pt")], 1, "do not fit its config"),
        (sample + ["--temperature", "-0.5"], 2, "--temperature"),
        (sample + ["--temperature", "nan"], 2, "--temperature"),
        (sample + ["--top-k", "0"], 2, "--top-k"),
        (sample + ["--top-p", "0"], 2, "--top-p"),
        (sample + ["--top-p", "1.5"], 2, "--top-p"),
        (sample + ["--max-new-tokens", "-1"], 2, "--max-new-tokens"),
        (sample + ["--device", "cuda:7"], 1, "not available"),
        (sample + ["--device", "cuda:abc"], 1, "unknown device"),
        (sample + ["--prompt", ""], 1, "prompt is empty"),
        (["load-gpt2", "7B"], 2, "invalid choice"),
        (["load-gpt2", "124M", "--models-dir", str(tmp / "models"), "--out", str(tmp / "g.pt")], 1,
         "truncated data file"),
        (["load-gpt2", "355M", "--models-dir", str(tmp / "models"), "--base-url", "http://127.0.0.1:9",
          "--out", str(tmp / "g.pt")], 1, f"put OpenAI's {', '.join(gpt.GPT2_FILES)} for GPT-2 355M into "
                                          f"{tmp / 'models' / '355M'}/ yourself"),
        (["load-gpt2", "124M", "--models-dir", str(tmp / "models"), "--out", str(tmp / "existing.pt")], 1, "--force"),
        (["spam", "--checkpoint", trained, "--out", str(tmp / "existing.pt")], 1, "--force"),
        (["instruct", "--checkpoint", trained, "--out", str(tmp / "existing.pt")], 1, "--force"),
        (["spam", "--out", str(tmp / "nothing.pt"), "--classify", "hi"], 1, "no such checkpoint; `python gpt.py spam`"),
        (["sample", "--checkpoint", str(tmp / "x-sft.pt")], 1, "no such checkpoint; `python gpt.py instruct`"),
        (["frobnicate"], 2, "invalid choice"),
        (["spam", "--checkpoint", trained, "--data-dir", str(tmp / "sms"), "--out", str(tmp / "s.pt")], 1,
         "SMSSpamCollection, line 2"),
        (["spam", "--out", trained, "--classify", "hello"], 1, "expected a 'spam' checkpoint"),
        (["instruct", "--checkpoint", trained, "--data", str(tmp / "bad.json")], 1, "entry 0 has no string 'input'"),
        (["instruct", "--checkpoint", trained, "--judge", "llama3", "--ollama-url", "http://127.0.0.1:9"], 1,
         "no Ollama server at http://127.0.0.1:9: start one with `ollama serve`, then `ollama pull llama3`"),
        (["instruct", "--responses", str(tmp / "bad.json")], 1, "--responses is for judging"),
    ]


def test_every_user_mistake_is_one_line_and_changes_nothing(tmp_path, trained, capsys, serve):
    for argv, code, mention in bad_inputs(tmp_path, trained, serve[0]):
        before = snapshot(tmp_path)
        try:
            got = gpt.main(argv)
        except SystemExit as e:  # argparse exits by itself
            got = e.code
        err = capsys.readouterr().err
        assert got == code, (argv, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and mention in err, (argv, err)
        assert snapshot(tmp_path) == before, argv


def test_offline_without_bpe_files_is_one_line(monkeypatch, capsys, trained):
    def offline(name):
        raise requests.ConnectionError("no network")
    monkeypatch.setattr(gpt.tiktoken, "get_encoding", offline)
    gpt.get_tokenizer.cache_clear()
    try:
        assert gpt.main(["sample", "--checkpoint", trained]) == 1
    finally:
        gpt.get_tokenizer.cache_clear()
    assert capsys.readouterr().err.startswith("error: cannot load GPT-2's BPE files")


class Exploit:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_carrying_code_is_refused_not_run(tmp_path, capsys):
    evil, marker = tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"kind": "gpt", "config": TINY, "model": Exploit(str(marker))}, evil)
    assert gpt.main(["sample", "--checkpoint", str(evil)]) == 1
    assert "not a gpt.py checkpoint" in capsys.readouterr().err
    assert not marker.exists()


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "c.pt")
    gpt.save_checkpoint(path, kind="gpt", config=TINY, model={}, step=1)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    monkeypatch.setattr(gpt.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        gpt.save_checkpoint(path, kind="gpt", step=2)
    assert gpt.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["c.pt"]
    monkeypatch.undo()
    os.symlink("/dev/full", f"{path}.tmp{os.getpid()}")  # a full disk
    with pytest.raises(gpt.GPTError, match=re.escape(f"cannot save {path} (No space left on device); the previous "
                                                     f"{path} is kept")):
        gpt.save_checkpoint(path, kind="gpt", config=TINY, model={}, step=2)
    Path(f"{path}.tmp999999999").write_bytes(b"half")  # left by a save that was killed: no such process now
    Path(f"{path}.tmp{os.getppid()}").write_bytes(b"half")  # a save still running in another process
    gpt.save_checkpoint(path, kind="gpt", config=TINY, model={}, step=3)
    assert gpt.load_checkpoint(path)["step"] == 3
    assert sorted(os.listdir(tmp_path)) == ["c.pt", f"c.pt.tmp{os.getppid()}"]


def test_ctrl_c_outside_training_is_one_line(monkeypatch, capsys):
    def interrupted(args, device):
        raise KeyboardInterrupt
    monkeypatch.setattr(gpt, "cmd_sample", interrupted)
    assert gpt.main(["sample"]) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_out_of_memory_on_a_gpu_names_what_to_lower(monkeypatch, capsys):
    def out_of_memory(args, device):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB. GPU 0 has a total capacity...")
    monkeypatch.setattr(gpt, "cmd_sample", out_of_memory)
    assert gpt.main(["sample", "--device", "cpu"]) == 1
    assert capsys.readouterr().err == "error: out of memory on cpu; use a smaller model\n"


def test_ctrl_c_saves_and_resume_matches_an_uninterrupted_run(tmp_path, monkeypatch, capsys, trained):
    path = str(tmp_path / "i.pt")
    calls, real = [0], gpt.calc_loss_batch

    def interrupt_in_step_5(*args):  # calls: step 1, its evaluation (5 + 5 batches), steps 2-5
        calls[0] += 1
        if calls[0] == 15:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, mid-epoch
        return real(*args)
    monkeypatch.setattr(gpt, "calc_loss_batch", interrupt_in_step_5)
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", path]) == 130
    command = f"python gpt.py train --resume --out {path} --epochs 1"
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: interrupted at epoch 1, step 5; saved {path} "
                                                        f"({os.path.getsize(path) / 1e6:.1f} MB); continue with "
                                                        f"`{command}`")
    assert gpt.load_checkpoint(path)["progress"]["batch"] == 5
    monkeypatch.setattr(gpt, "calc_loss_batch", real)
    assert gpt.main(command.split()[2:]) == 0  # what the message says, as it says it
    a, b = gpt.load_checkpoint(trained), gpt.load_checkpoint(path)
    assert a["progress"] == b["progress"] and a["history"] == b["history"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert Path(path[:-3] + "-losses.csv").read_text() == Path(trained[:-3] + "-losses.csv").read_text()
    capsys.readouterr()
    before = snapshot(tmp_path)
    assert gpt.main(command.split()[2:]) == 0  # already done: a note, not a run
    assert capsys.readouterr() == (f"nothing left to train: {path} has finished 1 epoch(s), --epochs 1 asks for "
                                   "no more; give a larger --epochs to train further\n", "")
    assert snapshot(tmp_path) == before


def test_sigterm_saves_like_ctrl_c_and_a_dead_runs_lock_does_not_block(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "t.pt")
    Path(path + ".lock").touch()  # a crashed run's lock file: nobody holds it
    calls, real = [0], gpt.calc_loss_batch

    def terminate_in_step_5(*args):  # as in the Ctrl-C test
        calls[0] += 1
        if calls[0] == 15:
            os.kill(os.getpid(), signal.SIGTERM)  # what kill, a scheduler or a container stop sends
        return real(*args)
    monkeypatch.setattr(gpt, "calc_loss_batch", terminate_in_step_5)
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", path]) == 143
    resume = f"python gpt.py train --resume --out {path} --epochs 1"
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"error: terminated at epoch 1, step 5; saved {path} (39.0 MB); continue with `{resume}`"
    assert gpt.load_checkpoint(path)["progress"]["batch"] == 5
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_second_run_on_the_same_checkpoint_is_refused_while_the_first_runs(tmp_path, capsys):
    path = str(tmp_path / "l.pt")
    first_run = gpt.lock_beside(path)
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", path]) == 1
    first_run.close()
    assert capsys.readouterr().err == f"error: {path} is being written by another run; wait for it to end, or use " \
                                      "another --out\n"
    assert os.listdir(tmp_path) == ["l.pt.lock"]


def test_a_closed_pipe_ends_quietly_and_unencodable_text_is_replaced(monkeypatch, capsys, trained):
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` has exited
    monkeypatch.setattr(sys, "stdout", open(write_end, "w"))
    assert gpt.main(["sample", "--checkpoint", trained, "--max-new-tokens", "3"]) == 141
    assert capsys.readouterr().err == ""
    latin1 = io.BytesIO()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(latin1, encoding="latin-1"))  # PYTHONIOENCODING=latin-1
    assert gpt.main(["sample", "--checkpoint", trained, "--prompt", "café → naïve", "--max-new-tokens", "0"]) == 0
    assert latin1.getvalue() == "café ? naïve\n".encode("latin-1")


# ---- 8. spam classification -------------------------------------------------------------------

import csv  # noqa: E402

SPAM = [f"WINNER!! Claim your free prize {i} now, call 0800 {i}" for i in range(12)]
HAM = [f"ok see you at home later {i} lol" for i in range(20)]


def write_sms(path, spam=SPAM, ham=HAM):
    rows = [("ham", t) for t in ham] + [("spam", t) for t in spam]
    rows = [rows[i] for i in np.random.RandomState(0).permutation(len(rows))]
    path.write_text("".join(f"{label}\t{text}\n" for label, text in rows), encoding="utf-8")
    return rows


def test_balance_and_split_draw_as_the_book(tmp_path):
    rows = write_sms(tmp_path / "SMSSpamCollection")
    splits = gpt.balance_and_split(gpt.read_sms_spam(tmp_path / "SMSSpamCollection"))
    ham = [(0, t) for label, t in rows if label == "ham"]
    balanced = [ham[i] for i in np.random.RandomState(123).choice(20, 12, replace=False)]
    balanced += [(1, t) for label, t in rows if label == "spam"]
    balanced = [balanced[i] for i in np.random.RandomState(123).permutation(24)]
    assert [len(p) for p in splits.values()] == [16, 2, 6]  # int(24 * 0.7), int(24 * 0.1), the rest
    assert splits["train"] + splits["validation"] + splits["test"] == balanced
    gpt.prepare_sms_spam(tmp_path)
    with open(tmp_path / "test.csv", newline="") as f:
        assert list(csv.reader(f)) == [["Label", "Text"]] + [[str(y), t] for y, t in balanced[18:]]


@pytest.mark.parametrize("line", ["ham no tab here", "spamm\tunknown label", "ham\t"])
def test_malformed_sms_file_names_file_and_line(tmp_path, line):
    path = tmp_path / "SMSSpamCollection"
    path.write_text(f"ham\tfine\n{line}\nspam\tfine too\n")
    with pytest.raises(gpt.GPTError, match=r"SMSSpamCollection, line 2: expected 'ham' or 'spam'"):
        gpt.read_sms_spam(path)


def test_classifier_reads_each_rows_last_real_token():
    model = gpt.SpamClassifier(tiny_model())
    rows = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    batch, targets = gpt.collate_spam([(r, i % 2) for i, r in enumerate(rows)])
    assert batch.tolist()[1] == [9, 10, 50256, 50256] and targets.tolist() == [[0], [1], [0]]
    with torch.no_grad():
        out = model(batch)  # (b, 1, 2)
        alone = torch.cat([model.gpt(torch.tensor([r]))[:, -1:] for r in rows])
    assert out.shape == (3, 1, 2) and torch.allclose(out, alone, atol=1e-5)


@pytest.mark.parametrize("trainable, blocks", [("last-block", [1]), ("last-two-blocks", [0, 1]), ("all", [0, 1])])
def test_only_what_trainable_names_gets_gradients(trainable, blocks):
    gpt_model = tiny_model()
    gpt_model.out_head.weight = gpt_model.tok_emb.weight  # tied, as GPT-2 loads
    emb = gpt_model.tok_emb.weight.detach().clone()
    model = gpt.SpamClassifier(gpt_model, trainable)
    assert torch.equal(model.gpt.tok_emb.weight, emb) and model.gpt.out_head.weight.shape == (2, 32)
    x, y = gpt.collate_spam([([1, 2, 3], 1), ([4, 5], 0)])
    gpt.calc_loss_batch(x, y, model, "cpu").backward()
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    want = {n for n, _ in model.named_parameters() if trainable == "all" or n.startswith(
        ("gpt.final_norm", "gpt.out_head", *(f"gpt.trf_blocks.{b}." for b in blocks)))}
    assert got == want and {n for n, p in model.named_parameters() if p.requires_grad} == want


def test_spam_overfits_16_messages_then_classifies(tmp_path, capsys):
    write_sms(tmp_path / "SMSSpamCollection")
    gpt.save_checkpoint(str(tmp_path / "lm.pt"), kind="gpt", config=TINY, model=tiny_model().state_dict())
    out = str(tmp_path / "spam.pt")
    assert gpt.main(["spam", "--checkpoint", str(tmp_path / "lm.pt"), "--data-dir", str(tmp_path), "--out", out,
                     "--trainable", "last-two-blocks", "--lr", "1e-3", "--epochs", "8", "--device", "cpu"]) == 0
    log = capsys.readouterr().out
    assert "train accuracy 100.00%" in log
    with open(tmp_path / "spam-losses.csv", newline="") as f:  # 2 steps an epoch: one evaluation, at step 1
        rows = list(csv.DictReader(f))
    train_acc, val_acc = re.search(r"Train acc ([\d.]+%), Val acc ([\d.]+%)", log).groups()
    assert [(r["step"], f"{float(r['train_acc']):.2%}", f"{float(r['val_acc']):.2%}") for r in rows] == [
        ("1", train_acc, val_acc)]
    assert gpt.load_checkpoint(out, kind="spam")["trainable"] == "last-two-blocks"
    assert gpt.main(["spam", "--out", out, "--classify", SPAM[3], "--classify", HAM[5]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("spam (spam probability") and lines[1].startswith("not spam (spam probability")
    assert gpt.main(["spam", "--out", str(tmp_path / "lm.pt"), "--classify", "hi"]) == 1  # not a classifier


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_sms_zip_downloads_with_fallback_once(serve, tmp_path, monkeypatch):
    base, root, seen = serve
    make_zip(root / "sms.zip", {"SMSSpamCollection": "ham\thi\nspam\tWIN\n", "readme": "UCI"})
    monkeypatch.setattr(gpt, "SMS_URLS", (f"{base}/gone.zip", f"{base}/sms.zip"))
    path = gpt.download_sms_spam(str(tmp_path / "data"))
    assert gpt.read_sms_spam(path) == [("ham", "hi"), ("spam", "WIN")]
    assert gpt.download_sms_spam(str(tmp_path / "data")) == path and [p for p, _ in seen][-1] == "/sms.zip"
    assert not (tmp_path / "data" / "readme").exists()
    monkeypatch.setattr(gpt, "SMS_URLS", (f"{base}/gone.zip",))
    folder = tmp_path / "offline"
    with pytest.raises(gpt.GPTError, match=f"or put the zip at {folder}/sms_spam_collection.zip, or the "
                                           f"SMSSpamCollection file extracted from it at {folder}/SMSSpamCollection, "
                                           "yourself$"):
        gpt.download_sms_spam(str(folder))


def test_sms_zip_with_an_escaping_member_writes_nothing_outside(tmp_path):
    (tmp_path / "data").mkdir()
    make_zip(tmp_path / "data" / "sms_spam_collection.zip",
             {"../evil": "x", "/tmp/evil": "x", "SMSSpamCollection": "ham\thi\n"})
    assert gpt.download_sms_spam(str(tmp_path / "data")) == str(tmp_path / "data" / "SMSSpamCollection")
    assert sorted(os.listdir(tmp_path)) == ["data"] and not os.path.exists("/tmp/evil")
    assert sorted(os.listdir(tmp_path / "data")) == ["SMSSpamCollection", "sms_spam_collection.zip"]


# ---- 9. instruction fine-tuning ---------------------------------------------------------------

def entries(n):
    return [{"instruction": f"Name the number {i}.", "input": f"{i} + 0" if i % 2 else "",
             "output": f"The number is {i}."} for i in range(n)]


def test_collate_pads_shifts_and_ignores_as_in_the_book():
    inputs, targets = gpt.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    inputs, targets = gpt.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, 50256]]
    assert targets.tolist() == [[1, 2, 3], [6, 50256, -100]]


def test_mask_instruction_masks_exactly_the_prompt():
    tok = gpt.get_tokenizer()
    entry = entries(2)[1]
    prompt = tok.encode(gpt.format_input(entry))
    response = tok.encode("\n\n### Response:\n" + entry["output"])
    plain = gpt.InstructionDataset([entry], tok)
    masked = gpt.InstructionDataset([entry], tok, mask_instruction=True)
    assert plain[0] == (0, prompt + response) and masked[0] == (len(prompt), prompt + response)
    _, targets = gpt.custom_collate_fn([plain[0]])
    assert targets[0].tolist() == prompt[1:] + response + [50256]
    inputs, targets = gpt.custom_collate_fn([masked[0]])
    assert inputs[0].tolist() == prompt + response
    assert targets[0].tolist() == [-100] * (len(prompt) - 1) + response + [50256]


def test_format_split_and_response_extraction():
    assert gpt.format_input({"instruction": "Add.", "input": "1 + 1", "output": "2"}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes "
        "the request.\n\n### Instruction:\nAdd.\n\n### Input:\n1 + 1")
    assert gpt.format_input({"instruction": "Add.", "input": ""}).endswith("### Instruction:\nAdd.")
    data = entries(1100)
    train, test, val = gpt.split_instruction_data(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train + test + val == data and test[0] is data[935] and val[0] is data[1045]
    prompt = gpt.format_input(data[0])
    assert gpt.extract_response(prompt + "\n\n### Response:\nThe number is 0. ", prompt) == "The number is 0."


@pytest.mark.parametrize("content, message", [
    ('{"instruction": "x"}', "expected a JSON list of {instruction, input, output} objects, found a dict"),
    ('[{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "output": "b"}]',
     "entry 1 has no string 'input'"),
    ("[1, 2", "cannot read as JSON")])
def test_bad_instruction_data_stops_with_one_line(tmp_path, capsys, content, message):
    (tmp_path / "bad.json").write_text(content)
    assert gpt.main(["instruct", "--data", str(tmp_path / "bad.json"), "--checkpoint", "none.pt"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'bad.json'}: {message}") and err.count("\n") == 1


@pytest.fixture
def ollama():
    """A fake Ollama server with llama3 pulled: records each /api/chat request and streams the score
    "85" in two pieces."""
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/api/tags" else 404)
            self.end_headers()
            self.wfile.write(b'{"models": [{"name": "llama3:latest", "model": "llama3:latest"}]}')

        def do_POST(self):
            seen.append((self.path, json.loads(self.rfile.read(int(self.headers["Content-Length"])))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"message": {"role": "assistant", "content": "8"}, "done": false}\n'
                             b'{"message": {"role": "assistant", "content": "5"}, "done": true}\n')

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()


def test_judge_sends_the_books_prompt_and_parses_the_streamed_score(ollama):
    url, seen = ollama
    entry = dict(entries(2)[1], model_response="It is 1.")
    assert gpt.generate_model_scores([entry], "model_response", "llama3", url + "/api/chat") == [85]
    prompt = (f"Given the input `{gpt.format_input(entry)}` and correct output `The number is 1.`, score the "
              "model response `It is 1.` on a scale from 0 to 100, where 100 is the best score. "
              "Respond with the integer number only.")
    assert seen == [("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": prompt}],
                                   "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}})]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        with pytest.raises(gpt.GPTError, match="no Ollama server at"):
            gpt.query_model("hi", "llama3", f"http://127.0.0.1:{s.getsockname()[1]}/api/chat")


def test_instruct_trains_writes_responses_and_judges(tmp_path, capsys, ollama):
    url, seen = ollama
    data, ckpt, out = tmp_path / "d.json", str(tmp_path / "tiny.pt"), str(tmp_path / "sft.pt")
    data.write_text(json.dumps(entries(20)))  # 17 training, 2 test, 1 validation entries
    cfg = dict(TINY, context_length=320)  # room for a prompt and 256 new tokens: the cache never slides
    gpt.save_checkpoint(ckpt, kind="gpt", config=cfg, model=tiny_model(**cfg).state_dict())
    argv = ["instruct", "--checkpoint", ckpt, "--data", str(data), "--data-dir", str(tmp_path), "--out", out,
            "--batch-size", "4", "--epochs", "1", "--lr", "1e-3", "--device", "cpu", "--ollama-url", url]
    assert gpt.main(argv + ["--judge", "mistral"]) == 1  # not pulled: said before any training
    assert capsys.readouterr() == ("", f"error: Ollama at {url} has no mistral (llama3:latest pulled): run "
                                       "`ollama pull mistral` first\n")
    assert gpt.main(argv + ["--judge", "llama3"]) == 0
    log = capsys.readouterr().out
    before = float(log.split("before training: train loss ")[1].split("val loss ")[1].split()[0])
    after = float(log.split("trained in ")[1].split("val loss ")[1].split(",")[0])
    assert after < before - 0.2 and "llama3's average score: 85.00 (of 2/2 scored responses)" in log
    responses = json.loads((tmp_path / "instruction-data-with-response.json").read_text())
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == entries(20)[17:19]
    assert len(seen) == 2 and f"score the model response `{responses[1]['model_response']}`" in (
        seen[1][1]["messages"][0]["content"])
    assert gpt.main(["sample", "--checkpoint", out, "--instruction", responses[1]["instruction"],
                     "--input", responses[1]["input"], "--max-new-tokens", "256"]) == 0
    assert capsys.readouterr().out == responses[1]["model_response"] + "\n"
    # judging an existing responses file again: no training, no generation
    assert gpt.main(["instruct", "--responses", str(tmp_path / "instruction-data-with-response.json"),
                     "--judge", "llama3", "--ollama-url", url]) == 0
    assert capsys.readouterr().out == "llama3's average score: 85.00 (of 2/2 scored responses)\n"
    assert len(seen) == 4 and seen[3] == seen[1]
    assert gpt.main(["instruct", "--responses", str(data), "--judge", "llama3", "--ollama-url", url]) == 1
    assert "entry 0 has no string 'model_response'" in capsys.readouterr().err


# ---- 10. speed: precision, fused training, benchmark ------------------------------------------

def test_bfloat16_logits_stay_close_to_float32_and_the_cache_agrees():
    model, cfg = load_fixture()
    ids = torch.randint(0, cfg["vocab_size"], (2, cfg["context_length"]), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids)
        plain = load_fixture()[0].to(torch.bfloat16)(ids)  # nn.Linear's own bfloat16 kernels
        gpt.to_dtype(model, "cpu", "bfloat16")
        low = model(ids)
    assert model.tok_emb.weight.dtype == torch.bfloat16 and low.dtype == torch.bfloat16
    assert isinstance(model.out_head, gpt.PackedLinear) == torch.ops.mkldnn._is_mkldnn_bf16_supported()
    # measured 0.087-0.116 over 4 seeds (float16: 0.046-0.065); these logits have std 1.2, max 4.9
    assert (low.float() - exact).abs().max() <= 0.15
    assert (low.float() - plain.float()).abs().max() <= 0.02  # packing only changes the layout
    prompt = ids[:1, :5]
    assert torch.equal(gpt.generate(model, prompt, 70, 64), gpt.generate(model, prompt, 70, 64, use_cache=False))


def test_fused_optimizer_keeps_the_plain_float32_losses():
    x = torch.randint(0, 50257, (2, 33), generator=torch.Generator().manual_seed(0))
    runs = []
    for fast in (False, True):
        model = tiny_model(seed=1, drop_rate=0.1).train()
        torch.manual_seed(5)
        optimizer = (gpt.make_optimizer(model, "cpu", 1e-3, 0.1) if fast else
                     torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1))
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            loss = gpt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu")
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        runs.append(losses)
    assert runs[1][0] == runs[0][0]  # step 1: bit for bit
    assert runs[1] == pytest.approx(runs[0], abs=1e-5)


def test_measuring_functions(monkeypatch, capsys):
    cpu = torch.device("cpu")
    assert 1e8 < gpt.matmul_flops(cpu, n=256, calls=3) < 1e14
    assert 1e8 < gpt.memory_bandwidth(cpu, mib=16, calls=3) < 1e13
    cfg = gpt.GPT_CONFIG_124M
    assert gpt.training_flops_per_token(cfg, 256) == 6 * (12 * 12 * 768 ** 2 + 50257 * 768) + 12 * 12 * 768 * 256
    model = tiny_model()
    assert gpt.decode_bytes_per_token(model) == 4 * (sum(p.numel() for p in model.parameters()) - 32 * 32 - 50257 * 32)
    model.out_head.weight = model.tok_emb.weight
    assert gpt.decode_bytes_per_token(model) == 4 * (sum(p.numel() for p in model.parameters()) - 32 * 32)
    monkeypatch.setitem(gpt.GPT2_SIZES, "tiny", {"emb_dim": 16, "n_layers": 1, "n_heads": 2})
    monkeypatch.setattr(gpt, "matmul_flops", lambda device: 1e11)
    monkeypatch.setattr(gpt, "memory_bandwidth", lambda device: 1e10)
    bench = ["bench", "--model", "tiny", "--device", "cpu", "--new-tokens", "5", "--steps", "1", "--rounds", "3"]
    assert gpt.main(bench) == 0
    out = capsys.readouterr().out
    assert "matmul 100 GFLOP/s, memory 10.0 GB/s" in out and "checkpoint load: " in out
    assert "generate (float32, batch 1, greedy, 5 new tokens, median of 3): with KV cache " in out
    assert "x slower)" in out and "float32 decoding" not in out
    # bfloat16 and float32 take turns; the ratio is each round's, and a wide spread is called so
    for timings, said in (([10, 12, 10, 30, 20, 25, 4], "1.25x (median of 3 interleaved rounds: 1.20x-3.00x); too wide "
                                                        "to trust: the machine is busy, rerun when it is idle\n"),
                          ([10, 12, 10, 12.5, 10, 12.2, 4], "1.22x (median of 3 interleaved rounds: 1.20x-1.25x)\n")):
        rates = iter(timings)  # float32 then bfloat16 in each round, then bfloat16 without the cache
        monkeypatch.setattr(gpt, "generation_tokens_per_s", lambda model, *args: next(rates))
        assert gpt.main(bench + ["--dtype", "bfloat16"]) == 0
        out = capsys.readouterr().out
        assert out.endswith("\nbfloat16 / float32 decoding: " + said)
        assert f"with KV cache {statistics.median(timings[1:6:2]):.1f} tokens/s ({min(timings[1:6:2]):.1f}-" in out


# ---- 11. LoRA (appendix E) --------------------------------------------------------------------

def test_lora_trains_the_books_parameter_counts():
    with torch.device("meta"):  # GPT-2's shapes, no memory, no weights
        model, keep = gpt.with_lora(gpt.GPTModel(gpt.GPT_CONFIG_124M), gpt.SpamClassifier, 16, 16)
        sft = gpt.with_lora(gpt.GPTModel(dict(gpt.GPT_CONFIG_124M, **gpt.GPT2_SIZES["355M"])), lambda m: m, 16, 16)[0]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2_666_528  # appendix E, spam
    assert sum(p.numel() for p in sft.parameters() if p.requires_grad) == 7_898_384  # exercise 7.4, 355M
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(lora) == 2 * (12 * 6 + 1) and all(n.endswith((".lora.A", ".lora.B")) for n in lora)
    assert sorted(keep) == sorted(lora + ["gpt.out_head.linear.weight", "gpt.out_head.linear.bias"])


def test_lora_matches_the_books_code_before_and_after_a_step():
    book = pytest.importorskip("llms_from_scratch.appendix_e")
    book_gpt = pytest.importorskip("llms_from_scratch.ch04").GPTModel
    x = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(0))
    logits = []
    for ours in (True, False):
        torch.manual_seed(123)
        if ours:
            model = gpt.with_lora(gpt.GPTModel(TINY), lambda m: m, 4, 16)[0]
            optimizer = gpt.make_optimizer(model, "cpu", 5e-5, 0.1)
        else:  # the book's appendix E, verbatim
            model = gpt.GPTModel(TINY)
            for param in model.parameters():
                param.requires_grad = False
            book.replace_linear_with_lora(model, rank=4, alpha=16)
            optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
        before = model(x[:, :-1])
        gpt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu").backward()
        optimizer.step()
        logits.append((before, model(x[:, :-1])))
    (ours_before, ours_after), (book_before, book_after) = logits
    assert (ours_before - book_before).abs().max() <= 1e-6 and (ours_after - book_after).abs().max() <= 1e-6
    assert (ours_after - ours_before).abs().max() > 1e-2  # the step changed the model
    torch.manual_seed(123)  # the book's whole model (its own attention) gives the same logits too
    book_model = book_gpt(TINY).requires_grad_(False)
    book.replace_linear_with_lora(book_model, rank=4, alpha=16)
    assert (book_model(x[:, :-1]) - ours_before).abs().max() <= 1e-6


def test_merged_lora_gives_the_unmerged_logits_at_the_base_cost():
    model = tiny_model()
    model.out_head.weight = model.tok_emb.weight  # tied, as GPT-2 loads
    torch.nn.init.normal_(model.tok_emb.weight, std=0.02)  # as GPT-2 was: logits of order 1, not 30
    x = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(x)
        n_base = sum(p.numel() for p in model.parameters())
        gpt.with_lora(model, lambda m: m, 4, 16)
        for name, p in model.named_parameters():
            if name.endswith("lora.B"):
                p.normal_(std=1e-2)  # as if trained
        unmerged = model(x)
        merged = gpt.merge_lora(model)(x)
    assert (unmerged - base).abs().max() > 1 and (merged - unmerged).abs().max() <= 1e-5  # measured 1.4e-6
    assert {type(m) for m in model.modules()}.isdisjoint({gpt.LinearWithLoRA, gpt.LoRALayer})
    assert sum(p.numel() for p in model.parameters()) == n_base + 50257 * 32  # out_head untied, nothing else


def test_spam_lora_saves_only_the_adapter_classifies_and_refuses_a_wrong_base(tmp_path, capsys):
    write_sms(tmp_path / "SMSSpamCollection")
    lm, out = str(tmp_path / "lm.pt"), str(tmp_path / "spam.pt")
    gpt.save_checkpoint(lm, kind="gpt", config=TINY, model=tiny_model().state_dict())
    assert gpt.main(["spam", "--checkpoint", lm, "--data-dir", str(tmp_path), "--out", out, "--lora", "4",
                     "--lr", "1e-2", "--epochs", "4", "--device", "cpu"]) == 0
    log = capsys.readouterr().out
    assert "training 4,744 of 1,639,338 parameters (LoRA rank 4, alpha 16)" in log and "train accuracy 100.00%" in log
    ckpt = gpt.load_checkpoint(out, kind="spam")
    assert ckpt["lora"] == {"rank": 4, "alpha": 16, "base": {"model": None, "checkpoint": lm, "fingerprint":
                                                              gpt.fingerprint(gpt.load_checkpoint(lm)["model"])}}
    assert len(ckpt["model"]) == 2 * (2 * 6 + 1) + 2 and all(
        ".lora." in name or name.startswith("gpt.out_head.linear.") for name in ckpt["model"])
    assert os.path.getsize(out) < os.path.getsize(lm) / 50
    unmerged = gpt.with_lora(gpt.build_model(TINY, gpt.load_checkpoint(lm)["model"], lm), gpt.SpamClassifier, 4, 16)[0]
    unmerged.load_state_dict(ckpt["model"], strict=False)
    with torch.no_grad():
        p_spam = torch.softmax(unmerged.eval()(gpt.collate_spam(gpt.encode_sms(
            [(0, SPAM[3]), (0, HAM[5])], gpt.get_tokenizer(), 32))[0])[:, -1], -1)[:, 1].tolist()
    assert gpt.main(["spam", "--out", out, "--classify", SPAM[3], "--classify", HAM[5]]) == 0
    assert capsys.readouterr().out == (f"spam (spam probability {p_spam[0]:.3f}): {SPAM[3]}\n"
                                       f"not spam (spam probability {p_spam[1]:.3f}): {HAM[5]}\n")
    gpt.save_checkpoint(lm, kind="gpt", config=TINY, model=tiny_model(seed=1).state_dict())  # another base
    before = snapshot(tmp_path)
    assert gpt.main(["spam", "--out", out, "--classify", SPAM[3]]) == 1
    assert capsys.readouterr().err == (f"error: {out}: its base, {lm}, is not the model this adapter was trained on "
                                       "(their fingerprints differ); put that model back there\n")
    assert snapshot(tmp_path) == before


def test_instruct_lora_saves_the_adapter_and_epochs_0_loads_it_on_its_base(tmp_path, capsys):
    data, ckpt, out = tmp_path / "d.json", str(tmp_path / "tiny.pt"), str(tmp_path / "sft.pt")
    data.write_text(json.dumps(entries(10)))  # 8 training, 1 test, 1 validation entry
    cfg = dict(TINY, context_length=320)
    gpt.save_checkpoint(ckpt, kind="gpt", config=cfg, model=tiny_model(**cfg).state_dict())
    run = ["instruct", "--data", str(data), "--data-dir", str(tmp_path), "--batch-size", "4", "--device", "cpu"]
    assert gpt.main(run + ["--checkpoint", ckpt, "--out", out, "--epochs", "1", "--lr", "1e-2", "--lora", "2"]) == 0
    log = capsys.readouterr().out
    assert "training 102,882 of 3,354,850 parameters (LoRA rank 2, alpha 16)" in log
    responses = (tmp_path / "instruction-data-with-response.json").read_text()
    assert set(gpt.load_checkpoint(out)["model"]) == {f"{name}.lora.{ab}" for name, _ in tiny_model().named_modules()
                                                      if name.endswith(("W_query", "W_key", "W_value", "out_proj",
                                                                        "layers.0", "layers.2", "out_head"))
                                                      for ab in "AB"}
    assert gpt.main(run + ["--checkpoint", out, "--epochs", "0"]) == 0  # base + adapter, merged, as `sample` loads
    assert log.split(" | val loss ")[1] == capsys.readouterr().out.split(" | val loss ")[1]
    assert (tmp_path / "instruction-data-with-response.json").read_text() == responses
