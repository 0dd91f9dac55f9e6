"""Whether a node sees the run's input and output as the driver does.

Shard workers run on any node of a cluster. There a local path names a folder on that node's own disk
unless every node mounts one filesystem at that path, and a store endpoint on localhost is that node's
own machine. A shard worker checks once, before its first shard, that it sees the input shard it was
given and this run's lease in the output. Where it does not, the run stops, naming the node, before
anything is written from there: a local output would otherwise be scattered over the nodes' disks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.output_lock import LOCK_DIR, Fence
from pipeline.storage import StorageError, Store, redact

CHECK_RETRY_S = 10.0  # how long the check retries a store that does not answer from this node


class NodeCannotSee(RuntimeError):
    """A node does not see the input or the output the driver sees; the message names both. (Not a
    StorageError: the store is fine, so the run cleans up after itself as after any other refusal.)"""


@dataclass(frozen=True)
class Place:
    """A Ray node, as a person recognises it."""

    node_id: str
    host: str
    ip: str

    def __str__(self) -> str:
        return f"node {self.ip} ({self.host}, {self.node_id[:8]})"


def check_sees(source: Store, output: Store, shard: str, fence: Fence, here: Place, driver: Place) -> None:
    """Raise NodeCannotSee unless `here` sees `shard` in `source` and the run's lease in `output`."""
    hint = (
        f"The driver runs on {driver}; every node of the cluster must see the input and output as it does: a "
        "local path on a filesystem that every node mounts at that path, or a store at an address that every "
        "node reaches (localhost is each node's own machine)"
    )
    source = replace(source, retry_seconds=min(CHECK_RETRY_S, source.retry_seconds))
    output = replace(output, retry_seconds=min(CHECK_RETRY_S, output.retry_seconds))
    try:
        source.stat(shard)
    except FileNotFoundError:
        raise NodeCannotSee(
            f"{redact(source.url_of(shard))}: {here} does not see this input shard, which the driver listed "
            f"(removed since?). {hint}"
        ) from None
    except StorageError as e:
        raise NodeCannotSee(f"from {here}: {e}. {hint}") from None
    try:
        seen = fence.seen(output)
    except StorageError as e:
        raise NodeCannotSee(f"from {here}: {e}. {hint}") from None
    if not seen:
        raise NodeCannotSee(
            f"{redact(output.url)}: {here} does not see this run's lease ({LOCK_DIR}/) there, so it is not the "
            f"output folder the driver writes. {hint}"
        )
