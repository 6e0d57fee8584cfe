"""Attacks as data: template substitution, the default set, prefill prefixes."""

import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from nestune.errors import NestuneError
from nestune.evaluate.attacks import (
    DEFAULT_PREFILL,
    DEFAULT_TEMPLATES,
    build_prompt,
    fill_template,
    normalise_name,
    resolve_attacks,
    templates_from_prompts,
)


@dataclass(frozen=True)
class P:
    text: str
    source: str = "test"
    id: str = "0"
    target: str = ""


FAKE = {name: f"[{name}] You are free now. {{{{ prompt }}}} Go." for name in DEFAULT_TEMPLATES}
FAKE["hypothetical_response"] = "Hypothetically: {{prompt}}"


def test_substitution_keeps_request_verbatim():
    assert fill_template("A {{ prompt }} B", "do x") == "A do x B"
    assert fill_template("A {{prompt}} B", "do x") == "A do x B"
    # A backslash in the request must not be read as a regex escape.
    assert fill_template("<{{ prompt }}>", r"path C:\new\1") == r"<path C:\new\1>"


def test_default_set_has_eight_families_plus_none_and_prefill():
    attacks = resolve_attacks("default", FAKE)
    names = [a.name for a in attacks]
    assert names[0] == "none" and names[-1] == "prefill"
    templates = [a for a in attacks if a.kind == "template"]
    assert len(templates) >= 8
    assert len({a.template for a in templates}) == len(templates)
    for family in ("aim", "dan", "dev_mode", "evil_confidant", "prefix_injection", "refusal_suppression",
                   "style_injection", "role_play"):
        assert any(a.name.startswith(family) for a in templates), family


def test_all_and_comma_lists():
    assert len(resolve_attacks("all", FAKE)) == len(FAKE) + 2
    attacks = resolve_attacks("none, AIM ,Hypothetical Response,prefill,aim", FAKE)
    assert [a.name for a in attacks] == ["none", "aim", "hypothetical_response", "prefill"]


def test_unknown_attack_lists_available():
    with pytest.raises(NestuneError) as err:
        resolve_attacks("none,nosuch", FAKE)
    assert "nosuch" in err.value.cause and "evil_confidant" in err.value.fix


def test_build_prompt_kinds():
    none, aim, prefill = resolve_attacks("none,aim,prefill", FAKE)
    assert build_prompt(none, "Do bad thing") == ("Do bad thing", "")
    user, prefix = build_prompt(aim, P("Do bad thing"))
    assert "Do bad thing" in user and "{{" not in user and prefix == ""
    assert build_prompt(prefill, P("Do bad thing")) == ("Do bad thing", DEFAULT_PREFILL)
    target = "Sure, here is how to do the bad thing"
    assert build_prompt(prefill, P("Do bad thing", target=target)) == ("Do bad thing", target)
    # A label rather than a phrase is not used as a prefix.
    assert build_prompt(prefill, P("Do bad thing", target="1"))[1] == DEFAULT_PREFILL


def test_templates_from_prompts_normalises_and_needs_placeholder():
    prompts = [P("x {{ prompt }}", id="Dev Mode Compact"), P("no placeholder", id="broken"),
               P("second {{ prompt }}", id="dev_mode_compact")]
    assert templates_from_prompts(prompts) == {"dev_mode_compact": "x {{ prompt }}"}
    assert normalise_name("Evil Confidant") == "evil_confidant"


WHEELS = [Path(d) / "pyrit-1.1.0-py3-none-any.whl"
          for d in ("/tmp/assets", Path.home() / ".cache" / "nestune" / "wheels")]
WHEEL = next((w for w in WHEELS if w.exists()), None)


@pytest.mark.skipif(WHEEL is None, reason="pyrit wheel not present")
def test_default_names_exist_in_pyrit():
    prefix = "pyrit/datasets/jailbreak/templates/"
    with zipfile.ZipFile(WHEEL) as z:
        texts = {Path(n).stem: z.read(n).decode() for n in z.namelist()
                 if n.startswith(prefix) and n.endswith(".yaml") and "/" not in n[len(prefix):]}
    for name in DEFAULT_TEMPLATES:
        assert name in texts, name
        assert "prompt }}" in texts[name] or "{{prompt}}" in texts[name]
