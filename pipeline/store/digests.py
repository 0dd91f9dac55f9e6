"""What a file's bytes are (size and sha256), taken while it is read anyway or by reading it once.

A deblur manifest records its input shard's digest, so a resume can tell a moved input (the same bytes
at another place: resumes) from another input whose shards have the same names (refused).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import IO

CHUNK = 1 << 20


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str

    def __str__(self) -> str:
        return f"{self.size} bytes, sha256 {self.sha256[:16]}"


class DigestReader:
    """A read-only stream that passes `stream`'s bytes through and hashes them on the way."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._hash = hashlib.sha256()
        self._size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        self._hash.update(data)
        self._size += len(data)
        return data

    def digest(self) -> Digest:
        """The digest of the whole stream: what was not read yet is read (and dropped) first."""
        while self.read(CHUNK):
            pass
        return Digest(self._size, self._hash.hexdigest())


def digest_of(stream: IO[bytes]) -> Digest:
    return DigestReader(stream).digest()
