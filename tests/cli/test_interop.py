"""adl import hf-gpt2 / adl export hf / adl data shard through the CLI's entry point."""

from __future__ import annotations

import json

import pytest
import torch


transformers = pytest.importorskip("transformers")




@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A randomly initialised GPT2LMHeadModel saved by transformers (safetensors)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)
    path = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def hf_logits(path, idx):
    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    with torch.no_grad():
        return model(idx).logits


def adl_logits(run_dir, idx):
    from adl_cli.runs import load_run

    with torch.no_grad():
        return load_run(run_dir).model(idx)[0]


def test_import_export_round_trip(hf_dir, tmp_path, capsys, run):
    from safetensors.torch import load_file

    run_dir, back = tmp_path / "run", tmp_path / "back"
    code, out, err = run(["import", "hf-gpt2", hf_dir, "--out", run_dir], capsys)
    assert code == 0, err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in run_dir.iterdir()}
    assert json.loads((run_dir / "tokenizer.json").read_text())["kind"] == "gpt2"
    assert "more ids than the model's vocabulary" in err  # gpt2's 50257 ids vs this toy's 101
    idx = torch.randint(0, 101, (2, 64), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(hf_dir, idx)
    assert (adl_logits(run_dir, idx) - ref).abs().max().item() < 1e-5

    code, _, err = run(["export", "hf", run_dir, "--out", back], capsys)
    assert code == 0, err
    assert (hf_logits(back, idx) - ref).abs().max().item() < 1e-5
    a, b = load_file(hf_dir / "model.safetensors"), load_file(back / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_shard_pretrain_export_import_generate(small_corpus, tmp_path, capsys, run):
    """adl data shard -> adl pretrain on the shards -> adl export hf (same logits) -> import -> generate."""
    shards, run_dir, hf, again = (tmp_path / n for n in ("shards", "run", "hf", "again"))
    code, out, err = run(["data", "shard", small_corpus, "--tokenizer", "bpe", "--vocab-size", "300", "--out", shards, "--shard-tokens", "3000"], capsys)
    assert code == 0, err
    assert len(list(shards.glob("*.bin"))) >= 2 and (shards / "tokenizer.tiktoken").exists() and (shards / "shards.json").exists()
    sets = {
        "data.corpus": f"shards:{shards}/*.bin",
        "data.tokenizer": shards / "tokenizer.tiktoken",
        "data.extra_train": "[]",
        "model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32, "model.vocab_multiple": 8,
        "train.steps": 3, "train.batch_size": 2, "train.warmup": 1, "train.eval_every": 3, "train.eval_batches": 1,
        "train.checkpoint_every": 3, "sample_tokens": 4,
        "model.tie_embeddings": "true", "model.unet_skips": "false",  # GPT-2's own layout: the main job's options do not export
    }
    args = ["pretrain", "recipes/pretrain/tiny.toml", "--out", run_dir, "--no-progress"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    code, _, err = run(["export", "hf", run_dir, "--out", hf], capsys)
    assert code == 0, err
    cfg = json.loads((hf / "config.json").read_text())
    assert cfg["vocab_size"] == 304 and cfg["eos_token_id"] == 299 and (hf / "adl_tokenizer" / "tokenizer.tiktoken").exists()
    idx = torch.randint(0, 300, (2, 32))
    assert (hf_logits(hf, idx) - adl_logits(run_dir, idx)).abs().max().item() < 1e-5

    code, _, err = run(["import", "hf-gpt2", hf, "--out", again], capsys)  # tokenizer from adl_tokenizer/
    assert code == 0, err
    assert torch.equal(adl_logits(again, idx), adl_logits(run_dir, idx))
    code, out, err = run(["generate", again, "--prompt", "The", "-n", "4"], capsys)
    assert code == 0, err
    assert out.startswith("The")


def test_bad_inputs_exit_2(hf_dir, tmp_path, capsys, run):
    import shutil

    from adl_cli.runs import save_run
    from adl_cli.models.gpt import GPT, GPTConfig

    def copy(name, **config_changes):
        dst = tmp_path / name
        shutil.copytree(hf_dir, dst)
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config_changes}))
        return dst

    corrupt = copy("corrupt")
    (corrupt / "model.safetensors").write_bytes((corrupt / "model.safetensors").read_bytes()[:300])
    noweights = copy("noweights")
    (noweights / "model.safetensors").unlink()
    noconfig = copy("noconfig")
    (noconfig / "config.json").unlink()
    rope = tmp_path / "rope-run"
    save_run(rope, GPT(GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16, position="rope")))
    cases = [
        (["import", "hf-gpt2", tmp_path / "nowhere", "--out", tmp_path / "o1"], "model folder not found"),
        (["import", "hf-gpt2", noconfig, "--out", tmp_path / "o2"], "missing file"),
        (["import", "hf-gpt2", noweights, "--out", tmp_path / "o3"], "has no model.safetensors"),
        (["import", "hf-gpt2", corrupt, "--out", tmp_path / "o4"], "truncated or not a safetensors"),
        (["import", "hf-gpt2", copy("relu", activation_function="relu"), "--out", tmp_path / "o5"], "activation_function"),
        (["import", "hf-gpt2", copy("llama", model_type="llama"), "--out", tmp_path / "o6"], "only GPT-2"),
        (["import", "hf-gpt2", hf_dir, "--out", tmp_path / "o7", "--tokenizer", "bytes"], "more ids than"),
        (["export", "hf", rope, "--out", tmp_path / "o8"], "'rope' positions"),
        (["export", "hf", tmp_path / "nowhere", "--out", tmp_path / "o9"], "run folder not found"),
        (["export", "hf", rope, "--out", rope], "source folder itself"),
        (["data", "shard", tmp_path / "nowhere.txt", "--tokenizer", "bytes", "--out", tmp_path / "s"], "corpus not found"),
        (["data", "shard", "pydoc", "--tokenizer", "bpe", "--vocab-size", "70000", "--out", tmp_path / "s"], "uint16"),
    ]
    for args, words in cases:
        code, out, err = run(args, capsys)
        assert code == 2 and words in " ".join(err.split()), (args, err)
        assert "Traceback" not in err


def test_exported_tokenizer_encodes_as_adl_in_transformers(small_corpus, tmp_path, capsys, run, monkeypatch):
    """AutoTokenizer.from_pretrained(export) gives adl's ids, for a trained BPE and for bytes."""
    from transformers import AutoTokenizer

    from adl_cli.data.tokenizer import Tokenizer

    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)
    text = small_corpus.read_text(encoding="utf-8")[:3000] + " Ünïcödé — 123 'll  tabs\t\tend\n\n"
    for tok in ("bpe", "bytes"):
        run_dir, hf = tmp_path / f"run-{tok}", tmp_path / f"hf-{tok}"
        args = ["pretrain", "recipes/pretrain/tiny.toml", "--out", run_dir, "--no-progress", "--set", f"data.corpus={small_corpus}",
                "--set", f"data.tokenizer={tok}", "--set", "data.vocab_size=400", "--set", "data.extra_train=[]"]
        for k, v in {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32, "train.steps": 1,
                     "train.eval_batches": 1, "sample_tokens": 2, "model.tie_embeddings": "true", "model.unet_skips": "false"}.items():
            args += ["--set", f"{k}={v}"]
        code, _, err = run(args, capsys)
        assert code == 0, err
        code, _, err = run(["export", "hf", run_dir, "--out", hf], capsys)
        assert code == 0, err
        ours = Tokenizer.load(run_dir)
        theirs = AutoTokenizer.from_pretrained(hf)
        assert theirs.encode(text) == list(ours.encode(text)), tok
        assert theirs.eos_token_id == ours.eot_id
        cfg = json.loads((hf / "config.json").read_text())
        assert cfg["eos_token_id"] == cfg["bos_token_id"] == ours.eot_id < cfg["vocab_size"]
