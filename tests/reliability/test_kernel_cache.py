"""A compiled kernel in the cache is loaded only as it was built: replaced, edited, unhashed or
writable-by-others libraries are rebuilt, never loaded."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from diffquant.kernels import native

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="needs a C compiler")

PROBE = "int dq_probe(void) { return 7; }\n"
IMPOSTOR = "int dq_probe(void) { return 666; }\n"
LOAD = ctypes.CDLL  # the fixture replaces ctypes.CDLL while it runs


@pytest.fixture
def build(tmp_path, monkeypatch):
    """NativeLibrary("vnni.c")._build, compiling a one-function probe instead (fast) into a cache under
    tmp_path and returning the library's path instead of loading it (dlopen would keep the first file
    it loaded under a path for the life of the process); returns (build, compile count)."""
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    source = tmp_path / "probe.c"
    source.write_text(PROBE)
    real_compile, compiles = native._compile, []

    def compile_probe(compiler, flags, _source, target):
        compiles.append(target)
        real_compile(compiler, tuple(f for f in flags if not f.startswith("-m")), source, target)

    monkeypatch.setattr(native, "_compile", compile_probe)
    monkeypatch.setattr(native.ctypes, "CDLL", Path)
    library = native.NativeLibrary("vnni.c", (), {"dq_probe": []})
    return (lambda: library._build(shutil.which(os.environ.get("CC", "cc")), native.BASE_FLAGS)), compiles


def replace_file(target: Path, data: bytes) -> None:
    """Change the cached file as a new inode (as a swap would), never in place."""
    tmp = target.with_name("swap.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def build_impostor(tmp_path: Path, target: Path) -> None:
    """Another library at the cached path (what a swapped file would be)."""
    (tmp_path / "impostor.c").write_text(IMPOSTOR)
    out = tmp_path / "impostor.so"
    subprocess.run([os.environ.get("CC", "cc"), "-shared", "-fPIC", str(tmp_path / "impostor.c"), "-o", str(out)],
                   check=True)
    replace_file(target, out.read_bytes())
    target.chmod(0o755)


TAMPERS: dict[str, Callable[[Path, Path], None]] = {
    "replaced by another library": lambda tmp, so: build_impostor(tmp, so),
    "replaced, hash file too": lambda tmp, so: (build_impostor(tmp, so), native._sidecar(so).write_text("0" * 64)),
    "hash file removed": lambda tmp, so: native._sidecar(so).unlink(),
    "writable by others": lambda tmp, so: so.chmod(0o777),
    "truncated": lambda tmp, so: (replace_file(so, so.read_bytes()[:100]), so.chmod(0o755)),
}


def test_a_built_library_is_reused_while_intact(build):
    build_library, compiles = build
    first = build_library()
    assert build_library() == first and len(compiles) == 1
    assert native._sidecar(first).read_text() == native.sha256_of(first)
    assert ctypes_probe(first) == 7


@pytest.mark.parametrize("tamper", TAMPERS.values(), ids=TAMPERS.keys())
def test_a_changed_library_is_rebuilt_not_loaded(build, tmp_path, tamper):
    build_library, compiles = build
    target = build_library()
    tamper(tmp_path, target)
    assert not native._cached_intact(target)
    assert build_library() == target and len(compiles) == 2
    assert native._cached_intact(target) and ctypes_probe(target) == 7


def ctypes_probe(path: Path) -> int:
    """Call the probe from a copy under a fresh name (a path dlopen has not seen)."""
    fresh = path.with_name(f"probe-{uuid.uuid4().hex}.so")
    shutil.copy(path, fresh)
    return LOAD(str(fresh)).dq_probe()
