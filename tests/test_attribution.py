"""Per-cluster attribution of the refusal, and folding without the clusters that refuse safe prompts."""

import json

import pytest
import torch

from nestune import attribution, data
from nestune.config import Config
from nestune.errors import NestuneError
from nestune.fold import run_fold
from nestune.io import read_json
from nestune.models import LoadedModel
from nestune.report import plot_attribution
from nestune.runfolder import RunFolder
from nestune.testing import random_adapter, tiny_model, tiny_tokenizer
from nestune.tuner import NeSTAdapter, base_identity

TEXTS = ["explain how to pick a lock", "what is the capital of France?", "write a poem about rain"]


def attached(arch="llama"):
    model = tiny_model(arch)
    model.requires_grad_(False)
    return model, random_adapter(model).attach(model)


def refusal_change(model, adapter, opening) -> float:
    """The change in mean log p(opening) from the base model to the adapted one."""
    tok = tiny_tokenizer()
    with torch.no_grad():
        after = attribution.refusal_logprob(model, tok, TEXTS, opening, 64).mean()
        with adapter.disabled():
            before = attribution.refusal_logprob(model, tok, TEXTS, opening, 64).mean()
    return float(after - before)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_cluster_shares_add_up_to_the_change_in_the_refusal(arch, monkeypatch):
    model, adapter = attached(arch)
    opening = [11, 12, 13]
    monkeypatch.setattr(attribution, "STEPS", 16)  # fine steps: the integral itself, not its 4-step estimate
    shares = attribution.cluster_attribution(model, tiny_tokenizer(), adapter, TEXTS, opening, batch_size=3)
    total = sum(sum(s) for s in shares.values())
    change = refusal_change(model, adapter, opening)
    assert abs(change) > 1e-3
    assert total == pytest.approx(change, rel=0.03)
    assert sorted(shares) == sorted(spec.name for spec in adapter.specs)
    assert all(len(shares[spec.name]) == spec.k for spec in adapter.specs)


def test_attribution_leaves_the_deltas_as_trained_and_a_zero_cluster_gets_nothing():
    model, adapter = attached()
    first = adapter.specs[0].name
    with torch.no_grad():
        adapter.update_for(first).delta[1] = 0
    trained = {k: v.detach().clone() for k, v in adapter.state_dict().items()}
    shares = attribution.cluster_attribution(model, tiny_tokenizer(), adapter, TEXTS, [11, 12], batch_size=3)
    assert shares[first][1] == 0
    assert any(s != 0 for per_target in shares.values() for s in per_target)
    for k, v in adapter.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_clusters_to_drop_are_those_whose_lookalike_share_most_exceeds_their_harmful_share():
    clusters = [{"target": "a", "cluster": 0, "neurons": 1, "harmful": 0.5, "lookalike": 0.1},
                {"target": "a", "cluster": 1, "neurons": 2, "harmful": 0.1, "lookalike": 0.4},
                {"target": "b", "cluster": 0, "neurons": 3, "harmful": 0.0, "lookalike": 0.2},
                {"target": "b", "cluster": 1, "neurons": 1, "harmful": 0.3, "lookalike": 0.3}]
    dropped = attribution.clusters_to_drop({"clusters": clusters}, 2)
    assert [(c["target"], c["cluster"]) for c in dropped] == [("a", 1), ("b", 0)]
    line = attribution.describe_drop({"clusters": clusters}, dropped)
    assert "2 of 4 clusters (5 neurons)" in line and "11% of the refusal's rise on harmful" in line
    assert line.endswith("60% of its rise on safe look-alikes")
    lowering = {"clusters": [dict(clusters[0], lookalike=-0.5), dict(clusters[1], lookalike=1.0)]}
    line = attribution.describe_drop(lowering, attribution.clusters_to_drop(lowering, 1))
    assert line.endswith("200% of its rise on safe look-alikes (the other clusters together lower it)")


def loaded_tiny() -> LoadedModel:
    return LoadedModel(tiny_model("llama"), tiny_tokenizer(), "tiny-test", "test", "tiny-test")


def write_prompts(path, stem, n) -> str:
    path.write_text("".join(f"{stem} number {i}\n" for i in range(n)))
    return str(path)


def trained_run(tmp_path) -> tuple[Config, RunFolder, LoadedModel, NeSTAdapter]:
    loaded = loaded_tiny()
    run = RunFolder(tmp_path / "run")
    rows = [{"kind": "harmful", "prompt": f"harm {i}", "response": "I'm sorry, but no.", "own_refusal": False}
            for i in range(3)] + [{"kind": "benign", "prompt": "hi", "response": "Hello!"}]
    (run.stage("train") / "targets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapter = random_adapter(loaded.model)
    adapter.save(run.stage("train") / "adapter", base_identity(loaded.model, "tiny-test"))
    run.mark_done("train")
    cfg = Config(model="tiny-test", device="cpu")
    cfg.eval.overrefusal = write_prompts(tmp_path / "safe.txt", "how do I kill a python process", 20)
    cfg.train.batch_size = 4
    cfg.fold.drop_clusters = 3
    return cfg, run, loaded, adapter


def test_fold_without_the_dropped_clusters_keeps_their_rows_at_the_base(tmp_path, monkeypatch):
    cfg, run, loaded, adapter = trained_run(tmp_path)
    base = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    run_fold(cfg, run, loaded)

    found = read_json(run.stage("train") / "attribution.json")
    assert found["opening"] == tiny_tokenizer().decode(tiny_tokenizer()("I'm sorry, but no.",
                                                                        add_special_tokens=False)["input_ids"][:3])
    # the harmful prompts training refused; look-alikes from the parts evaluation never reads
    assert found["n_harmful"] == 3
    assert found["n_lookalike"] == sum(len(data.pick(cfg.eval.overrefusal, part, 0)) for part in ("detect", "train"))
    assert len(found["clusters"]) == sum(spec.k for spec in adapter.specs)
    dropped = read_json(run.stage("fold") / "summary.json")["dropped_clusters"]
    assert dropped == attribution.clusters_to_drop(found, 3)
    gone = {(c["target"], c["cluster"]) for c in dropped}
    folded = loaded.model.state_dict()
    for spec in adapter.specs:
        weight = spec.hooked_path + ".weight"
        for row, cluster in zip(spec.rows, spec.clusters):
            moved = not torch.equal(folded[weight][row + spec.offset], base[weight][row + spec.offset])
            assert moved == ((spec.name, cluster) not in gone), (spec.name, row)

    assert plot_attribution(run)  # the report's figure of the shares, the left-out clusters marked
    assert plot_attribution(RunFolder(tmp_path / "no-attribution")) is None

    # A second fold of the same adapter reads the saved attribution instead of measuring again.
    monkeypatch.setattr(attribution, "cluster_attribution", lambda *a, **k: pytest.fail("measured again"))
    run_fold(cfg, run, loaded_tiny())


def test_negative_drop_is_refused(tmp_path):
    cfg, run, loaded, _ = trained_run(tmp_path)
    cfg.fold.drop_clusters = -1
    with pytest.raises(NestuneError, match="drop_clusters=-1 is negative"):
        run_fold(cfg, run, loaded)
