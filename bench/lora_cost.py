"""What an adapter's LoRA products cost a decode step on their own, in onnxruntime, on CPU.

    python bench/lora_cost.py [--layers 30] [--ranks 1 16] [--threads 2] [--rounds 5]

A graph of nothing but the adapter-aware export's LoRA products for one token (SmolLM2-135M's shapes:
per layer q/k/v and gate/up as grouped pairs, o and down alone; `export/weight_writers.py`), its A and B bound
as inputs the way the runtime binds an adapter, in these forms:
  fp32   MatMul(x, A) then MatMul(., B): what the export emits (the B product is a Gemm there)
  int8   DynamicQuantizeMatMul with int8 A/B and per-column scales (x quantized per call)
  fp16   fp16 A/B, with Casts around fp16 MatMuls
Rank 1 shows the per-op overhead, rank 16 adds the bytes. The forms take turns for --rounds rounds,
medians printed. This is the floor under the adapter-aware graph's decode step next to the merged one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

HIDDEN, MLP = 576, 1536
# in, members, out
GROUPS = [(HIDDEN, 3, HIDDEN + 2 * 192), (HIDDEN, 1, HIDDEN), (HIDDEN, 2, 2 * MLP), (MLP, 1, HIDDEN)]
FORMS = ("fp32", "int8", "fp16")


def build(form: str, layers: int, rank: int, rng: np.random.Generator) -> tuple[bytes, dict[str, np.ndarray]]:
    f32 = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("x", f32, [1, HIDDEN]), helper.make_tensor_value_info("x2", f32, [1, MLP])]
    nodes, feeds, outs = [], {}, []

    def weight(name: str, w: np.ndarray) -> list[str]:
        if form == "int8":
            scale = (np.abs(w).max(0) / 127 + 1e-12).astype(np.float32)
            arrays = {name: np.clip(np.round(w / scale), -127, 127).astype(np.int8), f"{name}.scale": scale}
        else:
            arrays = {name: w.astype(np.float16 if form == "fp16" else np.float32)}
        for k, v in arrays.items():
            inputs.append(helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), list(v.shape)))
            feeds[k] = v
        return list(arrays)

    def product(x: str, w: list[str], out: str) -> None:
        if form == "int8":
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, *w], [out], domain="com.microsoft"))
        else:
            nodes.append(helper.make_node("MatMul", [x, w[0]], [out]))

    for layer in range(layers):
        for g, (k, members, n) in enumerate(GROUPS):
            r = rank * members
            a = rng.standard_normal((k, r)).astype(np.float32) * 0.02
            b = rng.standard_normal((r, n)).astype(np.float32) * 0.02
            x, p = "x" if k == HIDDEN else "x2", f"l{layer}g{g}"
            if form == "fp16":
                nodes.append(helper.make_node("Cast", [x], [f"{p}.xh"], to=TensorProto.FLOAT16))
                x = f"{p}.xh"
            product(x, weight(f"{p}.A", a), f"{p}.u")
            product(f"{p}.u", weight(f"{p}.B", b), f"{p}.y")
            y = f"{p}.y"
            if form == "fp16":
                nodes.append(helper.make_node("Cast", [y], [f"{p}.yf"], to=TensorProto.FLOAT))
                y = f"{p}.yf"
            outs.append(y)
    nodes.append(helper.make_node("Concat", outs, ["out"], axis=-1))
    graph = helper.make_graph(nodes, "lora", inputs, [helper.make_tensor_value_info("out", f32, [1, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    feeds["x"] = rng.standard_normal((1, HIDDEN)).astype(np.float32)
    feeds["x2"] = rng.standard_normal((1, MLP)).astype(np.float32)
    return model.SerializeToString(), feeds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=100, help="timed runs per round")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    runs = {}
    for rank in args.ranks:
        for form in FORMS:
            model, feeds = build(form, args.layers, rank, rng)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.log_severity_level = args.threads, 3
            session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            binding = session.io_binding()
            values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}  # kept alive
            for k, v in values.items():
                binding.bind_ortvalue_input(k, v)
            binding.bind_output("out")
            megabytes = sum(v.nbytes for k, v in feeds.items() if k not in ("x", "x2")) / 2**20
            runs[(form, rank)] = (session, binding, values, megabytes, [])
    for _ in range(args.rounds):
        for session, binding, _, _, times in runs.values():
            for _ in range(10):
                session.run_with_iobinding(binding)
            t = time.perf_counter()
            for _ in range(args.steps):
                session.run_with_iobinding(binding)
            times.append((time.perf_counter() - t) / args.steps * 1000)
    print(f"LoRA products alone, {args.layers} layers x 4 groups, batch 1, {args.threads} threads, "
          f"median of {args.rounds} rounds")
    print("| form | rank | weights MiB read a token | ms a token |\n|---|---|---|---|")
    for (form, rank), (_, _, _, megabytes, times) in runs.items():
        print(f"| {form} | {rank} | {megabytes:.1f} | {np.median(times):.2f} |")


if __name__ == "__main__":
    main()
