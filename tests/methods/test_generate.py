import torch

from adl_cli.inference.sampling import filter_logits
from adl_cli.methods.generate import generate
from adl_cli.models.gpt import GPT, GPTConfig


def test_top_k_and_top_p_keep_the_right_sets():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2).tolist() == [[True, False, True, False]]
    p = filter_logits(logits, top_p=0.8)  # 0.5 + 0.3 reaches 0.8: two tokens
    assert torch.isfinite(p).tolist() == [[True, False, True, False]]
    p = filter_logits(logits, top_p=0.81)  # needs the third most likely too
    assert torch.isfinite(p).tolist() == [[True, False, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum() == 1  # the top token always stays


def test_greedy_cached_generation_equals_argmax_of_full_recompute():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()
    prompt = torch.randint(0, 50, (1, 5))
    out = generate(m, prompt, 20, temperature=0)  # runs past the 16-token context too
    seq, start = prompt, 0
    for _ in range(20):
        if seq.shape[1] - start > 16:  # the context policy: a full window keeps its last three quarters
            start = seq.shape[1] - 12
        logits, _ = m(seq[:, start:])
        seq = torch.cat((seq, logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, seq)


def test_sampling_follows_the_distribution():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=8, block_size=4, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():  # peaked logits: a sampler that ignored them (uniform) would be far off
        m.transformer.wte.weight.mul_(60.0)
    idx = torch.zeros(4000, 1, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    out = generate(m, idx, 1, temperature=1.0, generator=g)[:, 1]
    probs = torch.softmax(m(idx[:1])[0][0, -1], -1)
    assert (probs - 1 / 8).abs().max() > 0.2, probs  # the test means something only if the distribution is peaked
    freq = torch.bincount(out, minlength=8).float() / len(out)
    assert (freq - probs).abs().max() < 0.03


def test_a_stop_token_ends_each_row_of_a_batch_on_its_own():
    torch.manual_seed(1)
    m = GPT(GPTConfig(vocab_size=16, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    a, b = torch.tensor([[1, 2, 3]]), torch.tensor([[7, 5, 9]])
    alone_a, alone_b = generate(m, a, 8, temperature=0), generate(m, b, 8, temperature=0)
    stop = int(alone_a[0, 5])  # row a greedily emits this at its third new token
    assert stop not in alone_b[0, 3:].tolist()  # (so only row a stops)
    out = generate(m, torch.cat((a, b)), 8, temperature=0, stop_token=stop)
    first = alone_a[0, 3:].tolist().index(stop) + 3
    assert out[0, : first + 1].tolist() == alone_a[0, : first + 1].tolist()
    assert set(out[0, first:].tolist()) == {stop}  # row a is done: only the stop token after it
    assert out[1].tolist() == alone_b[0].tolist()  # row b went on to the end


def test_a_repetition_penalty_in_generation_equals_its_rule_on_a_full_recompute():
    torch.manual_seed(2)
    m = GPT(GPTConfig(vocab_size=12, block_size=32, n_layer=1, n_head=2, n_embd=16)).eval()
    prompt = torch.tensor([[3, 3, 7, 1]])
    out = generate(m, prompt, 12, temperature=0, repetition_penalty=1.8)
    seq = prompt
    for _ in range(12):
        z = m(seq)[0][0, -1].clone()
        for t in set(seq[0].tolist()):  # the rule, one seen id at a time
            z[t] = z[t] / 1.8 if z[t] > 0 else z[t] * 1.8
        seq = torch.cat((seq, z.argmax().view(1, 1)), 1)
    assert torch.equal(out, seq)
    assert not torch.equal(out, generate(m, prompt, 12, temperature=0))  # the penalty changed the text
