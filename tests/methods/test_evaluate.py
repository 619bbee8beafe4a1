import math

import numpy as np
import pytest
import torch

from adl_cli.data.tokenizer import make_tokenizer
from adl_cli.errors import AdlError
from adl_cli.methods.evaluate import evaluate_tokens
from adl_cli.models.gpt import GPT, GPTConfig


def test_eval_scores_every_token_once_as_a_window_by_window_reference_does():
    torch.manual_seed(0)
    tok = make_tokenizer("bytes")
    m = GPT(GPTConfig(vocab_size=264, block_size=8, n_layer=1, n_head=2, n_embd=16)).eval()
    tokens = np.random.default_rng(0).integers(32, 127, 37)  # ASCII: one byte a token
    tokens[[10, 20]] = tok.eot_id  # <|endoftext|> is scored but stands for no bytes
    got = evaluate_tokens(m, tok, tokens, batch_size=3)
    n, block, nll = len(tokens), 8, []
    for t in range(1, n):  # consecutive windows; the last one end-aligned
        s = min((t - 1) // block * block, n - 1 - block)
        with torch.no_grad():
            logits = m(torch.as_tensor(tokens[s:s + block])[None])[0][0, t - 1 - s]
        nll.append(-float(torch.log_softmax(logits, -1)[tokens[t]]))
    assert got.tokens == n - 1
    assert got.loss == pytest.approx(sum(nll) / len(nll), abs=1e-5)
    n_bytes = sum(1 for x in tokens[1:] if x != tok.eot_id)
    assert got.bits_per_byte == pytest.approx(got.loss / math.log(2) * (n - 1) / n_bytes, rel=1e-9)
    assert got.perplexity == pytest.approx(math.exp(got.loss))
    with pytest.raises(AdlError, match="at least 2"):
        evaluate_tokens(m, tok, tokens[:1])
