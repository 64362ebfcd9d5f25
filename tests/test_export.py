"""`qlora-rt export` / `export-adapter` end to end on a tiny trained model."""

import json

import numpy as np
import pytest

from qlora_rt.cli import main
from qlora_rt.config import ExportConfig
from qlora_rt.errors import QloraError


@pytest.mark.parametrize("mode,weights", [("merged", "fp32"), ("merged", "fp16"), ("merged", "int4"),
                                          ("adapter-aware", "fp32"), ("adapter-aware", "fp16"),
                                          ("adapter-aware", "nf4"), ("adapter-aware", "int4")])
def test_export_verifies_itself(tiny_llama, tiny_runs, mode, weights, monkeypatch):
    from qlora_rt.export import verify
    from qlora_rt.export.exporter import export

    monkeypatch.setattr(verify, "SPILL_FROM", 0)  # every weight of the tiny model waits on disk, as a 1B one's

    tmp, adapters = tiny_runs
    out = tmp / f"{mode}-{weights}"
    report = export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(out), mode=mode,
                                 weights=weights))
    if weights == "int4":  # requantized: reported, not bit-exact
        assert 0 < report["int4_relative_weight_error_mean"] < 0.15 and report["tolerance"] is None
    else:
        assert report["max_abs_logit_diff"] <= {"fp32": 1e-4, "nf4": 1e-4, "fp16": 5e-2}[weights]
        assert report["greedy_agreement"] == 1.0
    assert json.loads((out / "export_report.json").read_text())["max_abs_logit_diff"] == report["max_abs_logit_diff"]
    meta = json.loads((out / "qlora_rt_export.json").read_text())
    assert meta["layers"] == 2 and meta["kv_heads"] == 2 and (out / "tokenizer.json").exists()
    assert (out / "adapters" / "default.onnx_adapter").exists() == (mode == "adapter-aware")


def test_two_adapters_of_different_ranks_switch_per_run(tiny_llama, tiny_runs, tiny_export):
    import torch

    from qlora_rt.runtime import Model
    from qlora_rt.trained import open_trained

    _, adapters = tiny_runs
    out = tiny_export
    ids = np.array([[5, 17, 42, 99, 7]], np.int64)
    results, runtime = {}, Model(out)  # one session: adapters switch per call
    for name in ("a", "b", None, "a"):
        results[name] = runtime.logits(ids[0].tolist(), adapter=name)[None]
        loaded, _, _ = open_trained(str(tiny_llama), adapters[name] if name else None, "nf4")
        with torch.no_grad():
            ref = loaded.model.eval()(input_ids=torch.from_numpy(ids)).logits.numpy()
        assert np.abs(results[name] - ref).max() <= 1e-4, name
    assert np.abs(results["a"] - results["b"]).max() > 1e-3


def test_export_errors(tiny_llama, tiny_runs, tmp_path, capsys):
    from qlora_rt.export.exporter import export

    _, adapters = tiny_runs
    (tmp_path / "exists").mkdir()
    with pytest.raises(QloraError, match="already exists"):
        export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(tmp_path / "exists")))
    with pytest.raises(QloraError, match="--mode merged needs --adapter"):
        export(ExportConfig(model=str(tiny_llama), out=str(tmp_path / "m"), mode="merged"))
    with pytest.raises(QloraError, match="no longer the trained NF4 base"):
        export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(tmp_path / "m"),
                            mode="merged", weights="nf4"))
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects an unknown --weights itself
        main(["export", "--model", str(tiny_llama), "--out", str(tmp_path / "x"), "--weights", "int3"])
    assert exit_info.value.code == 2 and "invalid choice: 'int3'" in capsys.readouterr().err
    good = tmp_path / "good"
    export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(good)))
    before = (good / "model.onnx_data").read_bytes()
    with pytest.raises(QloraError, match="exceeds --tolerance"):
        export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["b"]), out=str(good), overwrite=True,
                            tolerance=0.0, weights="fp16"))
    assert (good / "model.onnx_data").read_bytes() == before  # the failed export replaced nothing
    merged = tmp_path / "merged"
    export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(merged), mode="merged"))
    assert main(["export-adapter", "--adapter", str(adapters["b"]), "--onnx", str(merged), "--name", "b"]) == 2
    assert "merged export" in capsys.readouterr().err
    assert main(["export-adapter", "--adapter", str(adapters["b"]), "--onnx", str(good), "--name", "default"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["export-adapter", "--adapter", str(adapters["b"]), "--onnx", str(good), "--name", "b"]) == 0
    narrow = tmp_path / "narrow"  # LoRA inputs on q_proj/v_proj only: an all-linear adapter does not fit
    export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["b"]), out=str(narrow)))
    assert main(["export-adapter", "--adapter", str(adapters["a"]), "--onnx", str(narrow), "--name", "a"]) == 2
    assert "no LoRA input in this export" in capsys.readouterr().err


def test_merged_int4_is_rounded_by_gptq_on_the_runs_own_data(tiny_llama, tiny_runs, tmp_path):
    from qlora_rt.export.exporter import export

    _, adapters = tiny_runs
    reports = {r: export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(tmp_path / r),
                                      mode="merged", weights="int4", int4_rounding=r)) for r in ("gptq", "rtn")}
    assert reports["gptq"]["int4_rounding"].startswith("gptq (") and "train.jsonl" in reports["gptq"]["int4_rounding"]
    assert reports["rtn"]["int4_rounding"] == "rtn, block 32"
    assert reports["gptq"]["mean_abs_logit_diff"] < reports["rtn"]["mean_abs_logit_diff"]
    with pytest.raises(QloraError, match="--calibration: .*not found"):
        export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(tmp_path / "x"),
                            mode="merged", weights="int4", calibration=str(tmp_path / "nope.jsonl")))


def test_quantized_head_where_the_export_is_approximate_anyway(tiny_llama, tiny_runs, tmp_path):
    import torch
    from conftest import save_checkpoint
    from transformers import AutoModelForCausalLM

    from qlora_rt.export.exporter import export
    from qlora_rt.export.int4_weights import int8_head

    plain = save_checkpoint(tmp_path / "plain", tie=True)
    model = AutoModelForCausalLM.from_pretrained(plain)
    emb = model.get_input_embeddings().weight
    inputs = int8_head(emb)[0]  # put the embedding on an 8-bit grid, as a GGUF Q8_0 embedding is
    q8 = (torch.from_numpy(inputs["qweight"]).float() - 128) * torch.from_numpy(inputs["scales"])[..., None]
    with torch.no_grad():
        emb.copy_(q8.flatten(1)[:, : emb.shape[1]])
    model.save_pretrained(tmp_path / "q8")
    for f in plain.glob("*token*"):
        (tmp_path / "q8" / f.name).write_bytes(f.read_bytes())
    exact = export(ExportConfig(model=str(plain), out=str(tmp_path / "fp32"), quant="nf4", weights="fp32"))
    assert exact["head"] == "fp32"  # exact: fp32
    forced = export(ExportConfig(model=str(tmp_path / "q8"), out=str(tmp_path / "q8-int8"), quant="nf4",
                                 weights="fp32", head="int8", tolerance=1.0))
    assert forced["head"].startswith("int8 (weights lossless") and forced["max_abs_logit_diff"] < 0.1
    _, adapters = tiny_runs
    merged = export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(tmp_path / "m"),
                                 mode="merged", weights="int4"))  # requantized: approximate, so auto takes int4
    assert merged["head"].startswith("int4 (gptq, weights ") and "relative error" in merged["head"]


def test_int4_head_is_gptq_rounded_on_the_calibration_data(tiny_llama, tiny_runs, tmp_path):
    from qlora_rt.export.exporter import export

    _, adapters = tiny_runs
    reports = {r: export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["a"]), out=str(tmp_path / r),
                                      mode="merged", weights="int4", head="int4", int4_rounding=r))
               for r in ("gptq", "rtn")}
    assert reports["gptq"]["head"].startswith("int4 (gptq, weights ")
    assert reports["rtn"]["head"].startswith("int4 (rtn, weights ")
    assert reports["gptq"]["mean_abs_logit_diff"] < reports["rtn"]["mean_abs_logit_diff"]


def test_overwrite_replaces_only_an_export(tiny_llama, tiny_runs, tiny_export, tmp_path, capsys):
    """--overwrite pointed at a run folder (or any folder not written by export) refuses and touches nothing."""
    import shutil

    from qlora_rt.export.exporter import export

    tmp, adapters = tiny_runs
    run = shutil.copytree(adapters["a"].parent, tmp_path / "run-copy")
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    argv = ["export", "--model", str(tiny_llama), "--adapter", str(adapters["a"]), "--out", str(run), "--overwrite"]
    assert main(argv) == 2
    assert ("--overwrite: refusing to replace" in capsys.readouterr().err
            and sorted(p.relative_to(run) for p in run.rglob("*")) == before)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(QloraError, match="it is a file"):
        export(ExportConfig(model=str(tiny_llama), out=str(tmp_path / "notes.txt"), overwrite=True))
    out = shutil.copytree(tiny_export, tmp_path / "export")  # an export: replaced, once the new one verified
    export(ExportConfig(model=str(tiny_llama), adapter=str(adapters["b"]), out=str(out), overwrite=True))
    assert [p.name for p in (out / "adapters").iterdir()] == ["default.onnx_adapter"]
    inside = shutil.copytree(adapters["a"], out / "my-adapter")
    with pytest.raises(QloraError, match="which this command reads"):
        export(ExportConfig(model=str(tiny_llama), adapter=str(inside), out=str(out), overwrite=True))


def test_adapter_names_stay_inside_the_export(tiny_runs, tiny_export, tmp_path, capsys):
    _, adapters = tiny_runs
    for name in ("../../x", str(tmp_path / "abs"), "a/b", ".."):
        argv = ["export-adapter", "--adapter", str(adapters["a"]), "--onnx", str(tiny_export), "--name", name]
        assert main(argv) == 2
        assert "is not a plain name" in capsys.readouterr().err
    assert not (tmp_path / "abs.onnx_adapter").exists() and not (tiny_export.parent.parent / "x.onnx_adapter").exists()
    assert sorted(p.name for p in (tiny_export / "adapters").iterdir()) == ["a.onnx_adapter", "b.onnx_adapter"]


def test_a_damaged_export_folder_is_one_line(tiny_runs, tiny_export, tmp_path):
    import shutil

    from qlora_rt.export.onnx_adapters import export_adapter
    from qlora_rt.runtime import Model

    bad = shutil.copytree(tiny_export, tmp_path / "bad")
    data = bad / "model.onnx_data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(QloraError, match=r"model.onnx_data is 1,000 bytes; the export wrote [\d,]+: it was cut short"):
        Model(bad)
    data.unlink()
    with pytest.raises(QloraError, match=r"has no model.onnx_data \(the model's weights, [\d,]+ bytes\)"):
        Model(bad)
    meta = json.loads((tiny_export / "qlora_rt_export.json").read_text())
    del meta["external_data"]  # an export made before the size was recorded: onnxruntime's own error, in one line
    (bad / "qlora_rt_export.json").write_text(json.dumps(meta))
    with pytest.raises(QloraError, match=r"model.onnx: onnxruntime cannot load it \(.*\); export it again"):
        Model(bad)
    (bad / "qlora_rt_export.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "mode"}))
    with pytest.raises(QloraError, match="--onnx: .* is not a qlora-rt export description .missing mode."):
        export_adapter(str(tiny_runs[1]["a"]), str(bad), "c")


def test_calibration_data_is_found_from_any_directory(tiny_llama, tiny_data, tmp_path, monkeypatch):
    """run.yaml records the data relative to itself, so an int4 export run elsewhere still finds it."""
    import shutil

    from qlora_rt.config import TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.train.run import train

    project = tmp_path / "project"
    shutil.copytree(tiny_data, project / "data")
    monkeypatch.chdir(project)
    train(TrainConfig(model=str(tiny_llama), data="data/train.jsonl", out="runs/x", steps=2, rank=4, seq_len=32,
                      checkpoint_every=0, eval_every=0))
    assert yaml_data(project / "runs" / "x" / "run.yaml") == "../../data/train.jsonl"
    monkeypatch.chdir(tmp_path)
    report = export(ExportConfig(model=str(tiny_llama), adapter="project/runs/x/adapter", out="m", mode="merged",
                                 weights="int4"))
    assert report["int4_rounding"].startswith("gptq (") and "train.jsonl" in report["int4_rounding"]
    assert main(["train", "--config", "project/runs/x/run.yaml", "--out", "again"]) == 0  # its paths resolve too


def yaml_data(path) -> str:
    import yaml

    return yaml.safe_load(path.read_text())["data"]


def test_approximate_int4_is_judged_by_its_next_token_distributions(tiny_llama, tiny_runs, tmp_path, monkeypatch):
    """A requantized int4 export has no logit tolerance, so it is held to the model's next-token
    distributions instead: a correct GPTQ export passes, a graph with wrong scales fails and writes nothing."""
    import qlora_rt.export.int4_weights as ei
    from qlora_rt.export.exporter import export

    _, adapters = tiny_runs
    kw = dict(model=str(tiny_llama), adapter=str(adapters["a"]), mode="merged", weights="int4", max_kl=1e-3,
              min_top1=0.95)  # a tiny random model's logits are flat: the real-model defaults are looser
    good = export(ExportConfig(out=str(tmp_path / "good"), **kw))
    assert good["mean_kl"] < 1e-3 and good["top1_agreement"] >= 0.95 and good["positions"] > 100
    assert good["tolerance"] is None and good["max_kl"] == 1e-3
    real = ei.requantize

    def corrupted(w, block, H=None):  # every requantized weight's scales twice what they should be
        inputs, s, err = real(w, block, H)
        return {**inputs, "scales": inputs["scales"] * 2}, s, err

    monkeypatch.setattr(ei, "requantize", corrupted)
    with pytest.raises(QloraError, match=r"export check failed: next-token distributions vs PyTorch over \d+ "
                                         r"positions: mean KL .*; nothing was written"):
        export(ExportConfig(out=str(tmp_path / "bad"), **kw))
    assert not (tmp_path / "bad").exists()
    exact = export(ExportConfig(out=str(tmp_path / "fp32"), **{**kw, "weights": "fp32"}))
    assert exact["max_kl"] is None and exact["mean_kl"] < 1e-9  # exact formats keep their logit tolerance


@pytest.mark.parametrize("quant,weights,tie", [("int4", "int4", True), ("int4", "int4", False), ("nf4", "nf4", True)])
def test_a_head_trained_quantized_is_exported_as_trained(tiny_data, tmp_path, quant, weights, tie):
    """--quant-head: the head trains frozen in the base's 4-bit format (untied from the embedding), and the
    adapter-aware export runs those very bytes, so it stays exact; the merge writes an untied fp32 head."""
    import onnx
    import torch
    from conftest import save_checkpoint
    from transformers import AutoModelForCausalLM

    from qlora_rt.base.formats import dequantize
    from qlora_rt.config import TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.lora.layers import QuantLinear, lora_layers
    from qlora_rt.merge import merge
    from qlora_rt.train.run import train
    from qlora_rt.trained import open_trained

    base = save_checkpoint(tmp_path / "base", tie=tie)
    run = train(TrainConfig(model=str(base), data=str(tiny_data / "train.jsonl"), out=str(tmp_path / "run"),
                            quant=quant, quant_head=True, steps=3, batch_size=2, seq_len=64, lr=1e-2,
                            checkpoint_every=0, eval_every=0))
    loaded = open_trained(str(base), str(run.adapter))[0]
    head = loaded.model.get_output_embeddings()
    assert isinstance(head, QuantLinear) and "lm_head" not in lora_layers(loaded.model)  # frozen, never adapted
    assert head.weight is not loaded.model.get_input_embeddings().weight and head.weight.dtype == torch.uint8
    report = export(ExportConfig(model=str(base), adapter=str(run.adapter), out=str(tmp_path / "onnx"),
                                 weights=weights, int4_compute="fp32"))
    assert report["tolerance"] == 1e-3 and report["max_abs_logit_diff"] <= 1e-4, report["max_abs_logit_diff"]
    assert "as trained" in report["head"] and report["greedy_agreement"] == 1.0
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node if "lm_head.qweight" in n.input] == [
        "MatMulNBits" if weights == "int4" else "MatMulBnb4"]
    assert json.loads((tmp_path / "onnx" / "qlora_rt_export.json").read_text())["base_quant"] == f"{quant}+head"

    if quant == "int4":  # a merge is requantized off the base's own grid (block 32 -> 64), its head kept as trained
        report = export(ExportConfig(model=str(base), adapter=str(run.adapter), out=str(tmp_path / "onnx-merged"),
                                     mode="merged", weights="int4", int4_rounding="rtn"))
        assert report["int4_rounding"] == "rtn, block 64" and "as trained" in report["head"]

    merged = AutoModelForCausalLM.from_pretrained(merge(str(base), str(run.adapter), str(tmp_path / "merged")))
    assert not merged.config.tie_word_embeddings
    assert torch.equal(merged.lm_head.weight, dequantize(head.weight))
    assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)


def test_an_adapter_fits_only_the_head_format_it_was_trained_with(tiny_llama, tiny_runs, tiny_data, tmp_path):
    """An export of a --quant-head base refuses an adapter trained with the head in full precision."""
    from qlora_rt.config import TrainConfig
    from qlora_rt.export.exporter import export
    from qlora_rt.export.onnx_adapters import export_adapter
    from qlora_rt.train.run import train

    run = train(TrainConfig(model=str(tiny_llama), data=str(tiny_data / "train.jsonl"), out=str(tmp_path / "run"),
                            quant="nf4", quant_head=True, steps=1, batch_size=2, seq_len=64,
                            checkpoint_every=0, eval_every=0))
    export(ExportConfig(model=str(tiny_llama), adapter=str(run.adapter), out=str(tmp_path / "onnx"), weights="nf4"))
    with pytest.raises(QloraError, match=r"trained on a nf4 base; this export's base was trained as nf4\+head"):
        export_adapter(str(tiny_runs[1]["a"]), str(tmp_path / "onnx"), "plain")


def test_teacher_forced_greedy_check_finds_the_first_disagreement():
    from qlora_rt.export.verify import greedy_prefix

    def logits_picking(picks: list[int]) -> np.ndarray:  # PyTorch's choice after each prefix
        return np.eye(8, dtype=np.float32)[picks]

    prompt = 3  # positions 0-1 are the prompt's own; the pick after the prompt is row 2
    assert greedy_prefix(logits_picking([0, 0, 5, 6, 7]), prompt, [5, 6, 7], "length", [1]) == (3, 3)
    assert greedy_prefix(logits_picking([0, 0, 5, 4, 7]), prompt, [5, 6, 7], "length", [1]) == (1, 3)
    assert greedy_prefix(logits_picking([0, 0, 4, 6, 7]), prompt, [5, 6, 7], "length", [1]) == (0, 3)
    # onnxruntime stopped at end-of-sequence: PyTorch must choose to stop there too
    assert greedy_prefix(logits_picking([0, 0, 5, 6, 1]), prompt, [5, 6], "stop", [1]) == (3, 3)
    assert greedy_prefix(logits_picking([0, 0, 5, 6, 2]), prompt, [5, 6], "stop", [1]) == (2, 3)
    assert greedy_prefix(logits_picking([0, 0, 1]), prompt, [], "stop", [1]) == (1, 1)


def test_weights_wait_on_disk_while_onnxruntime_runs(tmp_path):
    import torch

    from qlora_rt.export.verify import weights_on_disk

    model = torch.nn.Sequential(torch.nn.Embedding(64, 16), torch.nn.Linear(16, 64))
    model[1].weight = model[0].weight  # tied, as a decoder's head
    model.register_buffer("bf16", torch.randn(8, 8).bfloat16())
    model.register_buffer("small", torch.randn(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with weights_on_disk(model, tmp_path, min_bytes=64):
        assert model[0].weight.numel() == 0 and model.bf16.numel() == 0 and model.small.numel() == 3
        assert (tmp_path / "weights.bin").stat().st_size == 64 * 16 * 4 + 64 * 4 + 8 * 8 * 2
    assert not (tmp_path / "weights.bin").exists() and model[1].weight is model[0].weight
    assert all(torch.equal(before[k], v) and before[k].dtype == v.dtype for k, v in model.state_dict().items())
    with weights_on_disk(model, tmp_path / "missing", min_bytes=64):  # a disk that cannot take them
        assert model[0].weight.numel() == 64 * 16  # stay in memory
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    import resource
    import signal

    # a disk that fills after the first tensor: that one waits on disk, the others stay in memory
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 16 * 4 + 100, limits[1]))
        with weights_on_disk(model, tmp_path, min_bytes=64):
            assert model[0].weight.numel() == 0 and model[1].bias.numel() == 64
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batched_logits_equal_one_forward_per_sequence(tiny_llama, tiny_export):
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_rt.export.verify import batches, torch_logits
    from qlora_rt.runtime import Model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    seqs = [[5, 9, 31, 7, 2, 44], [8], [12, 13, 14], [100, 3, 3, 3, 3, 3, 3, 3, 9]]
    assert batches([len(s) for s in seqs], 320, 1) == [[3], [0], [2], [1]]  # alone when nothing fits
    assert batches([len(s) for s in seqs], 320, 2 * 9 * 320) == [[3, 0], [2, 1]]
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([s])).logits[0].numpy() for s in seqs]
    for a, b in zip(alone, torch_logits(model, seqs)):  # right-padded
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5
    runtime = Model(tiny_export)
    for a, b in zip(map(runtime.logits, seqs), runtime.logits_batch(seqs)):  # left-padded
        assert a.shape == b.shape and np.abs(a - b).max() < 1e-5


def test_gptq_statistics_a_layer_at_a_time_equal_one_whole_forward(tiny_llama, tiny_runs, tiny_data):
    """The calibration carries the batches' hidden states a decoder layer at a time (only one layer's H in
    memory); its H must be those of one forward of the whole trained model, head included."""
    import torch

    from qlora_rt.export.calibration import HEAD, accumulate, hessians
    from qlora_rt.lora.layers import lora_layers
    from qlora_rt.train.text_data import collate, load_examples
    from qlora_rt.trained import open_trained

    _, adapters = tiny_runs
    loaded, _, _ = open_trained(str(tiny_llama), str(adapters["a"]))
    model, tok = loaded.model, loaded.tokenizer
    names = set(lora_layers(model)) | {HEAD}
    data = tiny_data / "train.jsonl"
    lazy, tokens = hessians(model, tok, data, names, batch_size=3)
    examples = load_examples(data, tok, 256)[0][:64]
    batches = [collate(examples[i:i + 3], tok.pad_token_id) for i in range(0, len(examples), 3)]
    finals = []
    whole, count = accumulate(model, names - {HEAD}, batches, lambda b: finals.append(
        (model.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[0], b["attention_mask"])))
    head = sum(x.float()[m.bool()].T @ x.float()[m.bool()] for x, m in finals)
    assert tokens == count > 0
    order = sorted(names - {HEAD}, key=lambda n: int(n.split(".layers.")[1].split(".")[0]))
    for name in order:  # the export's order: layer by layer, then the head
        got = lazy.pop(name)
        assert torch.allclose(got, whole[name], rtol=1e-4, atol=1e-3), name
    assert torch.allclose(lazy.pop(HEAD), head, rtol=1e-4, atol=1e-3)
    lazy.names.add(order[0])  # asked for again once the hidden states have passed its layer
    with pytest.raises(QloraError, match="after its layer was calibrated"):
        lazy.get(order[0])


def test_weights_nf4_for_an_int4_base_is_refused_before_the_model_loads(tiny_llama, tiny_runs, tmp_path, monkeypatch):
    """What the adapter's files (or a bare base's default) say is checked before open_trained loads the model."""
    import qlora_rt.export.exporter as exporter
    from qlora_rt.config import ExportConfig
    from qlora_rt.errors import QloraError

    def never(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(exporter, "open_trained", never)
    with pytest.raises(QloraError, match=r"needs a base trained in nf4 or fp4, and a bare base .* is int4: use"):
        exporter.export(ExportConfig(model=str(tiny_llama), out=str(tmp_path / "a"), weights="nf4"))
    with pytest.raises(AssertionError, match="loaded before"):  # an nf4-trained adapter passes the check
        exporter.export(ExportConfig(model=str(tiny_llama), adapter=str(tiny_runs[1]["a"]), out=str(tmp_path / "b"),
                                     weights="nf4"))
    assert not (tmp_path / "a").exists()
