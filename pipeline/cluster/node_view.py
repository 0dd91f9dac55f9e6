"""Whether a node sees the run's input and output as the driver does.

Shard workers and training workers run on any node of a cluster. There a local path names a folder on
that node's own disk unless every node mounts one filesystem at that path, and a store endpoint on
localhost is that node's own machine. Before its first shard, a shard worker checks that it sees the
input shard it was given and this run's lease in the output (`check_sees`); before its first step, a
training worker checks that it sees the data, the starting weights and the marks the driver wrote
where the run writes (`check_files`). Where it does not, the run stops, naming the node, before
anything is written from there: a local output would otherwise be scattered over the nodes' disks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from adarevd.errors import UserError
from pipeline.store.lease import LOCK_DIR, Fence
from pipeline.store.storage import StorageError, Store, redact

CHECK_RETRY_S = 10.0  # how long the check retries a store that does not answer from this node


class NodeCannotSee(UserError, RuntimeError):
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
    """A shard worker's check: raise NodeCannotSee unless `here` sees `shard` in `source` and the run's
    lease in `output`."""
    check_files([(source, shard, "this input shard, which the driver listed (removed since?)")], here, driver)
    try:
        seen = fence.seen(output.retrying_at_most(CHECK_RETRY_S))
    except StorageError as e:
        raise NodeCannotSee(f"from {here}: {e}. {_hint(driver)}") from None
    if not seen:
        raise NodeCannotSee(
            f"{redact(output.url)}: {here} does not see this run's lease ({LOCK_DIR}/) there, so it is not the "
            f"output folder the driver writes. {_hint(driver)}"
        )


def check_files(files: Sequence[tuple[Store, str, str]], here: Place, driver: Place) -> None:
    """Raise NodeCannotSee unless `here` sees each (store, name, what it is) file that the driver sees."""
    for store, name, what in files:
        try:
            store.retrying_at_most(CHECK_RETRY_S).stat(name)
        except FileNotFoundError:
            raise NodeCannotSee(f"{redact(store.url_of(name))}: {here} does not see {what}. {_hint(driver)}") from None
        except StorageError as e:
            raise NodeCannotSee(f"from {here}: {e}. {_hint(driver)}") from None


def _hint(driver: Place) -> str:
    return (
        f"The driver runs on {driver}; every node of the cluster must see the input and output as it does: a "
        "local path on a filesystem that every node mounts at that path, or a store at an address that every "
        "node reaches (localhost is each node's own machine)"
    )
