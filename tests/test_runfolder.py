"""Run folders: finished stages record their settings, and a rerun with other settings is refused."""

from __future__ import annotations

import json

import pytest

from nestune.config import load_config
from nestune.errors import NestuneError
from nestune.runfolder import PIPELINE_STAGES, RunFolder, stage_settings


def config(**sets):
    overrides = {"model": "smollm2-135m", **{key.replace("__", "."): value for key, value in sets.items()}}
    return load_config(overrides=overrides, environ={})


def finished_run(path, cfg, stages=PIPELINE_STAGES) -> RunFolder:
    run = RunFolder(path)
    run.save_config(cfg)
    for name in stages:
        run.mark_done(name)
    return run


def test_stage_settings_hold_what_each_stage_depends_on():
    cfg = config()
    detect, cluster, train = (stage_settings(cfg, s) for s in ("detect", "cluster", "train"))
    before, after = stage_settings(cfg, "eval-before"), stage_settings(cfg, "eval-after")
    assert detect["detect.z_threshold"] == cfg.detect.z_threshold and "cluster.k_max" not in detect
    assert set(detect) < set(cluster) < set(train) and "train.lr" in train and "eval.n_behaviours" not in train
    assert "eval.n_behaviours" in before and "train.lr" not in before and "detect.z_threshold" not in before
    fold = stage_settings(cfg, "fold")
    assert set(train) < set(fold) < set(after) and set(fold) - set(train) == {"fold.scale", "fold.drop_clusters"}
    cfg.fold.drop_clusters = 5  # the attribution reads the over-refusal set's look-alikes
    assert set(stage_settings(cfg, "fold")) - set(fold) == {"eval.overrefusal"}
    cfg.fold.drop_clusters = 0
    for settings in (detect, train, after):  # speed-only keys are left out
        assert not {"detect.batch_size", "eval.batch_size", "eval.generator"} & set(settings)
    lora = stage_settings(config(train__method="lora"), "train")
    assert "detect.harmful" in lora and "detect.z_threshold" not in lora and "cluster.k_max" not in lora


def test_done_json_records_the_settings(tmp_path):
    cfg = config(train__lr=0.3)
    run = finished_run(tmp_path / "r", cfg, ["train"])
    recorded = json.loads((run.path / "train" / "DONE.json").read_text())["settings"]
    assert recorded == stage_settings(cfg, "train") and recorded["train.lr"] == 0.3


def test_same_or_speed_only_settings_resume(tmp_path):
    run = finished_run(tmp_path / "r", config())
    run.check_resumable(config())
    run.check_resumable(config(eval__batch_size=7, detect__batch_size=3))


@pytest.mark.parametrize("key, value, first, folders", [
    ("detect__z_threshold", 2.5, "detect", ["detect", "cluster", "train", "fold", "eval-after"]),
    ("train__lr", 0.7, "train", ["train", "fold", "eval-after"]),
    ("train__benign", "benign-qa+mt-bench", "train", ["train", "fold", "eval-after"]),
    ("fold__scale", 0.5, "fold", ["fold", "eval-after"]),  # a new share of the update: refold, not retrain
    ("eval__n_behaviours", 5, "eval-before", ["eval-before/DONE.json", "eval-after/DONE.json"]),
    # the evaluation before reads its benign (KL) prompts from detect.benign: kept, it would compare
    # next-token distributions of other prompts than the evaluation after
    ("detect__benign", "my-benign.txt", "detect", ["detect", "cluster", "eval-before", "train", "fold", "eval-after"]),
])
def test_changed_settings_are_refused(tmp_path, key, value, first, folders):
    run = finished_run(tmp_path / "r", config())
    with pytest.raises(NestuneError) as err:
        run.check_resumable(config(**{key: value}))
    message = str(err.value)
    assert f"'{run.path / first}' finished with other settings" in message
    assert f"{key.replace('__', '.')}=" in message and f"(now {value!r})" in message
    assert "delete " + " and ".join(str(run.path / f) for f in folders) in message


@pytest.mark.parametrize("n_lookalike, folders", [
    # training on the set's look-alikes: the training, and all that follows it, came from the old set
    (32, ["eval-before/DONE.json", "train", "fold", "eval-after"]),
    (0, ["eval-before/DONE.json", "eval-after/DONE.json"]),  # only the evaluations read the set
])
def test_a_changed_overrefusal_set_redoes_the_training_that_read_it(tmp_path, n_lookalike, folders):
    run = finished_run(tmp_path / "r", config(train__n_lookalike=n_lookalike))
    with pytest.raises(NestuneError) as err:
        run.check_resumable(config(train__n_lookalike=n_lookalike, eval__overrefusal="my-lookalikes.txt"))
    assert "delete " + " and ".join(str(run.path / f) for f in folders) in str(err.value)


def test_stages_finished_before_settings_were_recorded_resume(tmp_path):
    run = finished_run(tmp_path / "r", config())
    done = run.path / "detect" / "DONE.json"
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "settings"}))
    RunFolder(run.path).check_resumable(config(detect__z_threshold=2.5), ["detect"])


def test_refused_rerun_leaves_config_json_alone(tmp_path):
    from nestune.pipeline import run_pipeline

    run = finished_run(tmp_path / "r", config())
    cfg = config(train__lr=0.7)
    cfg.out = str(run.path)
    with pytest.raises(NestuneError, match="train.lr"):
        run_pipeline(cfg)
    assert json.loads((run.path / "config.json").read_text())["train"]["lr"] == 0.0


def test_unfinished_stage_with_other_settings_is_refused(tmp_path):
    """A killed training's checkpoint must not be continued under another lr; an unfinished evaluation's
    answers serve other evaluation settings of the same model."""
    run = RunFolder(tmp_path / "r")
    run.save_config(config())
    run.mark_done("detect")
    run.mark_done("cluster")
    run.mark_started("train")
    run.mark_started("eval-before")
    run.check_resumable(config(eval__n_behaviours=48))
    with pytest.raises(NestuneError) as err:
        run.check_resumable(config(train__lr=0.7))
    assert "train' holds unfinished work with other settings: train.lr=0.0 (now 0.7)" in str(err.value)
    assert str(err.value).endswith(f"delete {run.path / 'train'}")
    with pytest.raises(NestuneError, match="eval-before' holds unfinished work with other settings: seed=0"):
        run.check_resumable(config(seed=1), ["eval-before"])


def test_a_stage_records_what_its_input_was_made_with(tmp_path):
    """`nestune cluster` after `nestune detect --z-threshold 2.5` (no flag repeated): cluster ran on 2.5's neurons."""
    path = tmp_path / "r"
    finished_run(path, config(detect__z_threshold=2.5), ["detect"])
    run = finished_run(path, config(cluster__k_max=4), ["cluster"])
    recorded = json.loads((run.path / "cluster" / "DONE.json").read_text())["settings"]
    assert recorded["detect.z_threshold"] == 2.5 and recorded["cluster.k_max"] == 4
    run.check_resumable(config(detect__z_threshold=2.5, cluster__k_max=4))
