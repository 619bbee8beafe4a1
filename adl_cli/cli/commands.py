"""The command modules the app registers, in help order."""

from adl_cli.cli import (ablate, bench_attention, bench_context, bench_inference, chat, data, distill, evaluate, generate, interop, lora, pretrain, quantize,
                         recipes, report, rlhf, scaling, sequence, sft, tokenizer, vision, bench_vision, bench_sequence)

MODULES = [pretrain, sft, lora, rlhf, ablate, scaling, generate, chat, evaluate, quantize, distill, tokenizer, data, interop, bench_attention, bench_context, bench_inference, recipes,
           report, vision, bench_vision, sequence, bench_sequence]
