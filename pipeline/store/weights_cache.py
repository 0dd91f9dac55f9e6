"""Weights files from any fsspec URL, so a cluster reads them from the bucket that holds its data.

`--weights s3://models/AdaRevD-B.pth#sha256=<64 hex digits>`: the file is fetched once into a local
cache named by its sha256 and verified; a later run with the same sha256 reads the cached file and
asks the store for nothing. Without a sha256 the file is fetched on every run (nothing says it did not
change) and kept under its own digest. A local path is used where it lies; a sha256 given with it is
checked too. The cache: `$ADAREVD_CACHE/weights`, else `$XDG_CACHE_HOME/adarevd/weights`, else
`~/.cache/adarevd/weights`.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from adarevd.errors import InvalidInput
from pipeline.store.digests import CHUNK, DigestReader, digest_of
from pipeline.store.storage import Store, redact

if TYPE_CHECKING:
    from adarevd.model import AdaRevD

SHA256 = re.compile(r"[0-9a-f]{64}")


def cache_dir() -> Path:
    """Where fetched weights files are kept."""
    if os.environ.get("ADAREVD_CACHE"):
        return Path(os.environ["ADAREVD_CACHE"]) / "weights"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "adarevd" / "weights"


def local_weights(specs: Sequence[str], options: Mapping[str, Any] | None = None) -> list[str]:
    """Local paths for `--weights` values: URLs fetched (or found in the cache), sha256s verified."""
    return [_local(spec, options or {}) for spec in specs]


def _local(spec: str, options: Mapping[str, Any]) -> str:
    url, _, fragment = spec.partition("#")
    want = fragment.removeprefix("sha256=").lower() if fragment else None
    if fragment and (not fragment.startswith("sha256=") or not SHA256.fullmatch(want or "")):
        raise InvalidInput(f"{redact(spec)}: after '#' give sha256=<64 hex digits>, the file's sha256")
    if urlsplit(url).scheme in ("", "file"):
        path = url.removeprefix("file://")
        if want is not None and Path(path).is_file():
            with open(path, "rb") as handle:
                _check(url, digest_of(handle).sha256, want)
        return path
    suffix = posixpath.splitext(urlsplit(url).path)[1] or ".bin"  # .safetensors / .pth decide how it loads
    folder = cache_dir()
    if want is not None and (folder / f"{want}{suffix}").is_file():
        return str(folder / f"{want}{suffix}")
    folder.mkdir(parents=True, exist_ok=True)
    parent, name = url.rstrip("/").rsplit("/", 1)
    store = Store(parent, options)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".fetch-", delete=False) as tmp:
        try:
            with store.open(name) as stream:
                reader = DigestReader(stream)
                shutil.copyfileobj(reader, tmp, CHUNK)
                digest = reader.digest().sha256
            _check(url, digest, want)
        except BaseException:
            os.unlink(tmp.name)
            raise
    final = folder / f"{digest}{suffix}"
    os.replace(tmp.name, final)
    return str(final)


def _check(url: str, digest: str, want: str | None) -> None:
    if want is not None and digest != want:
        raise InvalidInput(
            f"{redact(url)}: its sha256 is {digest}, not the {want} given; the file changed, or the sha256 is "
            "another file's"
        )


def load_model(
    preset: str | None = None,
    weights: Sequence[str] = (),
    *,
    device: str = "cpu",
    storage_options: Mapping[str, Any] | None = None,
) -> AdaRevD:
    """A model for inference, as `--model` and `--weights` give it: `weights` are files or URLs
    (`URL#sha256=HEX`: fetched once into the cache and verified); none: the bundled adarevd-tiny."""
    from adarevd.loading import load_model as load

    return load(preset, local_weights(weights, storage_options), device)[0]
