import json

from nestune.report import _examples_html, example_pairs
from nestune.runfolder import RunFolder


def test_examples_show_the_same_behaviour_before_and_after(tmp_path):
    run = RunFolder(tmp_path / "run")
    for stage, answer, refused in (("eval-before", "Sure, step one <b>", False), ("eval-after", "I can't help.", True)):
        folder = run.stage(stage)
        rows = [{"source": "advbench", "behaviour": str(i), "attack": a, "response": f"{answer} {i}",
                 "refused": refused, "answered": True} for i in range(3) for a in ("none", "prefill")]
        (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = example_pairs(run, n_behaviours=2)
    assert {(p["behaviour"], p["attack"]) for p in pairs} == {(f"advbench/{i}", a) for i in (0, 1)
                                                             for a in ("none", "prefill")}
    assert all(p["before_success"] and not p["after_success"] for p in pairs)
    page = _examples_html(pairs)
    assert "&lt;b&gt;" in page and "<b>" not in page.replace("<b>none</b>", "").replace("<b>prefill</b>", "")
