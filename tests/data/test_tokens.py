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


def test_the_stdlib_test_suite_is_a_corpus_where_the_install_has_one(tmp_path, monkeypatch):
    import sysconfig

    try:
        tests = load_documents("stdlib-tests")
    except AdlError as e:  # an install without it (Debian's python3) says so
        assert "no test suite" in str(e)
    else:
        assert len(tests) >= 100 and sum("import unittest" in d for d in tests) > 50
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "support.py").write_text("x = 1\n")
    monkeypatch.setattr(sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(AdlError, match="no test suite in .*python3.X-test"):
        load_documents("stdlib-tests")


def test_missing_corpus_is_a_clear_error(tmp_path):
    with pytest.raises(AdlError, match="corpus not found"):
        load_documents(str(tmp_path / "nope.txt"))
    with pytest.raises(AdlError, match="matches no files"):
        load_documents(str(tmp_path / "*.txt"))


def test_token_cache_and_split(small_corpus):
    sec = DataSection(corpus=str(small_corpus), tokenizer="bytes", val_fraction=0.1, dedup=False)  # every byte kept
    data = load_tokens(sec)
    assert data.tokenizer.kind == "bytes"
    n = data.n_tokens
    assert abs(len(data.val) - 0.1 * n) < 0.02 * n  # one document: cut at the line break after 90% of it
    text = small_corpus.read_text()
    eot = data.tokenizer.eot_id
    train, val = np.asarray(data.train), np.asarray(data.val)
    assert train[-1] == eot and val[-1] == eot
    assert bytes(train[:-1].astype(np.uint8)).decode() + bytes(val[:-1].astype(np.uint8)).decode() == text
    assert bytes(val[:-1].astype(np.uint8)).decode().startswith("\n")
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


def test_the_held_out_split_is_whole_documents_and_never_trained_on():
    from adl_cli.data.corpus import drop_overlaps, shared_windows, split_documents

    docs = ["a" * 50, "b" * 30, "c" * 15, "d" * 5]
    assert split_documents(docs, 0.2) == (docs[:2], docs[2:])  # the cut moves to the nearest boundary
    train, val = split_documents(["x\n" * 100], 0.1)
    assert val[0] == "\nx" * 9 + "\n" and train[0] + val[0] == "x\n" * 100  # cut at the line break after 90%
    quote = "The held-out topic says exactly this, long enough to be a 64-byte window and more."
    train, dropped = drop_overlaps(["intro\n\nsome text " + quote + "\n\nafter", "clean doc"], ["held out: " + quote])
    assert dropped == 1 and train == ["intro\n\nafter", "clean doc"]
    assert shared_windows(train, ["held out: " + quote]) == (0, len(("held out: " + quote).encode()) - 63)


def test_repeated_training_paragraphs_are_trained_on_once(tmp_path):
    from adl_cli.data.corpus import dedup_paragraphs

    long = "A paragraph long enough to count as content: sixty-four bytes or more of it."
    short = '"""'
    seen: set = set()
    first, dropped = dedup_paragraphs([f"{long}\n\n{short}\n\nx", f"{short}\n\n  {long}  \n\ny"], seen=seen)
    assert first == [f"{long}\n\n{short}\n\nx", f"{short}\n\ny"] and dropped == 1  # the first kept, short ones always
    assert dedup_paragraphs([long], seen=seen) == ([], 1)  # the set carries across calls; an emptied document goes
    assert dedup_paragraphs([long, long]) == ([long], 1)
    # through load_tokens: the repeats leave the training stream, the held-out document is untouched
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(f"document {i} opens.\n\n{long}\n\nand closes {i}.")
    (tmp_path / "z.txt").write_text("held out, and nothing of it is in training.")
    with_dups, without = (load_tokens(DataSection(corpus=str(tmp_path), tokenizer="bytes", val_fraction=0.1, dedup=d)) for d in (False, True))
    assert len(with_dups.train) - len(without.train) == 2 * (len(long.encode()) + 2)  # two repeats and their blank lines
    assert np.array_equal(with_dups.val, without.val) and without.tokenizer.decode(without.train).count(long) == 1
    (tmp_path / "2.txt").write_text((tmp_path / "0.txt").read_text() + "\n\n" + (tmp_path / "1.txt").read_text())  # held out, it quotes all of training
    with pytest.raises(AdlError, match="no training text is left"):
        load_tokens(DataSection(corpus=str(tmp_path), tokenizer="bytes", val_fraction=0.45))


def test_corpus_repeat_weights_the_corpus_against_its_extras(tmp_path):
    (tmp_path / "extra.txt").write_text("extra text, read once per pass. " * 20)
    base = dict(corpus="pydoc", tokenizer="bytes", extra_train=[str(tmp_path / "extra.txt")])
    once, thrice = (load_tokens(DataSection(**base, corpus_repeat=k)) for k in (1, 3))
    extra = len(once.train) - once.own_train
    assert thrice.own_train == 3 * once.own_train and len(thrice.train) - thrice.own_train == extra
    assert np.array_equal(thrice.corpus_train[: once.own_train], once.corpus_train)
    assert np.array_equal(thrice.corpus_train[2 * once.own_train:], once.corpus_train) and np.array_equal(thrice.val, once.val)
    with pytest.raises(ValueError, match="corpus_repeat must be a whole number"):
        DataSection(corpus_repeat=0).validate()


def test_the_main_job_never_trains_on_its_held_out_topics():
    """pydoc's last topics are held out; training reads the other topics and the standard library's
    source (without pydoc_data/topics.py, which holds pydoc's text word for word, and without the
    paragraphs of other topics that quote the held-out ones): no 64-byte window of the held-out
    text appears in the training stream."""
    from adl_cli.data.corpus import drop_overlaps, shared_windows
    from adl_cli.data.tokens import split_texts
    from adl_cli.methods.pretrain import load_pretrain_recipe

    section = load_pretrain_recipe("recipes/pretrain/tiny.toml").data
    own, extra, val = split_texts(section)
    raw = own + extra
    from adl_cli.data.corpus import _stdlib_files

    assert section.corpus == "pydoc" and "stdlib" in section.extra_train
    assert not any("pydoc_data" in p.parts for p in _stdlib_files())
    train, dropped = drop_overlaps(raw, val)
    shared, total = shared_windows(train, val)
    assert total > 40_000 and shared == 0 and dropped > 0
    assert shared_windows(raw, val)[0] > 0  # pydoc does quote its own topics: the check has teeth


def test_a_bpe_tokenizer_learns_from_training_text_only(tmp_path):
    from pydoc_data.topics import topics

    word = "zqxjvk"
    (tmp_path / "a.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:15]))
    (tmp_path / "b.txt").write_text("the cat sat on the mat. " * 50)
    (tmp_path / "z.txt").write_text((word + " ") * 400)  # the last document: held out
    data = load_tokens(DataSection(corpus=str(tmp_path), tokenizer="bpe", vocab_size=300, val_fraction=0.05))
    assert word in data.tokenizer.decode(data.val[:10])
    assert len(data.tokenizer.encode(word)) == len(word)  # never merged: the tokenizer never saw it
    assert len(data.tokenizer.encode("the cat sat")) < len("the cat sat")


def test_document_aligned_windows_start_where_a_document_starts():
    from adl_cli.data.tokens import WindowBatches

    rng = np.random.default_rng(0)
    docs = [np.concatenate(([1000], rng.integers(0, 900, size=rng.integers(40, 120)))) for _ in range(30)]
    stream = np.concatenate([np.concatenate((d, [999])) for d in docs])  # 999: <|endoftext|>, 1000: every document's first token
    b = WindowBatches(stream, 32, 8, 1, seed=3, align="document", eot_id=999)
    for step in range(5):
        x, y = b(step, 0, 0, 1)
        assert (x[:, 0] == 1000).all() and torch.equal(x[:, 1:], y[:, :-1])
    x, _ = WindowBatches(stream, 32, 64, 1, seed=3)(0, 0, 0, 1)
    assert (x[:, 0] != 1000).any()  # random windows start anywhere


def test_sequence_length_and_batch_size_warm_up():
    from adl_cli.data.tokens import WindowBatches

    stream = np.arange(5000) % 300
    b = WindowBatches(stream, 128, 8, 1, seed=0, seq_warmup=10, seq_start=32, batch_warmup=4, batch_start=2)
    shapes = [b.shape_at(t) for t in range(12)]
    assert shapes[0] == (2, 32) and shapes[10] == (8, 128) and shapes[11] == (8, 128)
    assert all(a[0] <= c[0] and a[1] <= c[1] for a, c in zip(shapes, shapes[1:]))  # never shrinks
    assert all(length % 16 == 0 for _, length in shapes)
    x, y = b(3, 0, 0, 1)
    assert tuple(x.shape) == shapes[3] and b.varies and not WindowBatches(stream, 128, 8, 1, seed=0).varies


def test_data_tokenizer_text_corpus_learns_from_the_corpus_side_alone(tmp_path):
    (tmp_path / "corpus").mkdir()
    from pydoc_data.topics import topics

    (tmp_path / "corpus" / "a.txt").write_text("\n\n".join(topics[k] for k in sorted(topics)[:10]) + " the cat sat on the mat. " * 60)
    (tmp_path / "corpus" / "b.txt").write_text("a dog ran in the park. " * 20)  # held out
    (tmp_path / "extra.txt").write_text("qwxz_vplk = qwxz_vplk + 1\n" * 300)
    common = dict(corpus=str(tmp_path / "corpus"), extra_train=[str(tmp_path / "extra.txt")], tokenizer="bpe", vocab_size=300, val_fraction=0.3)
    both = load_tokens(DataSection(**common)).tokenizer
    own = load_tokens(DataSection(**common, tokenizer_text="corpus")).tokenizer
    assert len(both.encode("qwxz_vplk")) < 4 and len(own.encode("qwxz_vplk")) == len("qwxz_vplk")  # the extra text taught only `both`
    assert len(own.encode("the cat sat")) <= len(both.encode("the cat sat"))
    with pytest.raises(ValueError, match="tokenizer_text"):
        DataSection(tokenizer_text="all").validate()
