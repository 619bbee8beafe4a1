"""The command modules the app registers, in help order."""

from adl_cli.cli import ablate, bench_attention, bench_context, data, generate, interop, pretrain, recipes, report, tokenizer

MODULES = [pretrain, ablate, generate, tokenizer, data, interop, bench_attention, bench_context, recipes, report]
