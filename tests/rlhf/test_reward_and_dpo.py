"""The reward model and DPO trainers on a tiny chat run: they change the model, the reward run
loads back as family "reward", the reference log-probs are computed once (and read back on
resume), a LoRA policy's adapters-off reference is the base model, and what must be refused is."""

from __future__ import annotations

import pytest
import torch

from adl_cli.errors import AdlError

DATA = {"sets": ["arithmetic", "format"], "train_pairs": 24, "val_pairs": 8, "operand_digits": 2}
TRAIN = {"steps": 4, "batch_size": 4, "precision": "fp32", "lr": 1e-3, "min_lr": 1e-4, "warmup": 1, "eval_every": 2,
         "checkpoint_every": 2, "log_every": 1, "seed": 3}


@pytest.fixture(autouse=True)
def _no_peak(monkeypatch):
    monkeypatch.setattr("adl_cli.engine.trainer.matmul_peak", lambda *a, **k: 1e12)


def _reward_recipe(chat_run, **over):
    from adl_cli.methods.rlhf.common import PairData
    from adl_cli.methods.rlhf.reward import RewardRecipe
    from adl_cli.methods.pretrain import InitSection
    from adl_cli.engine.trainer import TrainConfig

    r = RewardRecipe(name="rw", init=InitSection(from_=str(chat_run)), data=PairData(**DATA), train=TrainConfig(**TRAIN), **over)
    r.validate()
    return r


def _dpo_recipe(chat_run, **over):
    from adl_cli.adapters.lora import LoraSection
    from adl_cli.engine.trainer import TrainConfig
    from adl_cli.methods.pretrain import InitSection
    from adl_cli.methods.rlhf.common import PairData
    from adl_cli.methods.rlhf.dpo import DPORecipe, DPOSection

    dpo = DPOSection(**{"kl_prompts": 4, "kl_tokens": 4, "match_prompts": 4, **over.pop("dpo", {})})
    r = DPORecipe(name="d", init=InitSection(from_=str(chat_run)), data=PairData(**DATA), dpo=dpo, train=TrainConfig(**TRAIN),
                  lora=LoraSection(r=4, alpha=8), **over)
    r.validate()
    return r


def _quiet(*a, **k):
    pass


def test_the_reward_trainer_changes_the_model_and_its_run_loads_back(chat_run, tmp_path):
    from adl_cli.methods.rlhf.reward import pair_rewards, run_reward
    from adl_cli.models.reward import RewardModel
    from adl_cli.runs import load_run

    start = load_run(chat_run).model.state_dict()
    outcome = run_reward(_reward_recipe(chat_run), tmp_path / "rw", progress=False, log=_quiet)
    run = load_run(tmp_path / "rw")
    assert run.config.family == "reward" and isinstance(run.model, RewardModel)
    assert run.tokenizer.chat == load_run(chat_run).tokenizer.chat
    moved = [k for k, v in start.items() if not torch.equal(v, run.model.state_dict()[k])]
    assert "transformer.h.0.attn.q_proj.weight" in moved and len(moved) > len(start) // 2
    s = outcome.summary
    assert s["kind"] == "reward" and set(s["heldout"]["by_source"]) == {"arithmetic", "format"}
    assert s["length_baselines"]["arithmetic"] == {"shorter": 0.5, "longer": 0.5}
    # the held-out accuracy in the summary is what the saved model scores
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.data.preferences import encode_pairs, make_pairs

    template = ChatTemplate.of(run.tokenizer)
    val = [p for name in ("arithmetic", "format") for p in make_pairs(name, 8, held_out=True, seed=0, operand_digits=2)]
    r = pair_rewards(run.model, encode_pairs(template, val, run.config.block_size), 8)
    assert s["heldout"]["val_accuracy"] == pytest.approx((r[:, 0] > r[:, 1]).float().mean().item())


def test_a_reward_is_read_at_the_answers_last_token_and_ignores_padding(chat_run):
    from adl_cli.models.reward import from_language_model
    from adl_cli.runs import load_run

    model = from_language_model(load_run(chat_run).model).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    padded = torch.tensor([[5, 6, 7, 8, 9, 0, 0, 0]])
    with torch.no_grad():
        a = model(ids, last=torch.tensor([4]))
        b = model(padded, last=torch.tensor([4]))
        c = model.score(model.hidden(ids)[:, 4]).squeeze(-1)
    assert a.shape == (1,) and torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)


def test_dpo_changes_the_policy_computes_the_reference_once_and_reads_it_back(chat_run, tmp_path, monkeypatch):
    from adl_cli.methods.rlhf import dpo as dpo_mod
    from adl_cli.methods.rlhf.common import rows_logps
    from adl_cli.runs import load_run

    calls = []
    real = dpo_mod.compute_reference
    monkeypatch.setattr(dpo_mod, "compute_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = _dpo_recipe(chat_run)
    recipe.train.steps = 12  # 3 epochs of 24 pairs at 4 a step: each pair seen three times
    outcome = dpo_mod.run_dpo(recipe, tmp_path / "d", progress=False, log=_quiet)
    assert len(calls) == 1
    from safetensors.torch import load_file

    cache = load_file(tmp_path / "d" / dpo_mod.REFERENCE_FILE)
    base = load_run(chat_run).model
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.methods.rlhf.common import PairData, build_pairs

    data = build_pairs(PairData(**DATA), ChatTemplate.of(load_run(chat_run).tokenizer), 64)
    assert torch.allclose(cache["train"], rows_logps(base, data.train, 8), atol=1e-5)
    assert torch.allclose(cache["val"], rows_logps(base, data.val, 8), atol=1e-5)
    policy = load_run(tmp_path / "d").model
    assert any(not torch.equal(v, policy.state_dict()[k]) for k, v in base.state_dict().items())
    assert not torch.allclose(rows_logps(policy, data.val, 8), cache["val"])
    s = outcome.summary
    assert s["sampled_kl"] >= 0 and s["ref_kl"] >= 0 and s["chosen_match"]["before"] is not None
    assert [st for st, _ in s["margin_by_eval"]] == [2, 4, 6, 8, 10, 12]
    # resume to more steps: the reference is read back, not recomputed
    recipe.train.steps = 14
    dpo_mod.run_dpo(recipe, tmp_path / "d", resume=True, force=True, progress=False, log=_quiet)
    assert len(calls) == 1


def test_the_dpo_step_loss_is_log_2_before_any_update(chat_run, tmp_path):
    import json

    from adl_cli.methods.rlhf.dpo import run_dpo

    recipe = _dpo_recipe(chat_run, dpo={"kl_prompts": 0, "match_prompts": 0})
    recipe.train.steps, recipe.train.eval_every = 1, 0
    run_dpo(recipe, tmp_path / "d", progress=False, log=_quiet)
    first = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(0.6931472, abs=1e-5) and first["margin"] == pytest.approx(0, abs=1e-6)
    assert first["ref_kl"] == pytest.approx(0, abs=1e-6)  # the policy is its reference before the first update


def test_a_lora_policy_with_its_adapters_off_is_the_base_model(chat_run):
    from adl_cli.adapters.lora import LoraSection, add_lora, adapters_off
    from adl_cli.data.chat import ChatTemplate
    from adl_cli.methods.rlhf.common import PairData, build_pairs, rows_logps
    from adl_cli.runs import load_run, transfer

    base = load_run(chat_run)
    policy = add_lora(transfer(base, base.config), LoraSection(r=4, alpha=8, targets=["q_proj", "v_proj", "c_fc"]))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a trained adapter: the policy now differs from its base
    data = build_pairs(PairData(**DATA), ChatTemplate.of(base.tokenizer), 64)
    want = rows_logps(base.model, data.val, 8)
    assert not torch.allclose(rows_logps(policy, data.val, 8), want, atol=1e-3)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    with adapters_off(policy):
        assert torch.allclose(rows_logps(policy, data.val, 8), want, atol=1e-5)
    assert {n for n, p in policy.named_parameters() if p.requires_grad} == trainable
    assert not torch.allclose(rows_logps(policy, data.val, 8), want, atol=1e-3)  # back on


def test_dpo_with_a_lora_policy_saves_an_adapter_run(chat_run, tmp_path):
    from adl_cli.methods.rlhf.dpo import run_dpo
    from adl_cli.runs import load_run

    outcome = run_dpo(_dpo_recipe(chat_run, method="lora"), tmp_path / "l", progress=False, log=_quiet)
    assert (tmp_path / "l" / "adapter.json").exists() and not (tmp_path / "l" / "model.safetensors").exists()
    assert outcome.summary["reference_kind"] == "adapters off" and outcome.summary["trainable_parameters"] < outcome.summary["parameters"] / 5
    run = load_run(tmp_path / "l")
    base = load_run(chat_run).model
    x = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert not torch.allclose(run.model(x)[0], base(x)[0])


def test_a_reference_of_another_shape_or_tokenizer_and_a_plain_base_are_refused(chat_run, bpe_run, rope_run, tmp_path):
    from adl_cli.methods.rlhf.dpo import run_dpo
    from adl_cli.methods.rlhf.reward import load_reward, run_reward

    with pytest.raises(AdlError, match="differ in shape"):
        run_dpo(_dpo_recipe(chat_run, dpo={"reference": str(rope_run)}), tmp_path / "a", progress=False, log=_quiet)
    with pytest.raises(AdlError, match="no chat template"):
        run_dpo(_dpo_recipe(bpe_run), tmp_path / "b", progress=False, log=_quiet)
    with pytest.raises(AdlError, match="no chat template"):
        run_reward(_reward_recipe(bpe_run), tmp_path / "c", progress=False, log=_quiet)
    # a reward run is read only with the tokenizer it was trained with
    run_reward(_reward_recipe(chat_run, **{}), tmp_path / "rw", progress=False, log=_quiet)
    from adl_cli.runs import load_run

    assert load_reward(tmp_path / "rw", load_run(chat_run).tokenizer).config.family == "reward"
    with pytest.raises(AdlError, match="another tokenizer"):
        load_reward(tmp_path / "rw", load_run(rope_run).tokenizer)
    with pytest.raises(AdlError, match="not a reward run"):
        load_reward(chat_run, load_run(chat_run).tokenizer)


def test_rpo_adds_the_chosen_answers_nll_to_the_first_loss(chat_run, tmp_path):
    import json

    from adl_cli.methods.rlhf.dpo import run_dpo

    recipe = _dpo_recipe(chat_run, dpo={"kl_prompts": 0, "match_prompts": 0, "step_kl": False, "sft_weight": 0.5})
    recipe.train.steps, recipe.train.eval_every = 1, 0
    run_dpo(recipe, tmp_path / "r", progress=False, log=_quiet)
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["chosen_nll"] > 0 and "ref_kl" not in first
    assert first["loss"] == pytest.approx(0.6931472 + 0.5 * first["chosen_nll"], rel=1e-5)


@pytest.mark.parametrize("tied,mtp", [(True, 0), (False, 1)])
def test_every_trainable_tensor_of_a_reward_model_gets_a_gradient(tied, mtp):
    """DDP refuses parameters that train without a gradient: what the reward never reads (an
    untied language-model head, multi-token heads) is frozen, everything else gets one."""
    from adl_cli.models.gpt import GPT, GPTConfig
    from adl_cli.models.reward import from_language_model
    from adl_cli.nn.preference import bradley_terry_loss

    lm = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=32, tie_embeddings=tied, mtp_heads=mtp))
    model = from_language_model(lm).train()
    x = torch.randint(0, 32, (4, 10))
    r = model(x, last=torch.tensor([9, 7, 9, 5]))
    bradley_terry_loss(r[:2], r[2:])[0].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert model.lm_head.weight.requires_grad == tied
