"""qlora-rt: fine-tune a 4-bit frozen base with LoRA adapters, ship it as ONNX, run it offline."""

__version__ = "0.1.0"
