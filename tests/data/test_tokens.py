import numpy as np
import pytest
import torch

from adl_cli.data.corpus import load_documents
from adl_cli.data.tokenizer import Tokenizer, make_tokenizer
from adl_cli.data.tokens import DataSection, WindowBatches, load_tokens
from adl_cli.errors import AdlError


def test_global_batch_does_not_depend_on_the_split():
    tokens = np.arange(5000) % 251
    one = WindowBatches(tokens, 16, 4, grad_accum=2, seed=5)
    two = WindowBatches(tokens, 16, 4, grad_accum=1, seed=5)
    for step in (0, 7):
        a = torch.cat([one(step, m, 0, 1)[0] for m in range(2)])
        b = torch.cat([two(step, 0, r, 2)[0] for r in range(2)])
        assert torch.equal(a, b)
    x, y = one(3, 0, 0, 1)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by one
    assert not torch.equal(one(0, 0, 0, 1)[0], one(1, 0, 0, 1)[0])


def test_builtin_corpora_are_offline_and_real():
    pydoc = load_documents("pydoc")
    assert sum(map(len, pydoc)) > 300_000 and "with" in " ".join(pydoc[:50])
    stdlib = load_documents("stdlib")
    assert len(stdlib) > 100 and any("def " in d for d in stdlib[:20])


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(AdlError, match="corpus not found"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(AdlError, match="matches no files"):
        load_documents(str(tmp_path / "*.txt"))


def test_token_cache_and_split(small_corpus):
    sec = DataSection(corpus=str(small_corpus), tokenizer="bytes", val_fraction=0.1)
    data = load_tokens(sec)
    assert data.tokenizer.kind == "bytes"
    n = data.n_tokens
    assert len(data.val) == int(n * 0.1)
    text = small_corpus.read_text()
    assert bytes(np.asarray(data.train[:200], dtype=np.uint8)).decode() == text.encode()[:200].decode()
    again = load_tokens(sec)  # from the cache
    assert np.array_equal(np.asarray(again.val), np.asarray(data.val))
    assert abs(data.val_bytes_per_token - 1.0) < 0.01


def test_bpe_tokenizer_round_trip_and_run_folder(tmp_path, small_corpus):
    text = small_corpus.read_text()
    tok = make_tokenizer("bpe", text=text, corpus_key="k", vocab_size=400)
    assert tok.vocab_size == 400
    sample = "The with statement — ünïcødé ✓ 中文"
    assert tok.decode(tok.encode(sample)) == sample
    assert len(tok.encode(text[:2000])) < 2000 * 0.7  # BPE compresses English
    tok.save(tmp_path)
    again = Tokenizer.load(tmp_path)
    assert list(again.encode(sample)) == list(tok.encode(sample))


def test_gpt2_without_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(AdlError, match="not in tiktoken's cache.*TIKTOKEN_CACHE_DIR"):
        make_tokenizer("gpt2")


def test_special_tokens_count_zero_bytes_for_every_tokenizer():
    from adl_cli.data import bpe
    from adl_cli.data.tokenizer import Tokenizer, make_tokenizer

    text = "def f(x):\n    return x + 1\n" * 20
    for tok in (make_tokenizer("bytes"), make_tokenizer("bpe", text=text, corpus_key="t-special", vocab_size=262)):
        ids = list(tok.encode("hello world"))
        n = tok.token_bytes(ids)
        assert n == len("hello world".encode())
        assert tok.token_bytes(ids + [tok.eot_id] + ids) == 2 * n, tok.kind
