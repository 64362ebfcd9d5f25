"""A thin helper for building ONNX graphs op by op, family-agnostic: the decoder (export/decoder_graph.py) and
the encoder (export/encoder_graph.py) both write through it, as do the weight writers (export/weight_writers.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

OPSET = 21
MS = "com.microsoft"


EXTERNAL_MIN = 1024  # bytes: smaller initializers stay inside model.onnx (as onnx's own external-data save does)


class Graph:
    """A thin helper over onnx.helper: nodes with generated names, initializers from numpy.

    data: the external-data file (beside model.onnx) that initializers of 1 KiB or more are written to the
    moment they are added, so a model's weights never wait in memory, as protobuf copies, for the save;
    `save` then writes model.onnx, which refers to them. None keeps every initializer in the proto."""

    def __init__(self, name: str = "model", data: Path | None = None) -> None:
        self.name = name
        self._data = open(data, "wb") if data is not None else None
        self._location = data.name if data is not None else None
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}
        self.names: set[str] = set()  # the initializers' names

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, domain: str = "",
           **attrs) -> str | list[str]:
        self._n += 1
        names = outputs if isinstance(outputs, list) else [f"{op_type.lower()}_{self._n}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=f"{op_type}_{self._n}", domain=domain, **attrs))
        return names[0] if len(names) == 1 else names

    def init(self, name: str, array: np.ndarray) -> str:
        a = np.ascontiguousarray(array) if np.ndim(array) else np.asarray(array)  # keeps 0-d
        if name in self.names:  # two tensors under one name: the graph would read one of them for both
            raise ValueError(f"initializer {name!r} written twice")
        self.names.add(name)
        if self._data is None or a.nbytes < EXTERNAL_MIN:
            self.initializers.append(numpy_helper.from_array(a, name))
            return name
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(a.dtype), dims=a.shape)
        offset = self._data.tell()
        self._data.write(memoryview(a).cast("B"))  # the array's own bytes, no copy
        for key, value in (("location", self._location), ("offset", offset), ("length", a.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        t.data_location = onnx.TensorProto.EXTERNAL
        self.initializers.append(t)
        return name

    def const(self, values: list | float | int, dtype=np.int64) -> str:
        key = (str(values), np.dtype(dtype).str)
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", np.array(values, dtype=dtype))
        return self._consts[key]

    def save(self, path: Path, producer: str) -> None:
        """model.onnx at `path`; the external data file is complete (flushed, closed) first."""
        if self._data is not None:
            self._data.close()
        onnx.save_model(self.model(producer), str(path))

    def model(self, producer: str) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name=producer)
        m.ir_version = 10
        return m
