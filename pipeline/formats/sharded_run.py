"""A run that writes numbered shards and an index into one output, under the output's lease (ingest
and synth share it).

Order: refuse an earlier run's shards (before the lease, and again once it is held: a run may have
ended meanwhile) -> add samples (each after a lease check; each shard's commit after a fence check) ->
the index, once the lease is confirmed -> with `overwrite`, remove the earlier shards not written again.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from pipeline.formats.shards import Sample
from pipeline.formats.sink import ShardLimits, ShardSink, refuse_earlier, remove_stale
from pipeline.store.lease import OutputLock, new_run_id
from pipeline.store.storage import Store


@dataclass(frozen=True, kw_only=True)
class ShardedOutput:
    output: Store
    prefix: str
    kind: str  # names the run ("ingest", "synth") in its lease
    limits: ShardLimits = field(default_factory=ShardLimits)
    overwrite: bool = False  # replace an earlier run's shards (else refuse to start)
    take_over: bool = False  # take the lease of a run that died
    earlier_index: str | None = None  # an earlier index that also stops a run without `overwrite`
    hint: str = ""  # added to the refusal: what else the user may do


class ShardedRun:
    """`with ShardedRun(spec) as run:` holds the lease; `run.add(sample)` returns the sample's shard;
    `run.finish(index, local_file)` commits the last shard and the index, then removes stale shards."""

    def __init__(self, spec: ShardedOutput) -> None:
        self.spec = spec

    def __enter__(self) -> ShardedRun:
        spec = self.spec
        refuse_earlier(spec.output, spec.prefix, spec.earlier_index, spec.overwrite, spec.hint)  # nothing written
        with ExitStack() as stack:  # kept open past this call (pop_all) unless a step here fails
            self.lock = stack.enter_context(OutputLock(spec.output, new_run_id(spec.kind)).held(spec.take_over))
            refuse_earlier(spec.output, spec.prefix, spec.earlier_index, spec.overwrite, spec.hint)  # ended meanwhile
            # Taken over: commit no further shard.
            self.sink = stack.enter_context(
                ShardSink(spec.output, spec.prefix, spec.limits, self.lock.fenced(spec.output))
            )
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: Any) -> bool | None:
        return self._stack.__exit__(*exc)

    def add(self, sample: Sample) -> str:
        self.lock.check()
        return self.sink.add(sample)

    def finish(self, index: str, local_file: str) -> list[str]:
        """Commit the last shard, then the index (from `local_file`) once the lease is confirmed; returns
        every committed shard."""
        spec = self.spec
        committed = self.sink.close()
        self.lock.confirm()  # taken over meanwhile: the index is the new holder's to write
        spec.output.commit_file(index, local_file)
        if spec.overwrite:
            remove_stale(spec.output, spec.prefix, committed)
        return committed
