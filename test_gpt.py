"""Tests for gpt.py, offline, on tiny models, against references: the book's code (testdata), HF, uninterrupted runs."""
import functools
import http.server
import importlib.util
import io
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

HERE = Path(__file__).resolve().parent
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(HERE.parent / "shared" / "tiktoken-cache"))
os.environ["REQUESTS_CA_BUNDLE"] = str(HERE / "testdata" / "localhost.pem")  # the local server's own certificate

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import gpt  # noqa: E402

gpt.VERDICT_URL = gpt.INSTRUCTION_URL = "https://127.0.0.1:9/none"  # no test goes online: a file not here fails
gpt.SMS_URLS = gpt.GPT2_BASE_URLS = ("https://127.0.0.1:9",)
VERDICT, TESTDATA, BOOK = HERE / "the-verdict.txt", HERE / "testdata", torch.load(HERE / "testdata" / "book.pt")
TINY = dict(gpt.GPT_CONFIG_124M, context_length=32, emb_dim=32, n_layers=2, n_heads=2, drop_rate=0.0)
TINY_TRAIN = ["--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "32", "--eval-freq", "20"]


def snapshot(folder):
    return {p: p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def weights_differ(a, b):
    assert list(a["model"]) == list(b["model"])  # the same names: no DDP prefixes
    return max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])


@pytest.fixture
def serve(tmp_path):
    """A local HTTPS server over a folder (/to-http/X redirects to plain HTTP, /to-here/X to /X, /lying/X claims 10
    bytes more) and a fake Ollama with llama3 (its chats score "85"); yields (url, paths requested, chats)."""
    root, seen, chats = tmp_path / "www", [], []
    shutil.copytree(TESTDATA / "www", root)  # Ollama's list of models, api/tags
    shutil.copytree(TESTDATA / "gpt2-tiny", root / "124M")  # OpenAI's files of GPT-2 "124M"

    class Handler(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            seen.append(self.path)
            head, _, rest = self.path[1:].partition("/")
            if head not in ("to-http", "to-here", "lying"):
                return super().send_head()
            body = (root / rest).read_bytes() if head == "lying" else b""
            self.send_response(200 if head == "lying" else 302)
            if body:
                self.send_header("Content-Length", str(len(body) + 10))
            else:
                self.send_header("Location", f"http://127.0.0.1:9/{rest}" if head == "to-http" else f"/{rest}")
            self.end_headers()
            return io.BytesIO(body)

        def do_POST(self):
            chats.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b'{"message": {"content": "8"}}\n{"message": {"content": "5"}}\n')

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(TESTDATA / "localhost.pem", TESTDATA / "localhost.key")
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"https://127.0.0.1:{server.server_address[1]}", seen, chats
    server.shutdown()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The book's chapter 5 run, shrunk as testdata/book.pt has it: one epoch of a tiny model on the-verdict.txt."""
    path = tmp_path_factory.mktemp("trained") / "tiny.pt"
    assert gpt.main(["train", *TINY_TRAIN, "--epochs", "1", "--out", str(path)]) == 0
    return str(path)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """GPT-2 as load-gpt2 saves it from the TF fixture (vocabulary grown to GPT-2's): views.pt, its weights views of
    OpenAI's matrices as loading makes them; copy.pt, made contiguous; testdata/fine-tune's 32 SMS, 20 instructions."""
    folder = tmp_path_factory.mktemp("gpt2")
    shutil.copytree(TESTDATA / "fine-tune", folder, dirs_exist_ok=True)
    (folder / "sms-spam.tsv").rename(folder / "SMSSpamCollection")  # where spam --data-dir looks for it
    shutil.copytree(TESTDATA / "gpt2-tiny", folder / "124M")
    assert gpt.main(["load-gpt2", "124M", "--models-dir", str(folder), "--out", str(folder / "g.pt"), "--prompt",
                     " the"]) == 0
    ckpt = gpt.load_checkpoint(str(folder / "g.pt"))
    wte = torch.cat([ckpt["model"]["tok_emb.weight"], 0.02 * torch.randn(50257 - 512, 16)])
    views = dict(ckpt, config=dict(ckpt["config"], vocab_size=50257),
                 model=dict(ckpt["model"], **{"tok_emb.weight": wte, "out_head.weight": wte}))
    assert not views["model"]["trf_blocks.0.att.W_query.weight"].is_contiguous()
    gpt.save_checkpoint(str(folder / "views.pt"), views)
    contiguous = {name: tensor.contiguous() for name, tensor in views["model"].items()}
    gpt.save_checkpoint(str(folder / "copy.pt"), dict(views, model=contiguous))
    return folder


def test_the_books_text_tokens_model_attention_sampling_schedule_and_lora(monkeypatch):
    text, tok = VERDICT.read_text(encoding="utf-8"), gpt.get_tokenizer()
    assert len(text) == 20479 and len(tok.encode(text)) == 5145
    book = BOOK["gpt"]  # the book's own GPTModel (its LayerNorm, GELU, ...), with the masks ours builds when needed
    ours = gpt.GPTModel(book["cfg"]).eval()
    ours.load_state_dict(book["state_dict"], strict=True)
    assert (ours(book["input_ids"]) - book["logits"]).abs().max() <= 1e-5
    model, idx = gpt.GPTModel(TINY).eval(), torch.tensor([[1, 2, 3]])  # any weights
    greedy = gpt.generate(model, idx, 12, 32)
    assert torch.equal(greedy, gpt.generate(model, idx, 12, 32, temperature=1.0, top_k=1))
    assert gpt.generate(model, idx, 5, 32, eos_id=greedy[0, 3].item()).tolist() == [[1, 2, 3]]
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert {gpt.next_token(logits, temperature=1.0, top_p=0.75).item() for _ in range(300)} == {0, 1}
    assert gpt.learning_rate(0, 100, 1e-3, warmup_steps=10) == pytest.approx(1e-4)
    assert gpt.learning_rate(100, 100, 1e-3, 10, min_lr=1e-4) == pytest.approx(1e-4)
    classifier, (batch, _) = gpt.SpamClassifier(gpt.GPTModel(TINY)), gpt.collate_spam([([5, 6, 7, 8], 0), ([9, 10], 1)])
    alone = torch.cat([classifier.gpt(torch.tensor([row]))[:, -1:] for row in ([5, 6, 7, 8], [9, 10])])
    assert torch.allclose(classifier(batch), alone, atol=1e-5)  # each message's last real token answers
    inputs, targets = gpt.custom_collate_fn([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
    assert targets.tolist() == [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]
    entry = {"instruction": "Name the number 1.", "input": "1 + 0", "output": "The number is 1."}
    n_prompt, ids = gpt.InstructionDataset([entry], tok, mask_instruction=True)[0]
    assert gpt.custom_collate_fn([(n_prompt, ids)])[1][0].tolist() == [-100] * (n_prompt - 1) + ids[n_prompt:] + [50256]
    for fused in (True, False):  # attention: the masked softmax, written out or in one kernel
        monkeypatch.setattr(gpt.MultiHeadAttention, "fused", fused)
        torch.manual_seed(1)
        att = gpt.MultiHeadAttention(d_in=12, d_out=12, context_length=8, dropout=0.0, num_heads=3).eval()
        x, (b, T, h, d) = torch.randn(2, 7, 12), (2, 7, 3, 4)
        q, k, v = (W(x).view(b, T, h, d).transpose(1, 2) for W in (att.W_query, att.W_key, att.W_value))
        scores = (q @ k.transpose(2, 3) / d ** 0.5).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -torch.inf)
        assert (att(x) - att.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, T, 12))).abs().max() < 1e-5
        # Chunked prefill: 5 tokens cached, then 3 at once, then 1 (is_causal alone would align the mask top-left)
        idx = torch.randint(0, 50257, (2, 9), generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)
        model = gpt.GPTModel(TINY).eval()
        with torch.no_grad():
            full, caches = model(idx), [gpt.KVCache(32) for _ in model.trf_blocks]
            for start, end in ((0, 5), (5, 8), (8, 9)):
                assert (model(idx[:, start:end], caches)[:, -1] - full[:, end - 1]).abs().max() <= 1e-5
        for n, new in ((5, 30), (20, 40)):  # the second runs past the context
            idx = torch.randint(0, 50257, (2, n), generator=torch.Generator().manual_seed(0))
            assert torch.equal(gpt.generate(model, idx, new, 32), gpt.generate(model, idx, new, 32, use_cache=False))
    book, x = BOOK["lora"], BOOK["lora"]["input_ids"]  # the book's appendix E: freeze, LoRA on every nn.Linear
    torch.manual_seed(123)
    model = gpt.GPTModel(book["cfg"]).requires_grad_(False)
    gpt.replace_linear_with_lora(model, book["rank"], book["alpha"])
    optimizer = gpt.make_optimizer(model, "cpu", 5e-5, 0.1)
    gpt.calc_loss_batch(x[:, :-1], x[:, 1:], model, "cpu").backward()
    optimizer.step()
    logits = model(x[:, :-1])
    assert (logits[..., :256] - book["logits"]).abs().max() <= 1e-5
    merged = gpt.merge_lora(model)
    assert (merged(x[:, :-1]) - logits).abs().max() <= 1e-5
    assert not any(isinstance(m, (gpt.LinearWithLoRA, gpt.LoRALayer)) for m in merged.modules())


def test_load_gpt2_reads_openais_files_as_huggingface_does_and_downloads_them_once(serve, tmp_path):
    base, seen, _ = serve
    args = ["load-gpt2", "124M", "--base-url", f"{base}/to-here", "--models-dir", str(tmp_path / "models"),
            "--out", str(tmp_path / "g.pt"), "--prompt", " the, and."]
    assert gpt.main(args) == 0 and seen == [p for n in gpt.GPT2_FILES for p in (f"/to-here/124M/{n}", f"/124M/{n}")]
    assert gpt.main(args + ["--force"]) == 0 and len(seen) == 6  # everything present: not one request
    expected, ckpt = np.load(TESTDATA / "gpt2-tiny.expected.npz"), gpt.load_checkpoint(str(tmp_path / "g.pt"))
    model = gpt.build_model(ckpt["config"], ckpt["model"], "g.pt").eval()
    assert model.out_head.weight is model.tok_emb.weight  # tied, as GPT-2 is
    assert (model(torch.from_numpy(expected["input_ids"])) - torch.from_numpy(expected["logits"])).abs().max() < 1e-4
    tensors = gpt.read_tf_checkpoint(*(str(TESTDATA / "multiblock" / f"model.ckpt.{ext}")
                                       for ext in ("index", "data-00000-of-00001")))
    # Written by TensorFlow with 1,150 long names, so its index has two data blocks; numpy redraws the values
    assert list(tensors) == [f"v{i:04d}/" + "abcdefghij" * 22 for i in range(1150)]
    rng = np.random.default_rng(0)
    for i, t in enumerate(tensors.values()):
        shape = [] if i % 3 == 0 else [i % 5] if i % 3 == 1 else [2, i % 4]
        np.testing.assert_array_equal(t, rng.standard_normal(shape).astype(np.float32))


def test_train_gives_the_books_losses_and_sample_and_saves_what_it_says(trained, tmp_path, capsys, monkeypatch):
    book, folder, ckpt = BOOK["train"], Path(trained).parent, gpt.load_checkpoint(trained)
    header, *rows = (folder / "tiny-losses.csv").read_text().splitlines()
    rows = np.array([row.split(",") for row in rows], dtype=float)  # at steps 1, 21, ...: the book's 0, 20, ...
    assert header == "epoch,step,tokens_seen,train_loss,val_loss" and rows[:, 1].tolist() == [1, 21, 41, 61]
    losses = [book["train_losses"], book["val_losses"]]
    assert rows[:, 2].tolist() == book["tokens_seen"] and np.allclose(rows[:, 3:].T, losses, atol=1e-4)
    assert ckpt["progress"] == {"epoch": 1, "batch": 0, "step": book["steps"], "tokens_seen": book["steps"] * 64}
    text, tok = VERDICT.read_text(encoding="utf-8"), gpt.get_tokenizer()
    (tmp_path / "books" / "b").mkdir(parents=True)  # a folder: each *.txt below it, by path, and <|endoftext|>
    for name, doc in (("a.txt", text[:9000]), ("b/c.txt", text[9000:]), ("b/notes.md", "not a document")):
        (tmp_path / "books" / name).write_text(doc)
    books = gpt.corpus([str(tmp_path / "books")])
    train, val = gpt.token_cache(books, str(tmp_path), piece=300)  # in ~60 pieces tokenized apart: the book's split
    assert train.tolist() == tok.encode(text[:8100]) + [50256] + tok.encode(text[9000:19331])  # of each document
    assert val.tolist() == tok.encode(text[8100:9000]) + [50256] + tok.encode(text[19331:])  # (90% | 10%)
    with monkeypatch.context() as m:  # the same corpus again: read from the cache, not tokenized
        m.setattr(gpt, "get_tokenizer", None)
        assert gpt.token_cache(books, str(tmp_path))[1].tolist() == val.tolist()
    plotted = importlib.util.find_spec("matplotlib") is not None  # optional: the plot only where it is installed
    assert sorted(os.listdir(folder)) == sorted(["tiny.pt", "tiny-losses.csv"] + ["tiny-losses.png"] * plotted)
    umask = os.umask(0o022)
    os.umask(umask)  # each file as open() makes it: readable by the group where the umask says so
    assert {(folder / name).stat().st_mode & 0o777 for name in os.listdir(folder)} == {0o666 & ~umask}
    model = gpt.build_model(ckpt["config"], ckpt["model"], trained).eval()
    assert gpt.main(["sample", "--checkpoint", trained, "--prompt", "Every effort", "--max-new-tokens", "5"]) == 0
    expected = gpt.generate(model, gpt.text_to_token_ids("Every effort", tok), 5, 32, eos_id=tok.eot_token)
    assert capsys.readouterr().out == gpt.token_ids_to_text(expected, tok) + "\n"
    gpt.generate_and_print_sample(model, tok, "cpu", "Every effort moves you")  # as the epoch's end printed it
    assert capsys.readouterr().out == book["sample"] + "\n"
    saves, light = [], str(tmp_path / "light.pt")
    monkeypatch.setattr(gpt, "save_checkpoint", lambda *a, real=gpt.save_checkpoint: saves.append(a) or real(*a))
    monkeypatch.setattr(gpt, "SAVE_SECONDS", -1)  # a save after every step: the last one is always that old
    assert gpt.main(["train", *TINY_TRAIN, "--max-steps", "3", "--out", light, "--weights-only"]) == 0
    assert len(saves) == 3 and set(gpt.load_checkpoint(light)) == {"kind", "config", "run", "model", "history"}
    before = snapshot(tmp_path)  # a save that fails (here in torch.save's writer) keeps the previous file, no temp
    monkeypatch.setattr(gpt.torch, "save", mock.Mock(side_effect=RuntimeError("[enforce fail] pos 64")))
    assert gpt.main(["train", *TINY_TRAIN, "--max-steps", "1", "--out", light, "--force"]) == 1
    assert capsys.readouterr().err == f"error: cannot save {light} ([enforce fail] pos 64); the previous {light} is " \
                                      "kept\n" and snapshot(tmp_path) == before
    read_end, write_end = os.pipe()
    os.close(read_end)  # `| head` has exited: quiet, 128 + SIGPIPE
    monkeypatch.setattr(sys, "stdout", open(write_end, "w"))
    assert gpt.main(["sample", "--checkpoint", trained, "--max-new-tokens", "3"]) == 141


@pytest.mark.parametrize("signum, name, count, where, samples", [
    (signal.SIGINT, "calc_loss_batch", 11, "epoch 1, step 3", 0),
    (signal.SIGTERM, "calc_loss_batch", 15, "the end of epoch 1, step 5", 0),
    (signal.SIGINT, "generate_and_print_sample", 1, "the end of epoch 1, step 5", 1),
    (signal.SIGINT, "calc_loss_batch", 25, "the end of epoch 2, step 10", 1)])
def test_a_stop_saves_and_the_command_it_prints_continues_to_the_whole_run(tmp_path, monkeypatch, capsys,
                                                                           signum, name, count, where, samples):
    """Stopped in step 3, at the end of epoch 1 (its sample not printed), during that sample, or in the last step (the
    run is whole): the command printed ends where the run that never stopped ends, with no more work done."""
    monkeypatch.chdir(tmp_path)
    Path("story.txt").write_text(VERDICT.read_text(encoding="utf-8")[:3000], encoding="utf-8")  # 5 steps an epoch
    run = ["train", *TINY_TRAIN, "--drop-rate", "0.1", "--data", "story.txt", "--warmup-steps", "4", "--cosine",
           "--grad-clip", "0.5", "--grad-accum", "2", "--epochs", "2", "--out"]
    assert gpt.main([*run, "whole.pt"]) == 0
    calls, real = [], getattr(gpt, name)  # a step takes 2 losses, the evaluation after step 1 takes 6

    def call_then_stop(*args):  # a real Ctrl-C or kill
        calls.append(args)
        if len(calls) == count:
            os.kill(os.getpid(), signum)
        return real(*args)
    monkeypatch.setattr(gpt, name, call_then_stop)
    capsys.readouterr()
    assert gpt.main([*run, "stopped.pt"]) == 128 + signum
    out, err = capsys.readouterr()
    assert err.splitlines()[-1].startswith(f"stopped at {where}; saved stopped.pt (")  # not an error
    assert out.count("Every effort") == samples  # the samples of the epochs that ended before the stop
    monkeypatch.setattr(gpt, name, real)
    if count != 25:
        command, progress = err.split("continue with `")[1][:-2], gpt.load_checkpoint("stopped.pt")["progress"]
        assert command == f"python gpt.py {' '.join(run)} stopped.pt --resume" and gpt.main(command.split()[2:]) == 0
        assert f"resuming at epoch {progress['epoch'] + 1}, step {progress['step']}\n" in capsys.readouterr().out
    a, b = gpt.load_checkpoint("whole.pt"), gpt.load_checkpoint("stopped.pt")
    assert a["progress"] == b["progress"] and a["history"] == b["history"] and weights_differ(a, b) == 0
    assert Path("whole-losses.csv").read_text() == Path("stopped-losses.csv").read_text()


def test_two_processes_accumulating_stopped_by_sigterm_hold_one_process_weights(tmp_path):
    """2 gloo processes x batch 1 x 2 batches a step = 1 process x batch 4, SIGTERM sent to the whole job."""
    run = ["train", *TINY_TRAIN, "--drop-rate", "0", "--eval-iter", "2", "--cache-dir", str(tmp_path), "--out"]
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            str(HERE / "gpt.py"), *run, str(tmp_path / "ddp.pt"), "--batch-size", "1", "--grad-accum",
                            "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    for line in job.stdout:  # only rank 0 prints
        if line.startswith("Ep 1 (Step 000001)"):
            os.killpg(job.pid, signal.SIGTERM)
    err, stopped = job.communicate()[1], gpt.load_checkpoint(str(tmp_path / "ddp.pt"))
    step = stopped["progress"]["step"]
    assert f"stopped at epoch 1, step {step}; saved {tmp_path / 'ddp.pt'}" in err and err.count("stopped at") == 1 \
        and "continue with `torchrun --nproc_per_node=2 gpt.py train" in err and "143.0" not in err  # exit(143)
    assert gpt.main([*run, str(tmp_path / "one.pt"), "--batch-size", "4", "--max-steps", str(step)]) == 0
    one = gpt.load_checkpoint(str(tmp_path / "one.pt"))
    assert one["progress"] == stopped["progress"] and weights_differ(stopped, one) <= 1e-5


@pytest.mark.parametrize("command, flags", [("spam", ["--trainable", "all"]), ("spam", ["--lora", "2"]),
                                            ("instruct", ["--max-steps", "2", "--batch-size", "4"])])
def test_fine_tuning_steps_as_from_contiguous_weights_saves_at_its_end_and_is_used(gpt2, tmp_path, serve, capsys,
                                                                                   command, flags):
    """From views.pt, AdamW's fused kernel once updated the wrong elements of the views: it must end where copy.pt
    ends. A stop before the end saves nothing, and says so; the end saves the model alone, LoRA merged into it."""
    url, _, chats = serve  # the 20 instructions: 17 to train on, 2 to test, 1 to validate
    data = ["--data-dir", str(gpt2)] if command == "spam" else ["--data", str(gpt2 / "instructions.json"),
                                                                "--judge", "llama3", "--ollama-url", url]
    run = [command, *flags, "--epochs", "1", "--lr", "1e-3", *data, "--out"]
    with pytest.MonkeyPatch.context() as m:
        m.setattr(gpt, "calc_loss_batch", lambda *a, real=gpt.calc_loss_batch: os.kill(os.getpid(), 2) or real(*a))
        assert gpt.main([*run, str(tmp_path / "s.pt"), "--checkpoint", str(gpt2 / "views.pt")]) == 130
    assert f"stopped at epoch 1, step 1; nothing saved: `{command}` saves only at its end" in capsys.readouterr().err
    for name in ("views", "copy"):
        assert gpt.main([*run, str(tmp_path / f"{name}.pt"), "--checkpoint", str(gpt2 / f"{name}.pt")]) == 0
    a, b = (gpt.load_checkpoint(str(tmp_path / f"{name}.pt"), "spam" * (command == "spam") or "gpt")
            for name in ("views", "copy"))
    base, prefix = gpt.load_checkpoint(str(gpt2 / "views.pt"))["model"], "gpt." * (command == "spam")
    changed = {k for k in base if not torch.equal(base[k], a["model"][prefix + k])}
    assert weights_differ(a, b) <= 1e-6 and "trf_blocks.0.att.W_query.weight" in changed and not os.path.exists(
        tmp_path / "s.pt") and ("tok_emb.weight" in changed) == ("--lora" not in flags)  # LoRA: every nn.Linear
    assert set(a) == {"kind", "config", "model", *["trainable"] * (command == "spam")}  # the model alone
    out = capsys.readouterr().out
    if command == "spam":  # the book's split; classify with the model it saved
        assert gpt.prepare_sms_spam(str(gpt2)) == {k: list(map(tuple, v)) for k, v in BOOK["spam_split"].items()}
        texts = ["WINNER!! Claim your free prize now", "ok see you at home later"]
        assert gpt.main(["spam", "--out", str(tmp_path / "views.pt"), "--classify", texts[0], "--classify",
                         texts[1]]) == 0
        model = gpt.build_model(a["config"], a["model"], "", lambda cfg: gpt.SpamClassifier(gpt.GPTModel(cfg))).eval()
        inputs = gpt.collate_spam(gpt.encode_sms([(0, text) for text in texts], gpt.get_tokenizer(), 64))[0]
        p = torch.softmax(model(inputs)[:, -1], -1)[:, 1].tolist()
        assert capsys.readouterr().out == "".join(f"{'spam' if p > 0.5 else 'not spam'} (spam probability {p:.3f}): "
                                                  f"{t}\n" for p, t in zip(p, texts))
        return
    assert "llama3's average score: 85.00 (of 2/2 scored responses)" in out  # the test entries, in order
    responses = json.loads((tmp_path / "views-responses.json").read_text())
    entries = json.loads((gpt2 / "instructions.json").read_text())
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == entries[17:19]
    prompt = (f"Given the input `{gpt.format_input(entries[18])}` and correct output `The number is 18.`, score "
              f"the model response `{responses[1]['model_response']}` on a scale from 0 to 100, where 100 is the best "
              "score. Respond with the integer number only.")  # the book's
    assert chats[-1] == {"model": "llama3", "messages": [{"role": "user", "content": prompt}],
                         "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    assert gpt.main(["sample", "--checkpoint", str(tmp_path / "views.pt"), "--instruction", responses[1]["instruction"],
                     "--input", responses[1]["input"], "--max-new-tokens", "256"]) == 0
    assert capsys.readouterr().out == responses[1]["model_response"] + "\n"
    assert gpt.main(["instruct", "--responses", str(tmp_path / "views-responses.json"), "--judge", "llama3",
                     "--ollama-url", url]) == 0  # judging again: no training, no generation
    assert capsys.readouterr().out == "llama3's average score: 85.00 (of 2/2 scored responses)\n" and len(chats) == 6


def test_every_mistake_is_one_short_line_and_changes_nothing_and_help_shows_defaults(tmp_path, trained, serve,
                                                                                     monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = serve[0]
    shutil.copytree(TESTDATA / "gpt2-tiny", "bad/124M")
    shutil.copytree(TESTDATA / "mistakes", ".", dirs_exist_ok=True)  # bad inputs; bad/124M's hparams.json lacks keys
    shutil.copy(TESTDATA / "fine-tune" / "sms-spam.tsv", "bad/SMSSpamCollection")  # 16 to train on: a step of 17?
    ckpt = gpt.load_checkpoint(trained)
    for name, state in (("otherconfig", dict(ckpt, config=dict(ckpt["config"], emb_dim=64))),
                        ("weights", {k: ckpt[k] for k in ("kind", "config", "run", "model", "history")}),
                        ("twoprocs", dict(ckpt, run=dict(ckpt["run"], processes=2)))):
        gpt.save_checkpoint(f"{name}.pt", state)
    torch.save({"kind": "gpt", "config": TINY, "model": os.system}, "evil.pt")  # pickled code: never loaded
    sample, spam = ["sample", "--checkpoint"], ["spam", "--checkpoint", trained, "--data-dir"]
    instruct = ["instruct", "--checkpoint", trained]
    train = ["train", *TINY_TRAIN, "--cache-dir", f"{tmp_path}-cache", "--out"]  # the cache is no output
    load, wrong = ["load-gpt2", "124M", "--out", "g.pt", "--models-dir"], []
    for argv, code, mention in [
        (sample + ["notours.pt"], 1, "notours.pt: not a model checkpoint of gpt.py (not the zip file that torch.save"),
        (sample + ["evil.pt"], 1, "evil.pt: not a model checkpoint of gpt.py (Weights only load failed."),
        (sample + ["otherconfig.pt"], 1, "otherconfig.pt: not a model that fits its config (Error(s) in loading"),
        (sample + ["gone.pt"], 1, "gone.pt: no such checkpoint; `python gpt.py train` or `python gpt.py load-gpt2"),
        (["train", "--out", "weights.pt", "--resume"], 1, "(--weights-only saves none) (no 'optimizer')"),
        (["train", "--out", "twoprocs.pt", "--resume"], 1, "twoprocs.pt was trained by 2 process(es); resume it with"),
        (load + ["bad"], 1, "bad/124M: not OpenAI's GPT-2 124M, or its files do not fit each other (no 'n_ctx')"),
        (load + ["models"], 1, "/124M/hparams.json (cannot reach 127.0.0.1); put the file at models/124M/hparams"),
        (load + ["models", "--base-url", f"{base}/to-http"], 1, "(refusing a URL that is not HTTPS: http://127.0.0"),
        (load + ["models", "--base-url", f"{base}/lying"], 1, "/lying/124M/hparams.json (the connection broke off)"),
        (load + ["models", "--base-url", f"{base}/none"], 1, "/none/124M/hparams.json (HTTP 404); put the file at"),
        (spam + ["zip"], 1, "sms_spam_collection.zip: not the SMS Spam Collection zip; delete it and retry"),
        (spam + ["bad", "--batch-size", "17"], 1, "too few examples: 16 train, 2 validation, 6 test; training "),
        (instruct + ["--data", "bad.json"], 1, "bad.json: not a JSON list of objects with the strings instruction,"),
        (instruct + ["--data", "none.json", "--out", "existing.pt"], 1, "none.json: No such file"),  # inputs first
        (instruct + ["--data", "empty.json", "--mask-instruction"], 1, "too few examples: 0 train, 0 validation"),
        (["spam", "--out", "gone.pt", "--classify", " "], 1, "--classify takes a message, not an empty text"),
        (train + ["new/", "--max-steps", "1"], 1, "'new/' is a folder; name the file to write"),
        (train + ["existing.pt"], 1, "existing.pt already exists; use --force to replace it, --resume to continue it"),
        (train + ["new.pt", "--data", "latin1.txt"], 1, "latin1.txt: not UTF-8 text; convert it (iconv -t utf-8)"),
        (train + ["new.pt", "--data", "short.txt"], 1, "text too short: 91 tokens to train on and 11 to validate,"),
        (train + ["new.pt", "--emb-dim", str(2 ** 33)], 1, "out of memory on cpu; lower --batch-size"),
        (train + ["new.pt", "--lr", "inf"], 2, "argument --lr: inf is outside (0, inf]"),
        (instruct + ["--judge", "llama3", "--ollama-url", "https://127.0.0.1:9"], 1, "no Ollama server at https:"),
        (instruct + ["--judge", "mistral", "--ollama-url", base], 1, "has no mistral (llama3:latest pulled): run "),
    ]:
        before = snapshot(tmp_path)
        with pytest.raises(SystemExit) as exit:  # argparse exits by itself; so does main's code here
            sys.exit(gpt.main(argv))
        err, short = capsys.readouterr().err, 200 + len(str(tmp_path))
        if not (exit.value.code == code and err.startswith("error: ") and err.count("\n") == 1 and len(err) < short
                and mention in err) or snapshot(tmp_path) != before:
            wrong.append((argv, exit.value.code, err))
    assert not wrong, "\n".join(map(str, wrong))
    for command, default in (("sample", "checkpoints/verdict.pt"), ("spam", "124M"), ("instruct", "355M")):
        with pytest.raises(SystemExit):
            gpt.main([command, "--help"])
        assert f"(default: {default})" in " ".join(capsys.readouterr().out.split())
