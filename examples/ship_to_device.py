"""Journey 2: turn a trained run into a folder to copy onto a CPU or edge device.

    python examples/ship_to_device.py runs/mine/adapter [--out onnx/mine] [--extra NAME=ADAPTER ...]

Adapter-aware int4: the base keeps the very int4 bytes it was trained on (MatMulNBits), and every
adapter is a small .onnx_adapter file beside it, switchable per request. The export verifies itself
against PyTorch (export_report.json) and refuses to write a folder that does not match. Copy the
folder; on the device `pip install qlora-rt` (no torch) is all it needs. The same as:
    qlora-rt export --model smollm2-135m --adapter runs/mine/adapter --out onnx/mine --weights int4
    qlora-rt export-adapter --adapter runs/other/adapter --onnx onnx/mine --name other
"""

import argparse

from qlora_rt.config import ExportConfig
from qlora_rt.export.exporter import export
from qlora_rt.export.onnx_adapters import export_adapter

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("adapter")
p.add_argument("--model", default="smollm2-135m", help="the base the adapter was trained on")
p.add_argument("--out", default="onnx/mine")
p.add_argument("--extra", action="append", default=[], metavar="NAME=ADAPTER", help="more adapters of the same base")
args = p.parse_args()

report = export(ExportConfig(model=args.model, adapter=args.adapter, out=args.out, mode="adapter-aware",
                             weights="int4", overwrite=True))
for item in args.extra:
    name, path = item.split("=", 1)
    print("added", export_adapter(path, args.out, name, overwrite=True))
print(f"ship {args.out}/ (max |dlogit| vs PyTorch {report['max_abs_logit_diff']:.1e})")
