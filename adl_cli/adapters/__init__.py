"""Adapter kinds for run folders (``runs.ADAPTERS``): importing a module registers its kinds.

``lora``: LoRA, rsLoRA and DoRA through peft (``lora.py``); ``adapter``: Houlsby bottleneck
adapters, adl's own (``houlsby.py``).
"""

ADAPTER_MODULES = ("adl_cli.adapters.lora", "adl_cli.adapters.houlsby")


def register_all() -> None:
    import importlib

    for name in ADAPTER_MODULES:
        importlib.import_module(name)
