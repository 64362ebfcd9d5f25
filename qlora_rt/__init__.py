"""qlora-rt: fine-tune a 4-bit frozen base with LoRA adapters, ship it as ONNX, run it offline."""

import logging

__version__ = "0.1.0"

# bitsandbytes logs at import, on CPUs with AVX512-BF16, that it found no hub kernel for its bf16 inference
# path. That path is not ours (qlora_rt.base.formats multiplies in the compute dtype), so the line is noise here.
# Looking for that kernel offline, the `kernels` package also logs that it skipped its publisher trust check.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage())
logging.getLogger("kernels._internals.hf_hub").addFilter(
    lambda record: "kernels-community/quantization-bitsandbytes" not in record.getMessage())
