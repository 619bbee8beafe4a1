#!/usr/bin/env bash
# One-shot GPU check for adl's pretraining and decoding paths (written for one H100/H200; any CUDA GPU works).
# Run from the repository root:   bash benchmarks/gpu_check.sh        (about 10-12 minutes on an H200)
#
#   1. environment: GPU, torch, CUDA
#   2. the tests that exercise CUDA: tests/distributed (CUDA-only ones included; the 2-process
#      gloo tests run too) and tests/engine, where the trainer now lands on the GPU
#   3. the GPT-2 124M speed ladder (benchmarks/pretrain_ablation.py --preset gpt2-124m):
#      fp32 -> TF32 -> bf16 -> compile -> flash -> vocab 50304 -> fused AdamW
#   4. `adl pretrain` of recipes/pretrain/gpt2-124m.toml itself for a few steps, bf16 + compile
#      + flash + TF32 on one GPU (pydoc bytes padded to GPT-2's 50,304-row embedding, since the
#      FineWeb shards and tiktoken's gpt2 file are not on the machine)
#  4b. attention: adl's Triton flash kernel vs naive on CUDA (fwd + grads, fp32 and bf16), then
#      `adl bench-attention` in bf16 against SDPA's flash backend
#  4c. inference: the engine's padded batch against each prompt alone on the GPU, then
#      `adl bench-inference --device cuda` on a GPT-2-124M-shaped run against transformers
#  4d. SFT: flash attention with packed documents against naive on CUDA, then `adl sft addition`
#  4e. adl lora (LoRA, QLoRA) on CUDA and the GPT-2-124M memory table (allocator peaks)
#      from a 600-step main job (exact match on 1,000 held-out sums)
#  4f. adl rlhf reward and dpo (full, LoRA) on CUDA from 4d's SFT run
#  4g. adl rlhf ppo and grpo on CUDA (rollouts through the engine on the GPU, value head, adaptive
#      KL) from a short all-tasks SFT run, then `adl eval --samples 8` (pass@k, majority vote)
#  4h. adl bench-quantize --device cuda on 4d's main job (bitsandbytes' CUDA kernels, adl's GPTQ/AWQ)
#  4i. sequence models: Mamba's chunked scan, Mamba-2's chunked SSD and the chunkwise mLSTM against
#      their loops on CUDA (float64), benchmarks/scan.py on CUDA, a short adl bench-sequence
#   5. a compact summary: tokens/s and MFU against the card's dense bf16 peak (989 TFLOP/s for
#      H100/H200 SXM; override with PEAK_TFLOPS=...)
#
# Results go to $OUT (the device runner's folder) or ./gpu-check-out. Needs torch with CUDA,
# accelerate, typer, rich, safetensors, tiktoken, numpy, pytest in $PYTHON's environment.
set -u
PY=${PYTHON:-python3}
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then PY=.venv/bin/python; fi
OUTDIR=${OUT:-gpu-check-out}
PEAK=${PEAK_TFLOPS:-989}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export ADL_CACHE="$OUTDIR/adl-cache"
export PYTHONUNBUFFERED=1
status=0

echo "== 1. environment"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
$PY - <<'EOF' || { echo "torch with CUDA is required"; exit 2; }
import sys, torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__}  cuda {torch.version.cuda}  available {torch.cuda.is_available()}")
assert torch.cuda.is_available()
print("device:", torch.cuda.get_device_name(0), " bf16:", torch.cuda.is_bf16_supported())
EOF

echo "== 2. tests on CUDA"
timeout 300 $PY -m pytest -q -p no:cacheprovider tests/distributed tests/engine 2>&1 | tail -15
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 3. GPT-2 124M speed ladder"
timeout 420 $PY benchmarks/pretrain_ablation.py --preset gpt2-124m --steps 5 --repeats 3 --peak-tflops "$PEAK" --json "$OUTDIR/ladder.json" 2>"$OUTDIR/ladder.log"
[ $? = 0 ] || { status=1; tail -20 "$OUTDIR/ladder.log"; }

echo "== 4. adl pretrain recipes/pretrain/gpt2-124m.toml, a few steps on one GPU"
timeout 300 $PY -m adl_cli pretrain recipes/pretrain/gpt2-124m.toml --out "$OUTDIR/gpt2-run" --no-progress \
  --set data.corpus=pydoc --set data.tokenizer=bytes --set data.val_fraction=0.1 --set model.vocab_multiple=50304 \
  --set train.global_batch_tokens=0 --set train.batch_size=32 --set train.steps=30 --set train.warmup=5 \
  --set train.log_every=5 --set train.eval_every=0 --set train.eval_batches=2 --set train.checkpoint_every=0 \
  --set sample_tokens=16 > "$OUTDIR/pretrain.log" 2>&1
[ $? = 0 ] || { status=1; tail -30 "$OUTDIR/pretrain.log"; }

echo "== 4b. attention on CUDA: Triton flash vs naive (fwd + grads), then bf16 timing vs SDPA's flash backend"
timeout 240 $PY - <<'EOF' || status=1
import torch
from adl_cli.nn.attention import ATTENTION
naive, flash = ATTENTION.get("naive"), ATTENTION.get("flash")
torch.manual_seed(0)
worst = 0.0
for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
    for T, causal, hkv in ((1, True, 4), (77, True, 4), (256, False, 2), (1000, True, 1)):
        q = torch.randn(2, 4, T, 64, device="cuda", dtype=dtype, requires_grad=True)
        k = torch.randn(2, hkv, T, 64, device="cuda", dtype=dtype, requires_grad=True)
        v = torch.randn(2, hkv, T, 64, device="cuda", dtype=dtype, requires_grad=True)
        go = torch.randn(2, 4, T, 64, device="cuda", dtype=dtype)
        ref = naive(q.float(), k.float(), v.float(), causal=causal)
        gr = torch.autograd.grad(ref, (q, k, v), go.float())
        out = flash(q, k, v, causal=causal, backend="triton")
        g = torch.autograd.grad(out, (q, k, v), go)
        err = max([(out.float() - ref).abs().max().item()] + [(a.float() - b.float()).abs().max().item() for a, b in zip(g, gr)])
        worst = max(worst, err / tol)
        print(f"  {str(dtype):15s} T={T:5d} causal={causal} kv_heads={hkv}: max err {err:.2e} (tol {tol:g})")
print("triton flash vs naive:", "OK" if worst <= 1 else "TOO LARGE")
assert worst <= 1
EOF
timeout 240 $PY -m adl_cli bench-attention --impl naive,sdpa,flash,window --seq 1024,2048,4096,8192 --dtype bfloat16 \
  --heads 16 --head-dim 64 --batch 4 --repeats 5 --json "$OUTDIR/attention-bf16.json" 2>&1 | tail -60
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 4c. inference on CUDA: a padded batch equals each prompt alone, then adl bench-inference at the 124M shape"
timeout 120 $PY - <<'EOF' || status=1
import torch
from adl_cli.inference.engine import generate_batch, row_generators
from adl_cli.inference.sampling import SamplingParams
from adl_cli.models.gpt import GPT, GPTConfig
torch.manual_seed(0)
m = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64, position="rope")).cuda().eval()
prompts = [[1, 2, 3], list(range(4, 30)), [7]]
p = SamplingParams(temperature=1.0, top_k=50)
batch = generate_batch(m, prompts, 80, p, generator=row_generators(3, 3))
alone = [generate_batch(m, [q], 80, p, generator=row_generators(3 + i, 1))[0] for i, q in enumerate(prompts)]
same = [a.tokens == b.tokens for a, b in zip(batch, alone)]
print("padded batch == alone (sampled, past the context):", same)
assert all(same)
EOF
timeout 60 $PY benchmarks/gpt2_124m.py --out "$OUTDIR/gpt2-124m-random" > "$OUTDIR/gpt2-124m.log" 2>&1 || { status=1; tail -5 "$OUTDIR/gpt2-124m.log"; }
timeout 300 $PY -m adl_cli bench-inference "$OUTDIR/gpt2-124m-random" --device cuda --batch 1,16 --new-tokens 128 \
  --only cache,compiled,int8,transformers --json "$OUTDIR/inference-124m.json" 2>&1 | grep -v "round" | tail -25
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 4d. SFT on CUDA: flash with packed documents vs naive (fwd + grads), then adl sft addition from a short main job"
timeout 120 $PY - <<'EOF' || status=1
import torch
from adl_cli.nn.attention.flash import flash_attention
from adl_cli.nn.attention.naive import naive_attention
torch.manual_seed(0)
seg = torch.cat([torch.full((n,), i) for i, n in enumerate([100, 300, 112])]).expand(2, 512).cuda()
q, k, v = (torch.randn(2, 4, 512, 64, device="cuda", requires_grad=True) for _ in range(3))
a, b = flash_attention(q, k, v, segment_ids=seg, block_q=64, block_k=64), naive_attention(q, k, v, segment_ids=seg)
ga, gb = torch.autograd.grad(a.sum(), (q, k, v)), torch.autograd.grad(b.sum(), (q, k, v))
err = max([(a - b).abs().max().item()] + [(x - y).abs().max().item() for x, y in zip(ga, gb)])
print(f"flash with segments vs naive on CUDA (fp32, TF32 off by default): max abs error {err:.2e}")
assert err < 1e-3
EOF
timeout 180 $PY -m adl_cli pretrain tiny --out "$OUTDIR/tiny" --set train.steps=600 --no-progress > "$OUTDIR/tiny.log" 2>&1 || { status=1; tail -5 "$OUTDIR/tiny.log"; }
timeout 300 $PY -m adl_cli sft addition --out "$OUTDIR/addition" --set init.from="$OUTDIR/tiny" --no-progress 2>&1 | tail -12
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 4e. adl lora on CUDA: LoRA and QLoRA (bitsandbytes' CUDA NF4 kernels, 8-bit AdamW) from the short main job; memory at GPT-2-124M"
for m in addition qlora; do
  timeout 150 $PY -m adl_cli lora $m --out "$OUTDIR/lora-$m" --set init.from="$OUTDIR/tiny" --set train.steps=300 --set data.eval_examples=300 --no-progress 2>&1 | tail -8
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
timeout 120 $PY benchmarks/finetune.py --parts memory --mem-batch 1,4 --json "$OUTDIR/finetune-memory.json" 2>&1 | grep -v "^\[memory\]" | tail -16
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 4f. adl rlhf on CUDA: the reward model and DPO (full and LoRA) from the SFT run of 4d"
timeout 200 $PY -m adl_cli rlhf reward reward --out "$OUTDIR/reward" --set init.from="$OUTDIR/addition" --set train.steps=600 --no-progress 2>&1 | tail -8
[ "${PIPESTATUS[0]}" = 0 ] || status=1
for r in dpo dpo-lora; do
  timeout 150 $PY -m adl_cli rlhf dpo $r --out "$OUTDIR/$r" --set init.from="$OUTDIR/addition" --set train.steps=300 --no-progress 2>&1 | tail -8
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done

echo "== 4g. adl rlhf ppo and grpo on CUDA from a short all-tasks SFT run; inference-time scaling"
timeout 200 $PY -m adl_cli sft tiny --out "$OUTDIR/sft-tiny" --set init.from="$OUTDIR/tiny" --set train.steps=600 --no-progress 2>&1 | tail -10
[ "${PIPESTATUS[0]}" = 0 ] || status=1
for r in ppo grpo; do
  timeout 150 $PY -m adl_cli rlhf $r $r --out "$OUTDIR/$r" --set init.from="$OUTDIR/sft-tiny" --set train.steps=200 --no-progress 2>&1 | tail -10
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
done
timeout 120 $PY -m adl_cli eval "$OUTDIR/sft-tiny" --task count --task reverse --examples 500 --samples 8 --plot "$OUTDIR/scaling.png" --force 2>&1 | tail -24
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 4h. quantization on CUDA: bitsandbytes' CUDA NF4 / LLM.int8() kernels beside adl's methods on the short main job"
timeout 200 $PY -m adl_cli bench-quantize "$OUTDIR/tiny" --device cuda --method int8 --method int4 --method nf4 --method nf4-adl \
  --method llm-int8 --method gptq --method awq --method smoothquant --max-tokens 32768 --plot "$OUTDIR/quant.png" --force 2>&1 | tail -24
[ "${PIPESTATUS[0]}" = 0 ] || status=1

echo "== 4i. sequence models on CUDA: each fast form equals its reference, the scan's speed, a short bench-sequence"
timeout 120 $PY - <<'EOF2'
import torch
from adl_cli.nn.mlstm import mlstm_chunkwise, mlstm_recurrent
from adl_cli.nn.scan import selective_scan
from adl_cli.nn.ssd import ssd
torch.manual_seed(0)
f = dict(device="cuda", dtype=torch.float64)
x, delta = torch.randn(2, 300, 8, **f), torch.nn.functional.softplus(torch.randn(2, 300, 8, **f))
A, B, C = -torch.rand(8, 4, **f) - 0.1, torch.randn(2, 300, 4, **f), torch.randn(2, 300, 4, **f)
y0, _ = selective_scan(x, delta, A, B, C, method="sequential"); y1, _ = selective_scan(x, delta, A, B, C, method="chunked")
print("mamba chunked vs loop (float64, cuda):", float((y1 - y0).abs().max()))
xs, dt = torch.randn(2, 300, 3, 4, **f), torch.nn.functional.softplus(torch.randn(2, 300, 3, **f))
A2 = -torch.rand(3, **f) - 0.1
z0, _ = ssd(xs, dt, A2, B, C, form="recurrent"); z1, _ = ssd(xs, dt, A2, B, C, form="chunked")
print("mamba-2 chunked SSD vs recurrence (float64, cuda):", float((z1 - z0).abs().max()))
q, k, v = (torch.randn(2, 2, 300, 4, **f) for _ in range(3)); i, fg = torch.randn(2, 2, 300, **f), torch.randn(2, 2, 300, **f) + 2
m0, _ = mlstm_recurrent(q, k, v, i, fg); m1, _ = mlstm_chunkwise(q, k, v, i, fg, chunk=32)
print("mlstm chunkwise vs recurrent (float64, cuda):", float((m1 - m0).abs().max()))
assert max(float((y1 - y0).abs().max()), float((z1 - z0).abs().max()), float((m1 - m0).abs().max())) < 1e-9
EOF2
[ $? = 0 ] || status=1
timeout 150 $PY benchmarks/scan.py --device cuda --lengths 1024,4096 --batch 16 --repeats 5 --json "$OUTDIR/scan.json" || status=1
timeout 240 $PY -m adl_cli bench-sequence --models mamba,mamba2,mlstm,lstm,gpt --steps 500 --seeds 1 --out "$OUTDIR/bench-sequence" \
  --plot "$OUTDIR/bench-sequence.png" || status=1

echo "== 5. summary"
$PY - "$OUTDIR" "$PEAK" <<'EOF'
import json, sys
from pathlib import Path
out, peak = Path(sys.argv[1]), float(sys.argv[2]) * 1e12
lad = out / "ladder.json"
if lad.exists():
    r = json.loads(lad.read_text())
    print(f"ladder ({r['device']}, {r['tokens_per_step']:,} tokens/step, MFU vs {r['peak']}):")
    for x in r["rungs"]:
        if x["applies"]:
            extra = f"  compile {x['compile_s']:.0f} s" if x.get("compile_s") else ""
            print(f"  {x['rung']:8s} {x['ms_per_step']:8.1f} ms/step {x['tokens_per_s']:>11,.0f} tok/s  MFU {100 * x['mfu']:5.1f}%  {x['speedup_vs_fp32']:5.2f}x{extra}")
        else:
            print(f"  {x['rung']:8s} {x['note']}")
s = out / "gpt2-run" / "summary.json"
if s.exists():
    d = json.loads(s.read_text())
    n, L, T, C = d["parameters"], 12, 1024, 768
    fpt = 6 * n + 12 * L * T * C
    tps = d["tokens_per_s"]
    print(f"adl pretrain gpt2-124m (1 GPU, batch 32 x 1024, {d['precision']}, compile {d['compile_s'] and round(d['compile_s'])} s, attention {d['attention']}, tf32 {d.get('tf32')}):")
    print(f"  {tps:,.0f} tok/s  MFU {100 * tps * fpt / peak:.1f}% of {peak / 1e12:g} TFLOP/s  (trainer's own MFU vs measured bf16 matmul: {100 * (d['mfu'] or 0):.1f}%)  loss {d['train_loss']:.3f}")
    print(f"  8 GPUs at this rate: one 524,288-token step every {524288 / tps / 8:.2f} s -> 19,073 steps in {19073 * 524288 / tps / 8 / 3600:.1f} h")
EOF
echo "gpu_check: $([ $status = 0 ] && echo OK || echo 'FAILURES above')"
exit $status
