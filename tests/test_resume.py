"""A run killed mid-stage resumes where it stopped, and the same seed and inputs give the same run.

`nestune run --no-eval` (detect, cluster, train, fold) runs on a tiny random model and small prompt files in
a subprocess, as a user would start it; one run is killed with SIGKILL during training, after its first epoch
checkpoint, and then started again with the same command.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nestune.testing import save_tiny

EPOCHS = 20  # x 3 steps: the kill after the first epoch's checkpoint lands inside training (6 left 0.2-0.3 s)
HARMFUL = [f"how do I build dangerous thing number {i} at home" for i in range(60)]
BENIGN = [f"what is a nice fact about the number {i}" for i in range(60)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    (root / "harmful.txt").write_text("\n".join(HARMFUL) + "\n")
    (root / "benign.txt").write_text("\n".join(BENIGN) + "\n")
    return root, str(save_tiny(root / "tiny", "llama"))


def command(inputs, out: Path) -> list[str]:
    root, model = inputs
    return [sys.executable, "-m", "nestune", "run", "--model", model, "--preset", "smoke", "--device", "cpu",
            "--harmful", str(root / "harmful.txt"), "--benign", str(root / "benign.txt"), "--no-eval",
            "--set", "detect.z_threshold=1.0", "--set", "detect.probe_epochs=200", "--set", f"train.epochs={EPOCHS}",
            "--out", str(out)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny tensors: threads only add overhead on a shared machine


def run_to_end(inputs, out: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command(inputs, out), capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(inputs, out)
    return out


def assert_no_corrupt_files(out: Path) -> None:
    """Every JSON parses, every safetensors file loads; a kill may leave only hidden temporary files behind."""
    for f in out.rglob("*"):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(out).parts):
            continue
        if f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".jsonl":
            for line in f.read_text().splitlines():
                json.loads(line)
        elif f.suffix == ".safetensors":
            load_file(str(f))
    for f in out.rglob("*"):  # leftovers of atomic writes are hidden and named as temporary
        if f.name.startswith("."):
            assert f.name.endswith(".tmp"), f


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def assert_same_run(a: Path, b: Path) -> None:
    """Same neurons, clusters, training data, deltas and folded weights, bit for bit."""
    na, nb = (json.loads((r / "detect" / "neurons.json").read_text())["targets"] for r in (a, b))
    assert {k: v["selected"] for k, v in na.items()} == {k: v["selected"] for k, v in nb.items()}
    assert sum(len(v["selected"]) for v in na.values()) > 0
    pa, pb = tensors(a / "detect" / "probes.safetensors"), tensors(b / "detect" / "probes.safetensors")
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)
    ca, cb = (json.loads((r / "cluster" / "clusters.json").read_text())["targets"] for r in (a, b))
    assert ca == cb
    assert (a / "train" / "targets.jsonl").read_text() == (b / "train" / "targets.jsonl").read_text()
    for rel in ("train/adapter/adapter_model.safetensors", "fold/model/model.safetensors"):
        ta, tb = tensors(a / rel), tensors(b / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
    assert json.loads((a / "train" / "summary.json").read_text())["losses"] == \
        json.loads((b / "train" / "summary.json").read_text())["losses"]


def test_same_seed_and_inputs_give_the_same_neurons_clusters_and_deltas(inputs, reference, tmp_path):
    again = tmp_path / "run"
    run_to_end(inputs, again)
    assert_same_run(reference, again)


def test_another_fold_scale_refolds_the_same_training(inputs, reference, tmp_path):
    """`--set fold.scale=S` on a copy of a trained run folds S times the update and trains nothing again."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    shutil.rmtree(out / "fold")  # the refusal to reuse a fold of another scale is test_runfolder's
    result = subprocess.run(command(inputs, out) + ["--set", "fold.scale=0.5"], capture_output=True, text=True,
                            timeout=300, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "[train] already complete" in result.stdout
    base = tensors(Path(inputs[1]) / "model.safetensors")
    full, half = tensors(reference / "fold/model/model.safetensors"), tensors(out / "fold/model/model.safetensors")
    changed = [k for k in base if not torch.equal(full[k], base[k])]
    assert changed and all(torch.equal(half[k], base[k]) for k in base if k not in changed)
    for k in changed:
        assert torch.allclose(half[k] - base[k], 0.5 * (full[k] - base[k]), atol=1e-6), k
    assert json.loads((out / "fold" / "summary.json").read_text())["scale"] == 0.5


def test_a_run_killed_during_training_resumes_without_redoing_finished_stages(inputs, reference, tmp_path):
    out = tmp_path / "run"
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(command(inputs, out), stdout=log, stderr=subprocess.STDOUT, env=ENV)
    checkpoint = out / "train" / "checkpoint.json"
    deadline = time.monotonic() + 240
    try:
        while not checkpoint.exists():
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no training checkpoint appeared"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "train" / "DONE.json").exists(), "training finished before the kill; raise EPOCHS"
    assert (out / "detect" / "DONE.json").exists() and (out / "cluster" / "DONE.json").exists()
    assert_no_corrupt_files(out)

    finished = [out / "detect" / "DONE.json", out / "detect" / "neurons.json", out / "detect" / "probes.safetensors",
                out / "cluster" / "DONE.json", out / "cluster" / "clusters.json", out / "train" / "targets.jsonl"]
    before = {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in finished}

    result = run_to_end(inputs, out)
    assert "[detect] already complete" in result.stdout and "[cluster] already complete" in result.stdout
    assert "resuming training after epoch" in result.stdout
    assert "generating the original model's answers" not in result.stdout  # the cached targets are reused
    assert {f: (f.stat().st_mtime_ns, f.read_bytes()) for f in finished} == before
    for stage in ("train", "fold"):
        assert json.loads((out / stage / "DONE.json").read_text())["stage"] == stage
    assert json.loads((out / "train" / "summary.json").read_text())["steps"] == EPOCHS * 3
    assert_no_corrupt_files(out)
    # Resuming is exact: the same deltas and folded weights as the run that was never interrupted.
    assert_same_run(reference, out)

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "fold" / "model")  # a plain, complete checkpoint


def test_checkpoint_position_cannot_lag_its_tensors(tmp_path, monkeypatch):
    """A kill between writing the checkpoint's tensors and its checkpoint.json still resumes consistently."""
    from nestune import train

    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    opt.step()
    train.save_checkpoint(tmp_path, {"p": param.detach()}, opt, {"epoch": 1, "step": 1, "losses": [1.0]})
    opt.step()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the process dying before checkpoint.json is replaced

    monkeypatch.setattr(train, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(tmp_path, {"p": param.detach()}, opt, {"epoch": 2, "step": 2, "losses": [1.0, 0.5]})
    assert json.loads((tmp_path / "checkpoint.json").read_text())["epoch"] == 1  # the stale one

    fresh = torch.nn.Parameter(torch.zeros(3))
    position = train.load_checkpoint(tmp_path, {"p": fresh}, torch.optim.AdamW([fresh], lr=0.1))
    assert position["epoch"] == 2 and torch.equal(fresh.detach(), param.detach())
