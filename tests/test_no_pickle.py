"""Loading never unpickles, and a model repository's own code runs only when the user asked for it.

A pickle (torch.load without weights_only, pickle, joblib, numpy with allow_pickle) runs code from the file it
reads; nestune reads model folders, adapters and run folders that may come from anywhere, so its source is
checked here, call by call. Transformers' own fallback for `.bin` checkpoints uses torch.load(weights_only=True).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nestune

SOURCE = sorted(Path(nestune.__file__).parent.rglob("*.py"))
UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    """`torch.load` for torch.load(...), `load` for load(...)."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _keyword(call, name):
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


@pytest.mark.parametrize("path", SOURCE, ids=lambda p: str(p.relative_to(SOURCE[0].parent.parent)))
def test_no_pickle_and_no_unasked_remote_code(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"line {node.lineno}: imports {a.name}" for a in node.names
                         if a.name.split(".")[0] in UNPICKLERS]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLERS:
            problems.append(f"line {node.lineno}: imports from {node.module}")
    for call in _calls(tree):
        name = _name(call.func)
        if name == "torch.load" and not _is_true(_keyword(call, "weights_only")):
            problems.append(f"line {call.lineno}: torch.load without weights_only=True")
        if name == "torch.save":
            problems.append(f"line {call.lineno}: torch.save writes a pickle; use safetensors")
        weights_only = _keyword(call, "weights_only")
        if isinstance(weights_only, ast.Constant) and weights_only.value is False:
            problems.append(f"line {call.lineno}: weights_only=False")
        if _is_true(_keyword(call, "allow_pickle")):
            problems.append(f"line {call.lineno}: allow_pickle=True")
        if _is_true(_keyword(call, "trust_remote_code")):
            problems.append(f"line {call.lineno}: trust_remote_code=True (only the user's --trust-remote-code may)")
    assert not problems, f"{path}: " + "; ".join(problems)


def test_the_checks_see_what_they_look_for():
    bad = ast.parse("import pickle\nimport torch\ntorch.load(f)\nm.from_pretrained(p, trust_remote_code=True)\n")
    assert [_name(c.func) for c in _calls(bad)] == ["torch.load", "m.from_pretrained"]
    assert _is_true(_keyword(list(_calls(bad))[1], "trust_remote_code"))


def test_remote_code_is_off_unless_asked(tmp_path):
    from nestune.cli import build_parser, resolve_config

    plain = build_parser().parse_args(["detect", "--out", str(tmp_path / "a")])
    assert resolve_config(plain).trust_remote_code is False
    asked = build_parser().parse_args(["detect", "--out", str(tmp_path / "b"), "--trust-remote-code"])
    assert resolve_config(asked).trust_remote_code is True


def test_the_model_loader_passes_the_users_choice_through(monkeypatch, tmp_path):
    """load_model hands trust_remote_code to transformers exactly as given (default False)."""
    import transformers

    from nestune.models import load_model
    from nestune.testing import save_tiny

    folder = str(save_tiny(tmp_path / "tiny"))
    seen = []

    def spy(real):
        def from_pretrained(cls, *args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)
        return classmethod(from_pretrained)

    for auto_class in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto_class, "from_pretrained", spy(auto_class.from_pretrained))
    load_model(folder, device="cpu")
    assert seen == [False, False]
    load_model(folder, device="cpu", trust_remote_code=True)
    assert seen[2:] == [True, True]
