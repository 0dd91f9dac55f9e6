"""Training checkpoints in a folder on any fsspec URL.

`step-00001000/` holds one checkpoint's members (see `adarevd.train_state`); `latest.json`, committed
after them, names the newest complete one, so a run killed while writing leaves the previous
checkpoint in charge. The oldest are removed once `keep` newer ones exist.
"""

from __future__ import annotations

import json

from pipeline.store.storage import Store

LATEST = "latest.json"


class Checkpoints:
    def __init__(self, store: Store, keep: int = 2) -> None:
        self.store, self.keep = store, keep

    def save(self, step: int, members: dict[str, bytes]) -> str:
        folder = f"step-{step:08d}"
        for name, data in sorted(members.items()):
            self.store.commit_bytes(f"{folder}/{name}", data)
        self.store.commit_bytes(LATEST, json.dumps({"step": step, "folder": folder}).encode())
        for old in self.folders()[: -self.keep]:
            self.store.remove_tree(old)
        self.store.remove_tmp_folder()
        return folder

    def folders(self) -> list[str]:
        return sorted({name.split("/")[0] for name in self.store.glob("step-*/state.json")})

    def latest(self) -> dict[str, bytes] | None:
        """The members of the newest complete checkpoint, or None when there is none."""
        if not self.store.exists(LATEST):
            return None
        folder = json.loads(self.store.read_bytes(LATEST))["folder"]
        return {name.split("/", 1)[1]: self.store.read_bytes(name) for name in self.store.glob(f"{folder}/*")}
