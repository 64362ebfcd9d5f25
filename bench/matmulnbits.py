"""onnxruntime's MatMulNBits at batch 1 on SmolLM2-135M's Linear shapes: fp32 vs int8 activations, by block size.

    python bench/matmulnbits.py [--threads 2] [--rounds 3] [--corrections]

A graph of the 210 decoder Linears of SmolLM2-135M (30 layers of q, k, v, o, gate, up, down; random 4-bit
weights, speed does not depend on their values) as `MatMulNBits`, one token in, run for each
accuracy_level (0: fp32 activations, what an exact export of an fp32-trained int4 base needs; 3: bf16,
where the CPU has a kernel for it; 4: int8 activations, the fast path), block size (32, 64, 128) and
with or without zero points. The configurations take turns for --rounds rounds; medians reported.
--corrections: block 32 only, each Linear with and without the correction product a weight with float minimums
needs (a GGUF's Q4_1, Q5_1, Q4_K, Q5_K: Reshape + ReduceSum of its input, then Gemm with (k_blocks, N) offsets),
as the exporter writes it (export/weight_writers.py, nbits_product).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

HIDDEN, INTER, KV, LAYERS = 576, 1536, 192, 30


def build(block: int, level: int, zero_points: bool, rng: np.random.Generator, correction: bool = False):
    nodes, inits, outs = [], [], []

    def linear(name: str, x: str, K: int, N: int) -> str:
        kb = (K + block - 1) // block
        inits.append(numpy_helper.from_array(rng.integers(0, 256, (N, kb, block // 2), dtype=np.uint8), name + ".B"))
        inits.append(numpy_helper.from_array((rng.random(N * kb, dtype=np.float32) * 0.01 + 0.001), name + ".S"))
        inputs = [x, name + ".B", name + ".S"]
        if zero_points:
            zp = rng.integers(0, 256, N * ((kb + 1) // 2), dtype=np.uint8)
            inits.append(numpy_helper.from_array(zp, name + ".Z"))
            inputs.append(name + ".Z")
        nodes.append(helper.make_node("MatMulNBits", inputs, [name + ".y"], domain="com.microsoft", K=K, N=N, bits=4,
                                      block_size=block, accuracy_level=level))
        if not correction:
            return name + ".y"
        inits.append(numpy_helper.from_array(np.array([0, -1, block], np.int64), name + ".shape"))
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), name + ".axis"))
        inits.append(numpy_helper.from_array(rng.standard_normal((kb, N), dtype=np.float32) * 1e-3, name + ".C"))
        nodes.extend([helper.make_node("Reshape", [x, name + ".shape"], [name + ".blocks"]),
                      helper.make_node("ReduceSum", [name + ".blocks", name + ".axis"], [name + ".sums"], keepdims=0),
                      helper.make_node("Gemm", [name + ".sums", name + ".C", name + ".y"], [name + ".yc"])])
        return name + ".yc"

    for layer in range(LAYERS):
        for n, K, N in (("q", HIDDEN, HIDDEN), ("k", HIDDEN, KV), ("v", HIDDEN, KV), ("o", HIDDEN, HIDDEN),
                        ("gate", HIDDEN, INTER), ("up", HIDDEN, INTER)):
            outs.append(linear(f"l{layer}.{n}", "x", K, N))
        outs.append(linear(f"l{layer}.down", outs[-1], INTER, HIDDEN))
    for o in outs:  # every product feeds the output, so none is pruned
        nodes.append(helper.make_node("ReduceMean", [o], [o + ".m"], keepdims=0))
    nodes.append(helper.make_node("Sum", [o + ".m" for o in outs], ["y"]))
    graph = helper.make_graph(nodes, "linears", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                   helper.make_opsetid("com.microsoft", 1)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=50, help="timed runs a round")
    p.add_argument("--corrections", action="store_true", help="block 32, with and without correction products")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    configs = [(b, level, z) for b in (32, 64, 128) for level in (0, 3, 4) for z in (False, True)]
    if args.corrections:
        configs = [(32, level, False, c) for level in (0, 4) for c in (False, True)]
    sessions = {}
    for c in configs:
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        sessions[c] = ort.InferenceSession(build(*c[:3], rng, *c[3:]).SerializeToString(), so,
                                           providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, HIDDEN), dtype=np.float32)
    times: dict = {c: [] for c in configs}
    for _ in range(args.rounds):
        for c, s in sessions.items():
            for _ in range(5):
                s.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(args.runs):
                s.run(None, {"x": x})
            times[c].append((time.perf_counter() - t) / args.runs * 1e3)
    print(f"SmolLM2-135M's 210 Linears as MatMulNBits, batch 1, {args.threads} threads, median of {args.rounds} rounds")
    print("| block | accuracy_level | zero points | correction products | ms a token |\n|---|---|---|---|---|")
    for (b, level, z, *c), ts in times.items():
        print(f"| {b} | {level} ({['fp32', '', '', 'bf16', 'int8'][level] or '-'}) | {'yes' if z else 'no'} "
              f"| {'yes' if c and c[0] else 'no'} | {np.median(ts):.2f} |")


if __name__ == "__main__":
    main()
