"""Post-training quantization (`adl quantize`, `adl bench-quantize`): the number grids a weight is
rounded to (grids.py), the methods that choose the rounding (gptq.py; activation.py: SmoothQuant,
AWQ, LLM.int8() as reference math; methods.py: the METHODS registry), the layers a quantized run
holds and their kernels (linear.py, bnb.py), a whole model through a method (apply.py), the
quantized run folder (store.py) and function-preserving outlier channels (outliers.py)."""
