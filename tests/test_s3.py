"""The data plane against a real S3 server (SeaweedFS with SigV4 credentials, on loopback)."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import webdataset as wds

from jobs.cli import main
from pipeline.formats.shards import use_fsspec_for_webdataset
from pipeline.store.storage import Store
from tests.media import decode_video, frames, write_video
from tests.s3server import S3Server
from tests.test_storage import check_read_many, check_sweep_parts

pytestmark = pytest.mark.s3


def fresh_prefix(s3: S3Server) -> str:
    return f"s3://{s3.bucket}/{uuid.uuid4().hex[:10]}"


def test_ingest_from_s3_to_s3_round_trips_and_webdataset_reads_it(
    s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    video = write_video(tmp_path / "street.mkv", frames(5, seed=7))
    prefix = fresh_prefix(s3)
    fs = s3fs.S3FileSystem(**s3.storage_options)
    fs.put_file(str(video), f"{prefix}/in/street.mkv")
    code = main(
        ["ingest", f"{prefix}/in/", "--output", f"{prefix}/out", "--max-frames-per-shard", "2", *s3.cli_options()]
    )
    assert code == 0, capsys.readouterr()
    listed = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{prefix}/out", refresh=True))
    assert listed == ["_index.parquet", "frames-000000.tar", "frames-000001.tar", "frames-000002.tar"]

    use_fsspec_for_webdataset(s3.storage_options)
    dataset = wds.WebDataset(f"{prefix}/out/frames-{{000000..000002}}.tar", shardshuffle=False)
    got = [(s["__key__"], s["png"], json.loads(s["json"])) for s in dataset]
    assert [k for k, _, _ in got] == [f"street_{i:06d}" for i in range(5)]
    for (_, png, meta), original in zip(got, decode_video(video), strict=True):
        np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), original)
        assert meta["source"] == f"{prefix}/in/street.mkv"
    rows = pq.read_table(io.BytesIO(fs.cat_file(f"{prefix}/out/_index.parquet"))).to_pylist()
    assert [r["shard"] for r in rows] == ["frames-000000.tar"] * 2 + ["frames-000001.tar"] * 2 + ["frames-000002.tar"]


def test_s3_and_local_ingests_are_byte_identical(s3: S3Server, tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mkv", frames(3))
    prefix = fresh_prefix(s3)
    assert main(["ingest", str(video), "--output", prefix, *s3.cli_options()]) == 0
    assert main(["ingest", str(video), "--output", str(tmp_path / "local")]) == 0
    remote = Store(prefix, s3.storage_options)
    for name in ("frames-000000.tar", "_index.parquet"):
        assert remote.read_bytes(name) == (tmp_path / "local" / name).read_bytes(), name
    assert remote.glob("_tmp/*") == []


def test_wrong_credentials_give_a_clear_error_without_the_secret(
    s3: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    video = write_video(tmp_path / "clip.mkv", frames(1))
    secret = "wrong-secret-do-not-print-91c2"
    code = main(
        [
            "ingest",
            str(video),
            "--output",
            fresh_prefix(s3),
            "--storage-option",
            f"key={s3.access_key}",
            "--storage-option",
            f"secret={secret}",
            "--storage-option",
            f"client_kwargs.endpoint_url={s3.endpoint}",
        ]
    )
    captured = capsys.readouterr()
    assert code == 2
    assert f"s3://{s3.bucket}/" in captured.err and "could not" in captured.err
    assert secret not in captured.err + captured.out


def test_credentials_and_endpoint_from_the_usual_environment(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    video = write_video(tmp_path / "clip.mkv", frames(2))
    prefix = fresh_prefix(s3)
    assert main(["ingest", str(video), "--output", prefix]) == 0
    assert Store(prefix, s3.storage_options).glob("*.tar") == ["frames-000000.tar"]
    s3fs.S3FileSystem.clear_instance_cache()


def test_read_many_and_stats_on_s3(s3: S3Server) -> None:
    check_read_many(Store(fresh_prefix(s3), s3.storage_options))


def test_sweep_parts_on_s3(s3: S3Server) -> None:
    check_sweep_parts(Store(fresh_prefix(s3), s3.storage_options))


def test_weights_from_a_bucket_are_cached_by_sha256_and_verified(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import hashlib

    from adarevd.errors import InvalidInput
    from jobs.cli import DEFAULT_WEIGHTS
    from pipeline.store.weights_cache import local_weights

    monkeypatch.setenv("ADAREVD_CACHE", str(tmp_path / "cache"))
    data = DEFAULT_WEIGHTS.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    prefix = fresh_prefix(s3)
    store = Store(prefix, s3.storage_options)
    store.commit_bytes("models/tiny.safetensors", data)
    url = f"{prefix}/models/tiny.safetensors"
    (fetched,) = local_weights([f"{url}#sha256={digest}"], s3.storage_options)
    assert Path(fetched) == tmp_path / "cache" / "weights" / f"{digest}.safetensors"
    assert Path(fetched).read_bytes() == data
    store.remove("models/tiny.safetensors")  # a second run with the sha256 asks the store for nothing
    assert local_weights([f"{url}#sha256={digest}"], s3.storage_options) == [fetched]
    store.commit_bytes("models/tiny.safetensors", data[:-1] + b"x")  # the file changed in the bucket
    monkeypatch.setenv("ADAREVD_CACHE", str(tmp_path / "other-cache"))  # a node that has not cached it
    with pytest.raises(InvalidInput, match=rf"tiny.safetensors: its sha256 is \w+, not the {digest} given"):
        local_weights([f"{url}#sha256={digest}"], s3.storage_options)
    assert list((tmp_path / "other-cache" / "weights").iterdir()) == []  # nothing half-fetched is kept
    monkeypatch.setenv("ADAREVD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(InvalidInput, match="after '#' give sha256="):
        local_weights([f"{url}#md5=abc"], s3.storage_options)
    # The command line: restore with weights from the bucket, its sha256 given.
    out = tmp_path / "out"
    weights = f"--weights={url}#sha256={digest}"
    assert main(["restore", weights, "--output", str(out), *s3.cli_options()]) == 0
    assert (out / "demo_blurry.deblurred.png").exists() and url in capsys.readouterr().out
    # From Python: pipeline.load_model fetches URLs; adarevd.build reads local files and names the other.
    import adarevd
    from pipeline import load_model

    model = load_model(weights=[f"{url}#sha256={digest}"], storage_options=s3.storage_options)
    assert adarevd.fingerprint(model) == adarevd.fingerprint(adarevd.build("adarevd-tiny", weights=[fetched]))
    with pytest.raises(InvalidInput, match=r"pipeline\.load_model fetches URLs"):
        adarevd.build("adarevd-tiny", weights=[url])
