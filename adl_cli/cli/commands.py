"""The command modules the app registers, in help order."""

from adl_cli.cli import bench_attention, bench_context, data, generate, interop, pretrain, recipes, report, tokenizer

MODULES = [pretrain, generate, tokenizer, data, interop, bench_attention, bench_context, recipes, report]
