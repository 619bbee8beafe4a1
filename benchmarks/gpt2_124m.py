"""A GPT-2-124M-shaped run with random weights, made offline the way a user brings a model in:
transformers writes the folder (GPT2Config's defaults: 12 x 768, 12 heads, vocab 50257, context
1024), ``adl import hf-gpt2`` turns it into a run. Used by the inference benchmarks.

    python benchmarks/gpt2_124m.py --out runs/gpt2-124m-random
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/gpt2-124m-random")
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        GPT2LMHeadModel(GPT2Config()).save_pretrained(tmp)
        subprocess.run([sys.executable, "-m", "adl_cli", "import", "hf-gpt2", tmp, "--out", args.out, "--tokenizer", "bytes"], check=True)
    print(f"wrote {Path(args.out)}")


if __name__ == "__main__":
    main()
