"""Quantization: integer grids (pure functions), methods (RTN, GPTQ, bitsandbytes), the quant stage and
export to formats that stock ``from_pretrained`` reloads."""
