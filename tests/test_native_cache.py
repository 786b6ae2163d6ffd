"""The kernel cache never loads a library another user could have written, nor one whose bytes differ from
the digest recorded when it was built: a planted library (its constructor writes a marker file) never
runs. Unsafe cache folders are refused and the kernel is built in a private temporary folder instead."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deadneuron import _cache, _native

pytestmark = pytest.mark.skipif(_native.load() is None, reason=f"C kernel unavailable: {_native.load_error()}")

PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("planted code ran\n", f); fclose(f); }
}
int deadneuron_stats_f32(void) { return 0; }
int deadneuron_stats_f64(void) { return 0; }
"""


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, Path]:
    """(a compiled library whose constructor writes the marker file, the marker's path)."""
    marker = tmp_path / "marker"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    lib = tmp_path / "planted.so"
    cc = _native._compiler()
    subprocess.run([cc, "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o", str(lib)], check=True)
    return lib, marker


def _load(monkeypatch: pytest.MonkeyPatch, cache: Path) -> _native.NativeStats | None:
    monkeypatch.setenv("DEADNEURON_CACHE_DIR", str(cache))
    monkeypatch.setenv("DEADNEURON_NATIVE", "1")
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_loaded", None)
    monkeypatch.setattr(_native, "_error", None)
    return _native.load()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One verified cache entry, built once for the module (a build takes a second or two)."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    with pytest.MonkeyPatch.context() as monkeypatch:
        native = _load(monkeypatch, cache)
    assert native is not None and native.note is None, native and native.note
    assert native.path.parent == cache.resolve() and native.path.with_suffix(".sha256").is_file()
    return native.path


def _cached_entry(built: Path, cache: Path) -> Path:
    """A copy of the verified entry ``built`` in a fresh private ``cache``; the path of the library."""
    cache.mkdir(mode=0o700)
    for src in (built, built.with_suffix(".sha256")):
        shutil.copy2(src, cache / src.name)
    return cache.resolve() / built.name


def _plant(lib: Path, entry: Path, *, digest: str) -> None:
    shutil.copyfile(lib, entry)
    record = entry.with_suffix(".sha256")
    if digest == "missing":
        record.unlink()
    elif digest == "matching":
        record.write_text(hashlib.sha256(lib.read_bytes()).hexdigest() + "\n")


def test_the_cache_is_reused_without_building(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    native = _load(monkeypatch, tmp_path / "cache")
    assert native is not None and native.note is None
    entry = native.path
    assert entry.parent == (tmp_path / "cache").resolve()
    recorded = entry.with_suffix(".sha256").read_text().strip()
    assert recorded == hashlib.sha256(entry.read_bytes()).hexdigest()

    def no_compiler(*args: object, **kwargs: object) -> Path:
        raise AssertionError("built again although the cache held a verified build")

    monkeypatch.setattr(_native, "_compile", no_compiler)
    again = _load(monkeypatch, tmp_path / "cache")
    assert again is not None and again.path == entry and again.note is None
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.with_suffix(".sha256").name, entry.name]


@pytest.mark.parametrize("digest", ["stale", "missing"])
def test_a_planted_library_without_its_digest_never_runs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, planted: tuple[Path, Path], built: Path, digest: str
) -> None:
    lib, marker = planted
    entry = _cached_entry(built, tmp_path / "cache")
    _plant(lib, entry, digest=digest)
    native = _load(monkeypatch, tmp_path / "cache")
    assert not marker.exists(), "the planted library was loaded"
    assert native is not None and native.path == entry and native.note is None
    # built again over the planted file, with its digest
    assert entry.read_bytes() != lib.read_bytes()
    assert entry.with_suffix(".sha256").read_text().strip() == hashlib.sha256(entry.read_bytes()).hexdigest()


@pytest.mark.parametrize(("mode", "why"), [(0o770, "writable by its group"), (0o777, "writable by its group and others"),
                                           (0o1777, "and others"), (0o722, "writable by its group and others")])
def test_a_cache_folder_others_can_write_is_never_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, planted: tuple[Path, Path], built: Path, mode: int, why: str
) -> None:
    """Even with a digest that matches the planted library; sticky-bit folders (like /tmp) are not
    enough for the cache folder itself."""
    lib, marker = planted
    cache = tmp_path / "cache"
    entry = _cached_entry(built, cache)
    _plant(lib, entry, digest="matching")
    cache.chmod(mode)
    before = sorted(p.name for p in cache.iterdir())
    native = _load(monkeypatch, cache)
    assert not marker.exists(), "the planted library was loaded"
    assert native is not None and native.note is not None
    assert native.note.startswith("built in a private temporary folder: ") and why in native.note, native.note
    assert not native.path.parent.exists()  # the private folder is gone; the library stays loaded
    assert sorted(p.name for p in cache.iterdir()) == before  # nothing written into an unsafe folder


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown needs root")
def test_a_cache_folder_owned_by_another_user_is_never_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, planted: tuple[Path, Path], built: Path
) -> None:
    lib, marker = planted
    cache = tmp_path / "cache"
    entry = _cached_entry(built, cache)
    _plant(lib, entry, digest="matching")
    os.chown(cache, 12345, 12345)
    native = _load(monkeypatch, cache)
    assert not marker.exists(), "the planted library was loaded"
    assert native is not None and native.note is not None and "owned by uid 12345" in native.note, native.note


@pytest.mark.parametrize(("mode", "refused"), [(0o777, True), (0o775, True), (0o1777, False), (0o755, False)])
def test_folders_above_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mode: int, refused: bool) -> None:
    """A folder above the cache that others can write (they could rename the cache away and put
    their own in its place) makes the cache unsafe, unless its sticky bit stops them (as /tmp)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    native = _load(monkeypatch, shared / "cache")
    assert native is not None
    if refused:
        assert native.note is not None and f"{shared} (above the cache) is writable by" in native.note, native.note
        assert not any((shared / "cache").iterdir())
    else:
        assert native.note is None and native.path.parent == (shared / "cache").resolve()


def test_a_symlinked_or_world_writable_entry_is_built_again(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, planted: tuple[Path, Path], built: Path
) -> None:
    lib, marker = planted
    entry = _cached_entry(built, tmp_path / "cache")
    entry.unlink()
    entry.symlink_to(lib)
    entry.with_suffix(".sha256").write_text(hashlib.sha256(lib.read_bytes()).hexdigest() + "\n")
    assert _load(monkeypatch, tmp_path / "cache") is not None
    assert not marker.exists() and not entry.is_symlink()
    _plant(lib, entry, digest="matching")
    entry.chmod(0o666)
    assert _load(monkeypatch, tmp_path / "cache") is not None
    assert not marker.exists() and entry.read_bytes() != lib.read_bytes()


def test_a_symlinked_cache_folder_is_judged_where_it_leads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = tmp_path / "open"
    real.mkdir()
    real.chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert _cache.untrusted_reason(link) == f"{real} is writable by its group and others"
    real.chmod(0o700)
    assert _cache.untrusted_reason(link) is None
    native = _load(monkeypatch, link)
    assert native is not None and native.note is None and native.path.parent == real


def test_a_read_only_cache_is_still_used(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, built: Path) -> None:
    """Nothing can be written into the cache (simulated: as root, permissions would not stop it): a
    verified entry is loaded from a private copy elsewhere; a missing one is built privately."""
    cache = tmp_path / "cache"
    entry = _cached_entry(built, cache)
    real_mkstemp, real_mkdtemp = _native.tempfile.mkstemp, _native.tempfile.mkdtemp

    def refuse(real):  # noqa: ANN001, ANN202
        def inner(*args, dir=None, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202, A002
            if dir is not None and Path(dir) == entry.parent:
                raise PermissionError(13, "Read-only file system")
            return real(*args, dir=dir, **kwargs)
        return inner

    monkeypatch.setattr(_native.tempfile, "mkstemp", refuse(real_mkstemp))
    monkeypatch.setattr(_native.tempfile, "mkdtemp", refuse(real_mkdtemp))
    native = _load(monkeypatch, cache)
    assert native is not None and native.path == entry and native.note is None
    entry.unlink()
    native = _load(monkeypatch, cache)
    assert native is not None and native.note == f"built in a private temporary folder: cannot write to {entry.parent}: Read-only file system"
    assert not entry.exists()
