from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.store.storage import (
    S3_CONNECTIONS,
    TMP_DIR,
    StorageError,
    Store,
    call,
    parse_storage_options,
    redact,
    resolve,
)
from tests.s3server import free_port


def test_storage_options_nest_dotted_keys_and_parse_json_values() -> None:
    options = parse_storage_options(
        ["key=AKIA", "anon=false", "client_kwargs.endpoint_url=http://127.0.0.1:9000", "config_kwargs.retries.x=3"]
    )
    assert options == {
        "key": "AKIA",
        "anon": False,
        "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000"},
        "config_kwargs": {"retries": {"x": 3}},
    }


@pytest.mark.parametrize("bad", ["novalue", "=x", "a=1 a.b=2"])
def test_storage_options_refuse_malformed_pairs(bad: str) -> None:
    with pytest.raises(ValueError, match="--storage-option"):
        parse_storage_options(bad.split(" "))


def test_redact_drops_credentials_from_urls() -> None:
    assert redact("s3://user:pa55@bucket/x.tar") == "s3://bucket/x.tar"
    assert redact("http://u:p@host:9000/a") == "http://host:9000/a"
    assert redact("/local/path.tar") == "/local/path.tar"


def test_commit_writes_whole_objects_and_leaves_no_temporaries(tmp_path: Path) -> None:
    store = Store(str(tmp_path / "out"))
    store.commit_bytes("a.tar", b"abc")
    local = tmp_path / "big.bin"
    local.write_bytes(b"x" * 100_000)
    store.commit_file("sub/b.tar", str(local))
    store.remove_tmp_folder()
    assert (tmp_path / "out" / "a.tar").read_bytes() == b"abc"
    assert (tmp_path / "out" / "sub" / "b.tar").stat().st_size == 100_000
    assert not (tmp_path / "out" / TMP_DIR).exists()
    assert store.glob("*.tar") == ["a.tar"]


def test_a_failed_upload_leaves_nothing_at_the_final_name(memory_store: Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        memory_store.commit_file("x.tar", str(tmp_path / "missing.tar"))
    assert not memory_store.exists("x.tar")


def test_unknown_protocol_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(StorageError, match="nosuch://b/x: cannot open this storage URL"):
        Store("nosuch://b/x").glob("*")
    from jobs.cli import main

    assert main(["ingest", "nosuch://bucket/clip.mp4", "--output", "memory://never"]) == 2
    assert "nosuch://bucket/clip.mp4: cannot open this storage URL" in capsys.readouterr().err


def test_an_s3_store_without_credentials_says_how_to_give_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata lookup (no network)
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens: botocore asks for credentials first
    start = time.monotonic()
    with pytest.raises(
        StorageError,
        match=r"s3://b/x/\*\.tar: could not list: Unable to locate credentials\. "
        r"Give them in AWS_ACCESS_KEY_ID .* --storage-option anon=true",
    ):
        Store("s3://b/x", {"client_kwargs": {"endpoint_url": endpoint}}).glob("*.tar")
    assert time.monotonic() - start < 10  # an answer, not an outage: not retried for the window
    from jobs.cli import main

    assert (
        main(["deblur", "s3://b/x", str(tmp_path / "out"), f"--storage-option=client_kwargs.endpoint_url={endpoint}"])
        == 2
    )
    err = capsys.readouterr().err
    assert "adarevd deblur: error: s3://b/x/**/*.t*: could not list: Unable to locate credentials. Give" in err
    assert "Traceback" not in err


def check_read_many(store: Store) -> None:
    """`read_many` and `stats` on any store: in order, across chunks, tails, names that look like globs."""
    names = [f"d/f{i:03d}.bin" for i in range(7)] + ["d/[ab]*.bin"]  # the last one is a name, not a glob
    for i, name in enumerate(names):
        store.commit_bytes(name, bytes([i]) * (i + 10))
    got = list(store.read_many(names, chunk=3))
    assert got == [(name, bytes([i]) * (i + 10)) for i, name in enumerate(names)]
    assert list(store.read_many(names[2:4], tail=4)) == [(names[2], b"\x02" * 4), (names[3], b"\x03" * 4)]
    assert list(store.read_many(names[:1], tail=100)) == [(names[0], b"\x00" * 10)]  # tail beyond the start
    stats = store.stats(names)
    assert [stat.size for stat in stats] == [i + 10 for i in range(len(names))] and stats[-1] == store.stat(names[-1])
    assert list(store.read_many([])) == [] and store.stats([]) == []
    store.commit_bytes(names[0], b"\xff" * 10)  # written again, the same size: another version
    assert store.stat(names[0]).size == 10 and store.stat(names[0]).version not in ("", stats[0].version)
    with pytest.raises(FileNotFoundError):
        list(store.read_many([names[0], "d/missing.bin"]))


def check_sweep_parts(store: Store) -> None:
    """`sweep_parts` on any store: the partial files written before the time given, and no other file."""
    store.commit_bytes("_tmp/a.tar.1.part", b"a" * 10)
    store.commit_bytes("_tmp/sub__b.tar.2.part", b"b" * 5)
    store.commit_bytes("_tmp/notes.txt", b"kept")
    store.commit_bytes("kept.part", b"not in _tmp")
    now = time.time()
    assert store.sweep_parts(older_than=now - 3600) == (0, 0)  # written just now: another run's, maybe
    assert store.sweep_parts(older_than=now + 5) == (2, 15)
    assert store.glob("_tmp/*") == ["_tmp/notes.txt"] and store.exists("kept.part")
    assert Store(store.url + "/empty", store.options).sweep_parts(now + 5) == (0, 0)


def test_read_many_and_stats_on_local_and_memory_folders(tmp_path: Path, memory_store: Store) -> None:
    check_read_many(Store(str(tmp_path / "local")))
    check_read_many(memory_store)


def test_sweep_parts_on_local_and_memory_folders(tmp_path: Path, memory_store: Store) -> None:
    check_sweep_parts(Store(str(tmp_path / "local")))
    check_sweep_parts(memory_store)


def test_an_unreachable_store_is_retried_until_the_window_ends_and_not_past_it() -> None:
    tries: list[float] = []

    def refused() -> None:
        tries.append(time.monotonic())
        raise ConnectionRefusedError("connection refused")

    with pytest.raises(StorageError, match=r"s3://b/x: could not read: still unreachable after 3 s of retries"):
        call("read", "s3://b/x", refused, retry_seconds=3)
    # Backoff 0.5, 1, then what is left of the window: the last try at its end (3 s), not at 3.5 s.
    assert len(tries) == 4 and 3.0 <= tries[-1] - tries[0] < 3.4
    tries.clear()
    with pytest.raises(StorageError):
        call("read", "s3://b/x", refused, retry_seconds=0)
    assert len(tries) == 1  # no window: one try


def test_s3_keeps_a_connection_pool_for_requests_made_many_at_a_time_unless_told_otherwise() -> None:
    fs, _ = resolve("s3://b/x", {"config_kwargs": {"retries": {"max_attempts": 2}}})
    assert fs.config_kwargs == {"max_pool_connections": S3_CONNECTIONS, "retries": {"max_attempts": 2}}
    fs, _ = resolve("s3://b/x", {"config_kwargs": {"max_pool_connections": 8}})
    assert fs.config_kwargs == {"max_pool_connections": 8}


def test_an_empty_folder_is_removed_and_a_create_that_races_the_removal_still_lands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(str(tmp_path))
    store.create("_lock/1.json", b"held")
    store.remove_empty_folder("_lock")  # not empty: kept, with what is in it
    assert store.read_bytes("_lock/1.json") == b"held"
    store.remove("_lock/1.json")
    store.remove_empty_folder("_lock")
    assert not (tmp_path / "_lock").exists()
    store.remove_empty_folder("_lock")  # nothing there: nothing happens
    Store("memory://empty-folder-test").remove_empty_folder("_lock")

    made = Store._mkparent

    def then_removed(self: Store, name: str):  # another run's release removes the folder just made
        fs = made(self, name)
        os.rmdir(tmp_path / "_lock")
        return fs

    monkeypatch.setattr(Store, "_mkparent", then_removed)
    store.create("_lock/2.json", b"mine")
    assert store.read_bytes("_lock/2.json") == b"mine"
