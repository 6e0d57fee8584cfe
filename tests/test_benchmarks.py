"""The benchmark script runs on a tiny model and writes its results and summary table (no timing checks)."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def load_script(path=SCRIPT):
    # benchmarks/ is not a package: load the script as a module.
    spec = importlib.util.spec_from_file_location("nestune_benchmarks_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_on_a_tiny_model(tmp_path):
    bench = load_script()
    run = tmp_path / "run"
    run.mkdir()
    (run / "timings.json").write_text(json.dumps({"detect": 2.5, "cluster": 0.5, "train": 4.0}))
    out, markdown = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    # One thread: on a busy machine torch's thread barriers make a two-thread run of tiny ops very slow.
    bench.main(["--tiny", "llama", "--repeats", "1", "--threads", "1", "--max-new-tokens", "8",
                "--sections", "train,capture,generate,dtype,e2e", "--run", str(run),
                "--out", str(out), "--markdown", str(markdown)])

    results = json.loads((out / "tiny-llama-cpu.json").read_text())
    for key in ("machine", "train", "capture", "generate", "dtype", "e2e", "figures"):
        assert key in results
    assert results["machine"]["cpu_count"] > 0 and results["machine"]["torch"]

    methods = results["train"]["methods"]
    assert set(methods) == {"floor", "nest", "lora", "full", "neurons"}
    parts = results["train"]["length_parts"]
    assert parts["batches"] == 4 and parts["whole"]["forwards"] == 4 < parts["parts"]["forwards"]
    assert parts["real_tokens"] <= parts["parts"]["padded_tokens"] < parts["whole"]["padded_tokens"]
    for name, m in methods.items():
        assert m["step_s"]["median"] > 0 and m["peak_bytes"] > 0, name
    assert methods["floor"]["trainable_params"] == 0
    assert 0 < methods["nest"]["trainable_params"] < methods["lora"]["trainable_params"]
    assert methods["lora"]["trainable_params"] < methods["full"]["trainable_params"]
    # AdamW keeps two moments per trainable value.
    assert methods["full"]["optimizer_state_bytes"] >= 2 * 4 * methods["full"]["trainable_params"]
    assert methods["nest"]["n_rows"] == methods["neurons"]["n_rows"] == methods["neurons"]["n_updates"]

    for variant in results["capture"]["variants"].values():
        assert variant["tokens_per_s"] > 0
    for variant in results["generate"]["variants"].values():
        assert variant["new_tokens"] > 0 and variant["tokens_per_s"] > 0
    assert results["e2e"]["total_s"] == 7.0
    dtype = results["dtype"]
    assert set(dtype["variants"]) == {"forward_float32", "forward_bfloat16", "generate_float32", "generate_bfloat16"}
    assert dtype["prompts"] == 3 * (1 + len(bench.TINY_TEMPLATES))  # three behaviours of each attack
    assert isinstance(results["machine"]["native_bf16"], bool)
    assert {"dtype.forward", "dtype.generate"} <= {f["key"] for f in results["figures"]}
    assert all(f["value"] > 0 for f in results["figures"])

    text = markdown.read_text()
    assert "### tiny-llama on cpu" in text
    assert "| NeST step time / floor |" in text and "|---|" in text
    assert "shuffled batches of training's shape" in text and "The evaluation's work in fp32 and bf16" in text

    # Rewriting the summary keeps the prose written around the tables.
    markdown.write_text("# Benchmarks\n\nProse before.\n\n" + text[text.index(bench.MARK_START):] + "\nProse after.\n")
    (out / "tiny-cb-rerouting.json").write_text(json.dumps({"model": "tiny", "lrs": {}}))  # another script's
    bench.main(["--markdown-only", "--out", str(out), "--markdown", str(markdown)])
    rewritten = markdown.read_text()
    assert "Prose before." in rewritten and "Prose after." in rewritten
    assert rewritten.count(bench.MARK_START) == 1 and "| NeST step time / floor |" in rewritten


def test_circuit_breaker_trace_runs_on_a_tiny_model(tmp_path):
    from nestune.testing import save_tiny

    script = load_script(SCRIPT.with_name("cb_rerouting.py"))
    model = save_tiny(tmp_path / "model")
    rows = [{"kind": "harmful", "prompt": f"how do I do harmful thing {i}", "response": "I can't help with that.",
             "own_refusal": False, "original": f"Sure, step {i}: first you"} for i in range(4)]
    rows += [{"kind": "benign", "prompt": f"what is {i} plus one?", "response": f"It is {i + 1}."} for i in range(4)]
    targets = tmp_path / "targets.jsonl"
    targets.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = script.main(["--model", str(model), "--lrs", "1e-3", "--steps", "5", "--targets", str(targets),
                          "--out", str(tmp_path / "cb.json")])
    assert json.loads((tmp_path / "cb.json").read_text())["steps"] == 5
    points = result["lrs"]["1e-3"]
    assert [p["step"] for p in points] == [0, 4]
    # the LoRA starts a little off zero: the states start close to the original's, not equal and not far
    assert 0.99 < points[0]["cosine_harmful"] < 1.0 + 1e-6 and 0 < points[0]["distance_benign"] < 1
    assert all(0 < s["top3_share"] <= 1 for s in result["layers"].values())
