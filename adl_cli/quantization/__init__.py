"""Post-training quantization (the compression issue's `adl quantize`, in progress): the number
grids a weight is rounded to (grids.py: symmetric absmax, asymmetric with a zero point, the NF4
codebook), the methods that choose the rounding (gptq.py: GPTQ's column-wise error feedback) and
those that read the activations (activation.py: SmoothQuant, AWQ, LLM.int8()).
The weight-only decoding path these feed is inference/quant.py."""
