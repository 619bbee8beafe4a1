"""The command modules the app registers, in help order."""

from adl_cli.cli import generate, pretrain, recipes, report, tokenizer

MODULES = [pretrain, generate, tokenizer, recipes, report]
