"""GPT-2 state dicts and configs between adl and transformers: same logits, bit-exact round trips."""

from __future__ import annotations

import pytest
import torch

from adl_cli.engine.checkpoint import model_tensors, read_safetensors
from adl_cli.errors import AdlError
from adl_cli.models import hf_gpt2
from adl_cli.models.gpt import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

HF_TINY = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=101, n_positions=64)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_TINY)).eval()


def hf_weights(model) -> dict[str, torch.Tensor]:
    """The tensors save_pretrained would write (tied head and mask buffers left out)."""
    return {k: v for k, v in model.state_dict().items() if k != "lm_head.weight" and not k.endswith(hf_gpt2.BUFFERS)}


def adl_from_hf(hf_model) -> GPT:
    cfg = hf_gpt2.hf_to_adl_config(hf_model.config.to_dict())
    model = GPT(cfg).eval()
    model.load_state_dict(hf_gpt2.hf_to_adl(hf_weights(hf_model), cfg), strict=False)
    return model


def test_config_mapping(hf_model):
    cfg = hf_gpt2.hf_to_adl_config(hf_model.config.to_dict())
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (101, 64, 2, 4, 32)
    assert cfg.bias and cfg.position == "learned" and cfg.kv_heads == 4
    back = hf_gpt2.adl_to_hf_config(cfg, eot_id=100)
    again = transformers.GPT2Config(**back)
    assert (again.n_positions, again.n_embd, again.n_layer, again.n_head, again.vocab_size) == (64, 32, 2, 4, 101)
    assert again.activation_function == "gelu_new" and again.layer_norm_epsilon == 1e-5 and back["eos_token_id"] == 100
    assert hf_gpt2.adl_to_hf_config(cfg, eot_id=50256).get("eos_token_id") is None  # outside this vocabulary


@pytest.mark.parametrize(
    "change, words",
    [
        ({"activation_function": "relu"}, "activation_function 'relu'"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon"),
        ({"model_type": "llama"}, "only GPT-2"),
        ({"n_inner": 100}, "n_inner"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ],
)
def test_config_refusals(hf_model, change, words):
    with pytest.raises(AdlError, match=words):
        hf_gpt2.hf_to_adl_config({**hf_model.config.to_dict(), **change})


def test_hf_to_adl_same_logits_and_bit_exact_back(hf_model):
    adl = adl_from_hf(hf_model)
    idx = torch.randint(0, 101, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(idx).logits
        got, _ = adl(idx)
    assert (ref - got).abs().max().item() < 1e-5
    back = hf_gpt2.adl_to_hf(model_tensors(adl), adl.config)
    orig = hf_weights(hf_model)
    assert set(back) == set(orig)
    for k in orig:
        assert back[k].dtype == orig[k].dtype and torch.equal(back[k], orig[k]), k


def test_adl_to_hf_same_logits():
    torch.manual_seed(2)
    cfg = GPTConfig(vocab_size=72, block_size=16, n_layer=2, n_head=2, n_embd=24, attention="naive")
    adl = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases
        for name, p in adl.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2.adl_to_hf_config(cfg))).eval()
    hf.load_state_dict(hf_gpt2.adl_to_hf(model_tensors(adl), cfg), strict=False)
    idx = torch.randint(0, 72, (3, 16))
    with torch.no_grad():
        assert (hf(idx).logits - adl(idx)[0]).abs().max().item() < 1e-5


def test_bias_free_model_exports_zero_biases():
    torch.manual_seed(3)
    cfg = GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16, bias=False)
    adl = GPT(cfg).eval()
    out = hf_gpt2.adl_to_hf(model_tensors(adl), cfg)
    assert torch.count_nonzero(out["transformer.h.0.attn.c_attn.bias"]) == 0 and out["transformer.h.0.ln_1.bias"].shape == (16,)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_gpt2.adl_to_hf_config(cfg))).eval()
    hf.load_state_dict(out, strict=False)
    idx = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        assert (hf(idx).logits - adl(idx)[0]).abs().max().item() < 1e-5


def test_old_layout_buffers_and_untied_head(hf_model):
    cfg = hf_gpt2.hf_to_adl_config(hf_model.config.to_dict())
    w = hf_weights(hf_model)
    # a file saved from GPT2Model by an old transformers: no prefix, mask buffers, explicit tied head
    old = {k.removeprefix("transformer."): v for k, v in w.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    old["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    old["lm_head.weight"] = w["transformer.wte.weight"].clone()
    assert set(hf_gpt2.hf_to_adl(old, cfg)) == set(GPT(cfg).state_dict()) - {"lm_head.weight"}  # q, k, v split
    old["lm_head.weight"] = torch.zeros_like(w["transformer.wte.weight"])
    with pytest.raises(AdlError, match="untied"):
        hf_gpt2.hf_to_adl(old, cfg)
    del w["transformer.ln_f.bias"]
    with pytest.raises(AdlError, match="missing transformer.ln_f.bias"):
        hf_gpt2.hf_to_adl(w, cfg)
    w = hf_weights(hf_model)
    w["transformer.wpe.weight"] = torch.zeros(32, 32)
    with pytest.raises(AdlError, match=r"wpe.weight' has shape \(32, 32\)"):
        hf_gpt2.hf_to_adl(w, cfg)


def test_compile_prefix_never_reaches_a_file(tmp_path):
    from adl_cli.runs import save_run

    cfg = GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16)
    adl = GPT(cfg)
    prefixed = {"_orig_mod." + k: v for k, v in adl.state_dict().items()}
    assert not any("_orig_mod" in k for k in hf_gpt2.adl_to_hf(prefixed, cfg))
    compiled = torch.compile(adl)  # wrapping only: nothing is compiled until it runs
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_run(tmp_path, compiled)
    keys = read_safetensors(tmp_path / "model.safetensors")
    assert keys and not any("_orig_mod" in k for k in keys)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(position="rope"), "'rope' positions"),
        (dict(n_kv_head=1), "grouped-query"),
        (dict(attention="mla"), "'mla' attention"),
    ],
)
def test_export_refusals(kw, words):
    cfg = GPTConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16, **kw)
    with pytest.raises(AdlError, match=words):
        hf_gpt2.adl_to_hf_config(cfg)
    with pytest.raises(AdlError, match=words):
        hf_gpt2.adl_to_hf({}, cfg)


def test_ranks_from_vocab():
    b2u = hf_gpt2.byte_to_unicode()
    assert len(set(b2u.values())) == 256 and b2u[ord(" ")] == "\u0120" and b2u[ord("a")] == "a"
    vocab = {c: i for i, c in enumerate(b2u.values())}
    merges = [("\u0120", "t"), ("h", "e"), ("\u0120t", "he")]
    for j, (a, b) in enumerate(merges):
        vocab[a + b] = 256 + j
    vocab["<|endoftext|>"] = 259
    ranks = hf_gpt2.ranks_from_vocab(vocab, merges)
    assert ranks[b" the"] == 258 and ranks[b"he"] == 257 and ranks[bytes([0])] == vocab[b2u[0]]
    assert hf_gpt2.read_merges("#version: 0.2\n\u0120 t\nh e\n") == merges[:2]
    with pytest.raises(ValueError, match="merge order"):
        hf_gpt2.ranks_from_vocab(vocab, [merges[1], merges[0]])
    with pytest.raises(ValueError, match="special token"):
        hf_gpt2.ranks_from_vocab({**vocab, "<|pad|>": 260}, merges)
