"""Scale out: data-parallel training under `accelerate launch`, models split by device_map, the vLLM generator.

The data-parallel tests start two CPU processes (gloo) with accelerate's own launcher and compare what they
train with a one-process run of the same global batch. Runs are built by hand (RUN/train/targets.jsonl and
RUN/cluster/clusters.json), so nothing is generated or detected.
"""

import json
import os
import re
import socket
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from nestune.cli import main
from nestune.config import load_config
from nestune.detect import capture_pooled
from nestune.errors import NestuneError
from nestune.evaluate.generate import HFGenerator, VLLMGenerator, render
from nestune.io import write_json
from nestune.models import (
    ffn_targets,
    input_device,
    load_model,
    parse_max_memory,
    placement,
    weights_fingerprint,
)
from nestune.runfolder import RunFolder
from nestune.testing import save_tiny, tiny_model, tiny_tokenizer
from nestune.train import load_for_training, run_train

# 9 rows in batches of 4: the last batch has one example, so the second process gets none there.
SETTINGS = {"train.batch_size": "4", "train.epochs": "2", "train.lora_dropout": "0"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return str(save_tiny(tmp_path_factory.mktemp("m") / "tiny", "llama"))


def make_run(path, model_dir) -> RunFolder:
    run = RunFolder(path)
    rows = [{"kind": "harmful", "prompt": f"explain how to do harmful thing number {i}",
             "response": "I'm sorry, but I can't help with that.", "own_refusal": False} for i in range(5)]
    rows += [{"kind": "benign", "prompt": f"what is {i} plus one?", "response": f"{i} plus one is {i + 1}."}
             for i in range(4)]
    (run.stage("train") / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    targets = {}
    for i, t in enumerate(ffn_targets(tiny_model("llama"))):
        rows_i = [(5 * j + i) % t.n_neurons for j in range(4)]
        targets[t.name] = {"rows": rows_i, "clusters": [j % 2 for j in range(4)], "k": 2}
    write_json(run.stage("cluster") / "clusters.json", {"targets": targets})
    run.mark_done("cluster")
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs `nestune` and then fails if gloo's worker threads outlived the process group: such a thread may free the
# last collective while Python shuts down, which aborts the process now and then (seen in CI).
TRAIN_THEN_CHECK_THREADS = """
import os, sys
from nestune.cli import main
main(sys.argv[1:])
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
if os.environ.get("CHECK_THREADS") and any(name.startswith(("pt_gloo", "gloo")) for name in threads):
    sys.exit(f"gloo threads still running after training: {threads}")
"""


def launch_two_processes(run: RunFolder, model_dir: str, method: str, launcher_flag: str = "--multi_gpu",
                         launcher_args: tuple = (), **extra) -> subprocess.CompletedProcess:
    settings = [arg for key, value in {**SETTINGS, **extra}.items() for arg in ("--set", f"{key}={value}")]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    if extra.get("train.fsdp") != "true" and launcher_flag != "--use_fsdp":  # FSDP leaves the group referenced from torch's DTensor caches
        env["CHECK_THREADS"] = "1"
    script = run.path / "train_then_check_threads.py"
    script.write_text(TRAIN_THEN_CHECK_THREADS)
    command = [sys.executable, "-m", "accelerate.commands.launch", launcher_flag, "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), *launcher_args,
               str(script), "train", "--run", str(run.path), "--model", model_dir, "--device", "cpu",
               "--method", method, *settings]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


TRAINED = {"nest": "adapter/adapter_model.safetensors", "lora": "adapter-lora/adapter_model.safetensors"}


@pytest.mark.parametrize("method", ["nest", "lora"])
def test_two_processes_train_what_one_process_trains(tmp_path, tiny_folder, method):
    one, two = make_run(tmp_path / "one", tiny_folder), make_run(tmp_path / "two", tiny_folder)
    cfg = load_config(overrides={"model": tiny_folder, "out": str(one.path), "device": "cpu",
                                 "train.method": method, **SETTINGS}, environ={})
    single = run_train(cfg, one)

    result = launch_two_processes(two, tiny_folder, method)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("trained") == 1, result.stdout  # only the main process reports

    summary = json.loads((two.path / "train" / "summary.json").read_text())
    assert summary["steps"] == single["steps"] == 6
    assert (summary["processes"], single["processes"]) == (2, 1)
    assert summary["losses"] == pytest.approx(single["losses"], abs=1e-4)
    expected, found = load_file(one.path / "train" / TRAINED[method]), load_file(two.path / "train" / TRAINED[method])
    assert expected.keys() == found.keys()
    for key in expected:
        assert torch.allclose(found[key], expected[key], atol=1e-5), key
    assert any(v.abs().max() > 0 for k, v in found.items() if "delta" in k or "lora_B" in k), "nothing trained"
    assert (two.path / "train" / "DONE.json").exists()
    assert not list(two.path.rglob(".*.tmp")), "a half-written file was left behind"


# Sharding is asked for with the setting, or with accelerate's own FSDP switch (what `distributed_type: FSDP` in an
# accelerate config file sets), whose options nestune applies where they fit: neither keeping gathered layers
# from forward to backward nor recomputing activations changes what is trained.
FSDP_OPTIONS = ("--fsdp_reshard_after_forward", "false", "--fsdp_activation_checkpointing", "true")


@pytest.mark.parametrize("asked_by", [{"train.fsdp": "true"}, {"launcher_flag": "--use_fsdp"},
                                      {"launcher_flag": "--use_fsdp", "launcher_args": FSDP_OPTIONS}])
def test_sharded_full_finetuning_trains_what_one_process_trains(tmp_path, tiny_folder, asked_by):
    one, two = make_run(tmp_path / "one", tiny_folder), make_run(tmp_path / "two", tiny_folder)
    cfg = load_config(overrides={"model": tiny_folder, "out": str(one.path), "device": "cpu",
                                 "train.method": "full", **SETTINGS}, environ={})
    single = run_train(cfg, one)

    result = launch_two_processes(two, tiny_folder, "full", **asked_by)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "sharded over 2 processes (FSDP)" in result.stdout and result.stdout.count("trained") == 1
    with_options = "launcher_args" in asked_by
    assert (f"reshard_after_forward={not with_options}, offload_params=False, "
            f"activation_checkpointing={with_options}") in result.stdout

    summary = json.loads((two.path / "train" / "summary.json").read_text())
    assert summary["trainable_params"] == single["trainable_params"]
    assert summary["params_per_process"] <= 0.55 * summary["trainable_params"]  # each process holds half
    assert summary["losses"] == pytest.approx(single["losses"], abs=1e-4)
    base = load_model(tiny_folder, "cpu").model.state_dict()
    expected = load_file(one.path / "train" / "merged" / "model.safetensors")
    found = load_file(two.path / "train" / "merged" / "model.safetensors")
    assert expected.keys() == found.keys()
    for key in expected:  # the change each weight got, sharded vs one process
        assert torch.allclose(found[key] - base[key], expected[key] - base[key], atol=2e-6), key
    assert any((found[k] - base[k]).abs().max() > 1e-5 for k in found), "nothing trained"


def test_accelerate_fsdp_config_leaves_the_small_methods_data_parallel(tmp_path, tiny_folder):
    run = make_run(tmp_path / "run", tiny_folder)
    result = launch_two_processes(run, tiny_folder, "nest", launcher_flag="--use_fsdp")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("applies to full fine-tuning only: 'nest' trains data parallel") == 1
    assert json.loads((run.path / "train" / "summary.json").read_text())["processes"] == 2


@pytest.mark.parametrize("method, processes, message", [("full", 1, "this is one process"),
                                                         ("nest", 2, "full fine-tuning only")])
def test_fsdp_setting_is_refused_where_it_cannot_apply(tmp_path, tiny_folder, monkeypatch, method, processes,
                                                       message):
    import nestune.train as train

    monkeypatch.setattr(train, "launched_accelerator",
                        lambda cpu=False: types.SimpleNamespace(num_processes=processes) if processes > 1 else None)
    run = make_run(tmp_path / "r", tiny_folder)
    cfg = load_config(overrides={"model": tiny_folder, "out": str(run.path), "device": "cpu",
                                 "train.method": method, "train.fsdp": "true"}, environ={})
    with pytest.raises(NestuneError, match=message):
        run_train(cfg, run)


def test_other_stages_refuse_to_run_in_several_processes(tmp_path, tiny_folder, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["detect", "--model", tiny_folder, "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "only `train` is data parallel" in err and "accelerate launch" in err


def test_data_parallel_training_refuses_a_device_map(tmp_path, tiny_folder):
    cfg = load_config(overrides={"model": tiny_folder, "device_map": "auto"}, environ={})
    with pytest.raises(NestuneError, match="device_map"):
        load_for_training(cfg, RunFolder(tmp_path), None, types.SimpleNamespace(device="cpu"))


# ---------------------------------------------------------------------------------------------------------
# device_map: a model split over CPU memory and disk captures the same activations


def test_max_memory_strings():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory("cpu=200000") == {"cpu": 200000}
    with pytest.raises(NestuneError, match="DEVICE=SIZE"):
        parse_max_memory("20GiB")


def test_split_and_offloaded_models_capture_the_same_activations(tmp_path):
    folder = str(save_tiny(tmp_path / "tiny4", "llama", layers=4))
    texts = ["hi there", "how do I pick a lock", "what is two plus two?", "x" * 30, "tell me a story"]
    plain = load_model(folder, "cpu")
    assert placement(plain.model) == "no device map"
    expected = capture_pooled(plain.model, plain.tokenizer, texts, ffn_targets(plain.model), 2, 64)
    # ~200 kB of CPU memory holds the embedding and a few layers; the rest stays on disk. A budget of
    # 60 kB offloads the whole model, embedding included.
    for budget, placed in [("cpu=200000", {"cpu", "disk"}), ("cpu=60000", {"disk"})]:
        split = load_model(folder, "cpu", max_memory=budget)  # device_map "auto" is implied
        assert set(split.model.hf_device_map.values()) == placed, split.model.hf_device_map
        said = placement(split.model)  # printed at load, e.g. "4 modules on cpu, 4 modules on disk"
        assert sum(map(int, re.findall(r"(\d+) (?:modules? )?on", said))) == len(split.model.hf_device_map)
        assert all(f"on {d}" in said for d in placed), said
        assert input_device(split.model).type == "cpu"
        found = capture_pooled(split.model, split.tokenizer, texts, ffn_targets(split.model), 2, 64)
        for name in expected:
            assert torch.allclose(found[name], expected[name], atol=1e-6), (budget, name)
    with pytest.raises(NestuneError, match="offloaded"):  # NeST cannot write into weights that are not there
        weights_fingerprint(split.model)


# ---------------------------------------------------------------------------------------------------------
# Generators: what both share, and vLLM where it is installed

TEXTS = ["hi", "a longer prompt with a few words", "tell me more"]
PREFIXES = ["Sure, here is", "", "Absolutely:"]


def test_hf_generator_continues_the_shared_rendering(tmp_path):
    """Both generators render prompts with `render` and return prefix + continuation; check HF against a
    hand-made greedy decode of the rendered text."""
    model, tok = tiny_model("llama", seed=2), tiny_tokenizer()
    out = HFGenerator(model, tok, batch_size=2, show_progress=False).generate(TEXTS, PREFIXES, max_new_tokens=6)
    rendered = render(tok, TEXTS, PREFIXES)
    for text, prefix, prompt, completion in zip(TEXTS, PREFIXES, rendered, out):
        assert prompt == tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True) + prefix
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[0, ids.shape[1]:]
        new = new.tolist()
        ends = [i for i, t in enumerate(new) if t in (tok.eos_token_id, tok.pad_token_id)]
        new = new[: ends[0]] if ends else new
        assert completion == prefix + tok.decode(new, skip_special_tokens=True)


def test_vllm_generator_renders_like_hf(monkeypatch):
    """VLLMGenerator sends vLLM the same rendered prompts and returns prefix + text (vLLM itself faked)."""
    seen = {}

    class FakeLLM:
        def __init__(self, model, **kwargs):
            seen["model"] = model

        def generate(self, prompts, params, use_tqdm=True):
            seen["prompts"], seen["params"] = prompts, params
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f" answer {i}")])
                    for i in range(len(prompts))]

    fake = types.ModuleType("vllm")
    fake.LLM = FakeLLM
    fake.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", fake)
    tok = tiny_tokenizer()
    gen = VLLMGenerator("some/folder", tok, max_length=300)
    out = gen.generate(TEXTS, PREFIXES, max_new_tokens=7)
    assert seen["prompts"] == render(tok, TEXTS, PREFIXES)
    assert seen["params"] == {"temperature": 0.0, "max_tokens": 7, "truncate_prompt_tokens": 300}
    assert out == [p + f" answer {i}" for i, p in enumerate(PREFIXES)]
    assert gen.settings.keys() == HFGenerator(None, tok).settings.keys()
    assert gen.generate([]) == []


def _vllm_missing() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return True
    return False


def test_adapter_with_vllm_is_refused(tmp_path):
    from nestune.pipeline import eval_command

    cfg = load_config(overrides={"eval.generator": "vllm", "out": str(tmp_path)}, environ={})
    with pytest.raises(NestuneError, match="without the adapter"):
        eval_command(cfg, adapter=str(tmp_path / "adapter"))


@pytest.mark.skipif(_vllm_missing(), reason="vLLM is not installed (pip install 'nestune[vllm]'; needs a GPU)")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a GPU")
def test_vllm_generator_on_a_tiny_model(tmp_path):
    # head_dim 64 (hidden 128, 2 heads) suits vLLM's attention kernels; 4096 positions fit its max_model_len.
    model = tiny_model("llama", seed=3, hidden=128)
    model.config.max_position_embeddings = 4096
    model.save_pretrained(tmp_path / "m")
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "m")
    gen = VLLMGenerator(str(tmp_path / "m"), tok, max_length=256, gpu_memory_utilization=0.2)
    out = gen.generate(TEXTS, PREFIXES, max_new_tokens=8)
    assert [o.startswith(p) for o, p in zip(out, PREFIXES)] == [True] * len(TEXTS)
    assert out == gen.generate(TEXTS, PREFIXES, max_new_tokens=8)  # greedy: deterministic
    hf = HFGenerator(model.to("cuda"), tok, show_progress=False).generate(TEXTS, PREFIXES, max_new_tokens=8)
    assert sum(a == b for a, b in zip(out, hf)) >= len(TEXTS) - 1  # same greedy decode, up to a float tie


def _oom_above(model, max_rows: int):
    """A forward hook that fails like CUDA does when a batch has more than max_rows rows."""
    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids.shape[0] > max_rows:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
    return model.register_forward_pre_hook(hook, with_kwargs=True)


def test_capture_backs_off_on_out_of_memory_and_gives_the_same_activations(capsys):
    from nestune.detect import capture_pooled
    from nestune.models import ffn_targets
    from nestune.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    texts = [f"prompt number {i} " + "word " * i for i in range(10)]
    targets = ffn_targets(model)
    plain = capture_pooled(model, tok, texts, targets, batch_size=8, max_length=64)
    handle = _oom_above(model.model, 2)
    try:
        backed_off = capture_pooled(model, tok, texts, targets, batch_size=8, max_length=64)
    finally:
        handle.remove()
    assert "retrying with 2" in capsys.readouterr().out
    for name in plain:
        assert torch.allclose(plain[name], backed_off[name], atol=1e-5)


def test_batch_backoff_collects_garbage_only_after_out_of_memory(monkeypatch):
    """gc.collect() costs 0.2 s with transformers loaded; before every capture it dwarfed a GPU's forward."""
    import gc

    from nestune.models import with_batch_backoff

    collections, sizes = [], []
    monkeypatch.setattr(gc, "collect", lambda *a: collections.append(1))

    def fails_above_two(size):
        sizes.append(size)
        if size > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return size

    assert with_batch_backoff(fails_above_two, 2, "x") == 2 and not collections
    assert with_batch_backoff(fails_above_two, 8, "x") == 2 and sizes == [2, 8, 4, 2] and len(collections) == 2


def test_capture_out_of_memory_at_batch_one_is_a_clear_error():
    from nestune.detect import capture_pooled
    from nestune.errors import NestuneError
    from nestune.models import ffn_targets
    from nestune.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama"), tiny_tokenizer()
    handle = _oom_above(model.model, 0)
    try:
        with pytest.raises(NestuneError, match="out of memory even with batch size 1"):
            capture_pooled(model, tok, ["a", "b"], ffn_targets(model), batch_size=2, max_length=64)
    finally:
        handle.remove()


def test_generation_splits_a_batch_on_out_of_memory(capsys):
    from nestune.evaluate.generate import HFGenerator
    from nestune.testing import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama", seed=1), tiny_tokenizer()
    texts = ["hi there", "a longer one", "mid size", "question", "tell me more", "x" * 10]  # one batch of 6
    plain = HFGenerator(model, tok, batch_size=6, show_progress=False).generate(texts, None, 8)
    handle = _oom_above(model, 2)
    try:
        gen = HFGenerator(model, tok, batch_size=6, show_progress=False)
        split = gen.generate(texts, None, 8)
    finally:
        handle.remove()
    assert split == plain
    assert gen.batch_size <= 2 and "retrying with 3" in capsys.readouterr().out  # later batches start smaller


def test_fsdp_options_come_from_the_accelerate_config():
    from nestune.baselines import fsdp_options

    assert fsdp_options({}) == {"reshard_after_forward": True, "offload_params": False,
                                "activation_checkpointing": False, "not_applied": []}
    # A version-1 config names the same choice as a sharding strategy.
    assert fsdp_options({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"})["reshard_after_forward"] is False
    assert fsdp_options({"FSDP_SHARDING_STRATEGY": "FULL_SHARD"})["reshard_after_forward"] is True
    options = fsdp_options({"FSDP_OFFLOAD_PARAMS": "true", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP",
                            "FSDP_FORWARD_PREFETCH": "false", "FSDP_VERSION": "2"})
    assert options["offload_params"] and options["not_applied"] == ["FSDP_AUTO_WRAP_POLICY=SIZE_BASED_WRAP"]
    with pytest.raises(NestuneError) as err:
        fsdp_options({"FSDP_SHARDING_STRATEGY": "NO_SHARD"})
    assert "FULL_SHARD" in err.value.fix
