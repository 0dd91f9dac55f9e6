"""The bad-input matrix: real shards with every kind of damage the reliability issue lists, and what
the deblur job must make of each (a quarantine row, a shard error, or a frame deblurred with a note).
The job runs with --max-frame-pixels 10000 (MAX_FRAME_PIXELS)."""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from pipeline.formats import images
from pipeline.formats.shards import Sample, encode_shard
from pipeline.store.storage import Store

Outcome = Literal["quarantined", "shard_error", "deblurred"]
MAX_FRAME_PIXELS = 10_000


@dataclass(frozen=True)
class Case:
    name: str  # what was tried
    shard: str
    key: str | None  # the sample concerned (None: the shard as a whole)
    outcome: Outcome
    says: str  # a piece of the reason, shard error or note the job must give


def picture(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth (H, W, 3) uint8 BGR picture."""
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 2)


def png(h: int = 24, w: int = 32, seed: int = 0) -> bytes:
    return images.encode(picture(h, w, seed))


def raw_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    # GNU format with surrogateescape: a name may carry bytes that are not UTF-8, as old tools write.
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, errors="surrogateescape") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    return info


def build(store: Store) -> list[Case]:
    """Write the bad shards (and two good ones) into `store`; return what each must lead to."""
    cases: list[Case] = []
    good = [Sample(f"good_{i:06d}", {"png": png(seed=i), "json": b'{"frame_index": %d}' % i}) for i in range(6)]
    store.commit_bytes("a-good.tar", encode_shard(good[:3]))

    store.commit_bytes("b-corrupt.tar", np.random.default_rng(1).bytes(3000))
    cases.append(Case("corrupt tar (random bytes)", "b-corrupt.tar", None, "shard_error", "b-corrupt.tar"))
    whole = encode_shard(good[3:])
    store.commit_bytes("c-truncated.tar", whole[: len(whole) // 2 + 100])
    cases.append(Case("truncated tar", "c-truncated.tar", None, "shard_error", "c-truncated.tar"))
    store.commit_bytes("d-empty.tar", b"")
    cases.append(Case("0-byte shard", "d-empty.tar", None, "shard_error", "d-empty.tar"))

    rgba = cv2.cvtColor(picture(20, 30, 7), cv2.COLOR_BGR2BGRA)
    rgba[..., 3] = 128
    deep = picture(20, 30, 8).astype(np.uint16) * 257
    truncated_png, jpeg = png(seed=3), images.encode(picture(40, 40, 4), "jpg")
    members = [
        ("notimage_000000", {"png": b"this is text, not a picture"}, "quarantined", "cannot be decoded"),
        ("zero_000000", {"png": b""}, "quarantined", "0 bytes"),
        ("cutpng_000000", {"png": truncated_png[: len(truncated_png) // 2]}, "quarantined", "truncated PNG"),
        ("cutjpg_000000", {"jpg": jpeg[: len(jpeg) // 2]}, "quarantined", "truncated JPEG"),
        ("twoimages_000000", {"png": png(), "jpg": jpeg}, "quarantined", "several image members"),
        ("grey_000000", {"png": cv2.imencode(".png", picture(20, 30, 5)[..., 0])[1].tobytes()}, "deblurred", "grey"),
        ("rgba_000000", {"png": cv2.imencode(".png", rgba)[1].tobytes()}, "deblurred", "alpha"),
        ("deep_000000", {"png": cv2.imencode(".png", deep)[1].tobytes()}, "deblurred", "16-bit"),
        ("one_000000", {"png": png(1, 1)}, "deblurred", ""),
        ("odd_000000", {"png": png(17, 23)}, "deblurred", ""),
        ("nojson_000000", {"png": png(seed=9)}, "deblurred", ""),
        ("badjson_000000", {"png": png(seed=10), "json": b"{not json"}, "deblurred", ""),
        # Over the frame-mode budget the matrix run sets (--max-frame-pixels 10000): encoded per patch.
        ("big_000000", {"png": png(120, 160, seed=14)}, "deblurred", "encoded per patch: 160x120 is over"),
    ]
    samples = [Sample(key, m) for key, m, _, _ in members]
    samples.append(Sample("notimage_000000", {"png": png(seed=11)}))  # the same key again, later in the shard
    store.commit_bytes("e-members.tar", encode_shard(samples))
    for key, _, outcome, says in members:
        cases.append(Case(f"sample {key.split('_')[0]}", "e-members.tar", key, outcome, says))  # type: ignore[arg-type]
    cases.append(Case("duplicate key", "e-members.tar", "notimage_000000", "quarantined", "duplicate key"))

    # Names a tar can hold that a key must not: dots, climbing out, absolute, links, devices, bad bytes.
    store.commit_bytes("f-dotted.tar", raw_tar([(entry("clip.v2_000000.png"), png())]))
    cases.append(Case("dotted key", "f-dotted.tar", "clip", "quarantined", "no image member"))
    # Each bad entry sits between two good samples: it is refused, both neighbours are deblurred.
    for shard, name, kind, what, says in [
        ("g-climb.tar", "../../outside_000000.png", tarfile.REGTYPE, "key with ../", "'..' path part"),
        ("h-absolute.tar", "/tmp/adarevd-absolute_000000.png", tarfile.REGTYPE, "absolute key", "absolute"),
        ("i-symlink.tar", "link_000000.png", tarfile.SYMTYPE, "symlink member", "link or device"),
        ("j-device.tar", "dev_000000.png", tarfile.CHRTYPE, "device member", "link or device"),
        ("k-bytes.tar", "caf\udce9_000000.png", tarfile.REGTYPE, "non-UTF-8 name", "not UTF-8"),
        ("l-control.tar", "bell\a_000000.png", tarfile.REGTYPE, "control character in a name", "control characters"),
    ]:
        before, after = f"before{shard[0]}_000000", f"after{shard[0]}_000000"
        data = png() if kind == tarfile.REGTYPE else None
        store.commit_bytes(
            shard,
            raw_tar(
                [
                    (entry(f"{before}.png"), png(seed=12)),
                    (entry(name, kind), data),
                    (entry(f"{after}.png"), png(seed=13)),
                ]
            ),
        )
        cases.append(Case(what, shard, None, "shard_error", says))
        cases += [Case(f"good sample beside a {what}", shard, k, "deblurred", "") for k in (before, after)]
    return cases
