"""Jailbreak attacks as data.

An attack turns a harmful behaviour into what the model sees: a user message and, for a prefill attack,
the start of the assistant's answer. Three kinds:
- "none": the plain request;
- "template": a PyRIT jailbreak template with `{{ prompt }}` replaced by the request;
- "prefill": the assistant turn is started with an affirmative prefix ("Sure, here is ...", or the
  behaviour's own target string where the data set has one, as AdvBench does) and generation continues.

Template names are normalised (lower case, non-alphanumerics to "_"), so PyRIT's file stem "dev_mode_compact"
and its display name "Dev Mode Compact" are the same attack.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import NestuneError

# One template per family named in DESIGN.md 1.5, the shortest variant of each in pyrit 1.1.0: long
# templates' prefill dominates CPU evaluation cost (DESIGN.md 4). Characters in brackets.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "aim",  # AIM (1,722)
    "dan_8",  # DAN 8 (1,063), the shortest DAN
    "dev_mode_compact",  # developer mode (433)
    "evil_confidant",  # evil confidant (530)
    "prefix_injection",  # prefix injection (48)
    "refusal_suppression",  # refusal suppression (328)
    "style_injection",  # style injection (92)
    "role_play",  # role play (2,015), the only one
)

DEFAULT_PREFILL = "Sure, here is"
PLACEHOLDER = re.compile(r"\{\{\s*prompt\s*\}\}")


@dataclass(frozen=True)
class Attack:
    name: str
    kind: str  # "none", "template" or "prefill"
    template: str = ""  # the template text for kind "template"; the default prefix for kind "prefill"


NONE = Attack("none", "none")
PREFILL = Attack("prefill", "prefill", DEFAULT_PREFILL)


def normalise_name(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def templates_from_prompts(prompts) -> dict[str, str]:
    """{normalised name: template text} from data.load("jailbreak-templates") (id = template name).

    Templates without the placeholder cannot carry a request and are left out. On a name clash the first wins.
    """
    out: dict[str, str] = {}
    for p in prompts:
        key = normalise_name(p.id)
        if PLACEHOLDER.search(p.text) and key not in out:
            out[key] = p.text
    return out


def resolve_attacks(spec: str, templates: dict[str, str]) -> list[Attack]:
    """`default` (none + DEFAULT_TEMPLATES + prefill), `all` (none + every template + prefill) or a comma list."""
    templates = {normalise_name(k): v for k, v in templates.items()}
    spec = spec.strip()
    if spec == "default":
        names = ["none", *DEFAULT_TEMPLATES, "prefill"]
    elif spec == "all":
        names = ["none", *sorted(templates), "prefill"]
    else:
        names = [normalise_name(n) for n in spec.split(",") if n.strip()]
    if not names:
        raise NestuneError("no attacks given", "use default, all, or a comma list such as none,aim,prefill")
    attacks: list[Attack] = []
    unknown = []
    for name in dict.fromkeys(names):  # drop repeats, keep order
        if name == "none":
            attacks.append(NONE)
        elif name == "prefill":
            attacks.append(PREFILL)
        elif name in templates:
            attacks.append(Attack(name, "template", templates[name]))
        else:
            unknown.append(name)
    if unknown:
        raise NestuneError(
            f"unknown attack(s): {', '.join(unknown)}",
            f"available: none, prefill, {', '.join(sorted(templates))}",
        )
    return attacks


def fill_template(template: str, request: str) -> str:
    # A function replacement, so backslashes in the request are kept as they are.
    return PLACEHOLDER.sub(lambda _: request, template).strip()


def prefill_prefix(attack: Attack, target: str | None) -> str:
    """The behaviour's own target string (AdvBench, JailbreakBench) when it is a phrase, else the default."""
    if target and len(target.split()) >= 3:
        return target.strip()
    return attack.template or DEFAULT_PREFILL


def build_prompt(attack: Attack, behaviour) -> tuple[str, str]:
    """(user text, assistant prefix) for a behaviour: a Prompt (text, target) or a plain string."""
    text = getattr(behaviour, "text", behaviour)
    target = getattr(behaviour, "target", None)
    if attack.kind == "none":
        return text, ""
    if attack.kind == "template":
        return fill_template(attack.template, text), ""
    if attack.kind == "prefill":
        return text, prefill_prefix(attack, target)
    raise NestuneError(f"unknown attack kind '{attack.kind}'", "use none, template or prefill")
