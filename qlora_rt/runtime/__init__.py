"""Stage 5, the torch-free runtime: what ships to devices. onnxruntime, numpy, tokenizers and jinja2 only.

Nothing under this package may import torch or a training stage (tests/test_layers.py checks it):

    from qlora_rt.runtime import Model, Classifier
    Model("onnx/my-model").generate("Hi!", chat=True, adapter="default")
    Classifier("onnx/sentiment").classify(["great phone"], adapter="sentiment")
"""

from qlora_rt.runtime.classifier import Classifier, Prediction
from qlora_rt.runtime.decoder import Completion, Model, Sampling, Stream

__all__ = ["Classifier", "Completion", "Model", "Prediction", "Sampling", "Stream"]
