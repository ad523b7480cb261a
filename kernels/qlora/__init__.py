"""The pieces the QLoRA linear (``vlm.kernels.qlora_linear``) is built from, none an op of its own: NF4
dequantization (``nf4``), LoRA's rank-r products from one read of a full-size tensor (``thin_products``), the
widened GEMM input ``[x | x_a | 0]`` (``widen_with_lora``) and the side-stream overlap (``side_stream``)."""
