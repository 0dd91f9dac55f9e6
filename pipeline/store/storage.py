"""Object storage at the edge: any fsspec URL, resolved once, with atomic commits.

A `Store` is a folder on some filesystem (local path, `s3://bucket/prefix`, `memory://x`, `gs://...`).
Writers never write at a final name: bytes go to `_tmp/<name>.<uuid>.part` first and are then moved to
the final name, so a reader that globs `*.tar` never sees a partial or 0-byte object (on S3 the move is
a server-side copy, which is all-or-nothing). Storage options (credentials, endpoints) are plain data
passed alongside URLs; they never appear in messages (`redact`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import fsspec
import tenacity
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from adarevd.errors import AlreadyExists, InvalidInput, NotFound, UserError

TMP_DIR = "_tmp"
STAT_THREADS = 16
# What fsspec's `info` says of a file that changes whenever it is written again: ETag / generation on
# object stores (S3, GCS, Azure), modification time and inode on local disks, creation time in memory.
VERSION_FIELDS = ("ETag", "etag", "generation", "LastModified", "last_modified", "mtime", "ino", "created")
T = TypeVar("T")


class StorageError(UserError):
    """A store could not be reached or an object could not be read/written (message names the URL)."""


def parse_storage_options(pairs: Iterable[str]) -> dict[str, Any]:
    """`key=value` strings -> fsspec storage options. Dotted keys nest (`client_kwargs.endpoint_url=...`);
    values that parse as JSON (numbers, true/false, null) are taken as such, everything else as a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep or not name:
            raise InvalidInput(f"--storage-option {pair.split('=')[0]!r}: expected key=value")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = name.split(".")
        node = options
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise InvalidInput(f"--storage-option {name}: {part} is both a value and a group")
        node[leaf] = value
    return options


REMOTE_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")
OBJECT_STORE_SCHEMES = (*REMOTE_OBJECT_STORES, "memory")  # stores without folders
S3_CONNECTIONS = 64  # connections a process keeps to an S3 endpoint (unless config_kwargs says otherwise)


def resolve(url: str, options: Mapping[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    """URL -> (filesystem, path), or a StorageError that says what is missing (e.g. gcsfs for gs://).
    fsspec caches filesystem instances per (protocol, options), so resolving again is cheap."""
    options, scheme = dict(options), urlsplit(url).scheme
    if scheme in REMOTE_OBJECT_STORES:
        # Other processes commit into the same folders while a job runs: a cached listing would hide
        # their objects (and make a listed object look missing). Always ask the store.
        options.setdefault("use_listings_cache", False)
    if scheme in ("s3", "s3a"):
        # botocore keeps 10 connections a client; requests made many at a time (`read_many`, `stats`)
        # would queue for them.
        options["config_kwargs"] = {"max_pool_connections": S3_CONNECTIONS, **(options.get("config_kwargs") or {})}
    try:
        return url_to_fs(url, **options)
    except (ImportError, ValueError, TypeError) as e:
        raise StorageError(f"{redact(url)}: cannot open this storage URL: {e}") from e


@dataclass(frozen=True)
class FileStat:
    """A file's size and `version`: a token that changes when the file is written again (its bytes may
    then be the same, as after `touch`). On a local disk a tool that writes into the same inode and then
    sets the old mtime back is not seen; an object store's ETag always is."""

    size: int
    version: str


def file_stat(info: Mapping[str, Any]) -> FileStat:
    version = " ".join(f"{key}={info[key]}" for key in VERSION_FIELDS if info.get(key) not in (None, ""))
    return FileStat(int(info["size"]), version)


def file_store(url: str, options: Mapping[str, Any]) -> tuple[Store, str]:
    """(the Store of the folder holding `url`, the file's name in it)."""
    parent, _, name = url.rpartition("/")
    return Store(parent or ".", options), name


def location(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, str]:
    """(protocol, path) to tell whether two places are one: local paths with links and '..' resolved."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, os.path.realpath(path) if isinstance(fs, LocalFileSystem) else path.rstrip("/") or path


def absolute(url: str) -> str:
    """A local path made absolute (it then means the same from any directory); URLs unchanged."""
    return url if "://" in url else os.path.abspath(url)


OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")  # credentials never ride in their URLs


def redact(url: str) -> str:
    """The URL without any user:password@ part, for messages and metadata."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


def redact_text(text: str) -> str:
    """`text` with the user:password@ part of every URL in it removed (a library's message may quote
    an endpoint URL as it was given)."""
    return USERINFO.sub(r"\g<scheme>", text)


@dataclass(frozen=True)
class Store:
    """A folder on an fsspec filesystem. `url` is the folder; names inside are joined with '/'."""

    url: str
    options: Mapping[str, Any] = field(default_factory=dict)
    retry_seconds: float = 60.0  # keep retrying an unreachable store this long (exponential backoff)

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", self.url.rstrip("/") or self.url)
        parts = urlsplit(self.url)
        if parts.scheme in OBJECT_STORES and (parts.username or parts.password):
            # s3fs would take `KEY:SECRET@bucket` for a bucket name, and botocore's error would print it.
            raise InvalidInput(
                f"{redact(self.url)}: a user name or password in an {parts.scheme}:// URL is not read; give "
                "credentials by environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) or --storage-option"
            )

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return self._resolved()[0]

    @property
    def root(self) -> str:
        return self._resolved()[1]

    def _resolved(self) -> tuple[fsspec.AbstractFileSystem, str]:
        fs, path = resolve(self.url, self.options)
        return fs, path.rstrip("/") or path

    def location(self, name: str = "") -> tuple[str, str]:
        """The `location` of this folder (or of `name` in it): equal for two spellings of one place."""
        return location(self.fs, self.path(name))

    def file_location(self, name: str) -> str:
        """`protocol://path` of a file in this folder, links and '..' resolved: one for every spelling."""
        protocol, path = self.location(name)
        return f"{protocol}://{path}"

    def path(self, name: str) -> str:
        return f"{self.root}/{name}" if name else self.root

    @property
    def is_local(self) -> bool:
        """A folder on this machine's disks."""
        return isinstance(self.fs, LocalFileSystem)

    @property
    def _object_store(self) -> bool:
        """A store without folders to make (S3 and its kind, memory)."""
        return urlsplit(self.url).scheme in OBJECT_STORE_SCHEMES

    def retrying_at_most(self, seconds: float) -> Store:
        """This store, retrying one that does not answer for at most `seconds` (or its own, shorter, window)."""
        return replace(self, retry_seconds=min(seconds, self.retry_seconds))

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        return self._call("check", name, lambda: self.fs.exists(self.path(name)))

    def glob(self, pattern: str) -> list[str]:
        """Names (relative to the store) matching `pattern`, sorted."""
        root = self.root
        found = self._call("list", pattern, lambda: self.fs.glob(self.path(pattern)))
        return sorted(p[len(root) + 1 :] for p in found if p.startswith(root + "/"))

    def glob_files(self, pattern: str) -> tuple[list[str], list[str]]:
        """(files, other entries: folders and the like) matching `pattern`, each sorted, relative names."""
        root = self.root
        found = self._call("list", pattern, lambda: self.fs.glob(self.path(pattern), detail=True))
        named = {p[len(root) + 1 :]: info.get("type") for p, info in found.items() if p.startswith(root + "/")}
        return sorted(n for n, kind in named.items() if kind == "file"), sorted(
            n for n, k in named.items() if k != "file"
        )

    def read_bytes(self, name: str) -> bytes:
        return self._call("read", name, lambda: self.fs.cat_file(self.path(name)))

    def read_many(self, names: Sequence[str], tail: int | None = None, chunk: int = 64) -> Iterator[tuple[str, bytes]]:
        """`(name, bytes)` of every file (with `tail`, its last `tail` bytes), in order, `chunk` files at
        a time, read concurrently where the store is asynchronous (S3, GCS, HTTP): a chunk costs one
        round trip, not one a file. Names are not globs."""
        start = -tail if tail else None
        for first in range(0, len(names), chunk):
            part = list(names[first : first + chunk])
            paths = [self.path(name) for name in part]
            found = self._call(
                "read", _several(part), partial(self.fs.cat_ranges, paths, start, None, on_error="raise")
            )
            yield from zip(part, found, strict=True)

    def stats(self, names: Sequence[str]) -> list[FileStat]:
        """Each file's `FileStat`, asked `STAT_THREADS` at a time."""
        if not names:
            return []
        fs = self.fs

        def ask() -> list[FileStat]:
            with ThreadPoolExecutor(max_workers=min(STAT_THREADS, len(names))) as pool:
                return [file_stat(info) for info in pool.map(fs.info, [self.path(name) for name in names])]

        return self._call("check", _several(names), ask)

    def stat(self, name: str) -> FileStat:
        return self._call("check", name, lambda: file_stat(self.fs.info(self.path(name))))

    def open(self, name: str) -> IO[bytes]:
        return self._call("open", name, lambda: self.fs.open(self.path(name), "rb"))

    def download(self, name: str, local_path: str) -> None:
        """Copy `name` to a local file (retried like every call to the store)."""
        self._call("download", name, lambda: self.fs.get_file(self.path(name), local_path))

    def remove(self, name: str) -> None:
        self._call("remove", name, lambda: self.fs.rm_file(self.path(name)))

    def remove_tree(self, name: str) -> None:
        """Remove a folder and everything under it (nothing happens if it is not there)."""

        def rm() -> None:
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)

        self._call("remove", name, rm)

    def remove_empty_folder(self, name: str) -> None:
        """Remove the folder `name` if it is empty; best effort, one try. A writer that makes the
        folder again at the same moment is safe: `create` makes it again. On object stores this is a
        delete of the key `name` itself: nothing on plain S3, the folder entry on SeaweedFS (which
        keeps a folder that still holds objects)."""
        with suppress(OSError):
            if self._object_store:
                self.fs.rm_file(self.path(name))
            else:
                self.fs.rmdir(self.path(name))

    def commit_bytes(self, name: str, data: bytes) -> None:
        """Write `data` at `name` so that readers see all of it or nothing."""
        tmp = self._tmp_name(name)
        with self._discarded_on_failure(tmp):
            self._call("write", tmp, lambda: self._mkparent(tmp).pipe_file(self.path(tmp), data))
        self._commit(tmp, name)

    def create(self, name: str, data: bytes) -> None:
        """Write `name` only if nothing is there yet, else FileExistsError; atomic where the store
        allows: a hard link on local folders, a conditional PUT (If-None-Match: *) on S3. Other fsspec stores
        get fsspec's check-then-write, which two writers can race."""

        def put() -> None:
            fs, path = self._mkparent(name), self.path(name)
            if isinstance(fs, LocalFileSystem):
                # A hard link to a finished file: atomic, fails if the name exists, never half-written.
                part = f"{path}.{uuid.uuid4().hex}.part"
                for attempt in range(3):
                    try:
                        with open(part, "wb") as handle:
                            handle.write(data)
                        break
                    except FileNotFoundError:  # the folder went (`remove_empty_folder`) after _mkparent
                        if attempt == 2:
                            raise
                        os.makedirs(posixpath.dirname(path), exist_ok=True)
                    except BaseException:  # a full disk: leave no partial file behind
                        with suppress(FileNotFoundError):
                            os.unlink(part)
                        raise
                try:
                    os.link(part, path)
                finally:
                    os.unlink(part)
                return
            try:
                fs.pipe_file(path, data, mode="create")
            except OSError as e:
                if isinstance(e, FileExistsError) or "pre-condition" in str(e) or "PreconditionFailed" in str(e):
                    raise AlreadyExists(f"{redact(self.url_of(name))} exists") from e
                raise

        self._call("create", name, put)

    def commit_file(self, name: str, local_path: str) -> None:
        """Upload a finished local file to `name`, all or nothing."""
        tmp = self._tmp_name(name)
        with self._discarded_on_failure(tmp):
            self._call("write", tmp, lambda: self._mkparent(tmp).put_file(local_path, self.path(tmp)))
        self._commit(tmp, name)

    @contextmanager
    def _discarded_on_failure(self, tmp: str) -> Iterator[None]:
        """Remove the partial `tmp` of a write that failed on a local disk: on a full disk it would keep
        the disk full and fail every later write. (An object store's failed PUT leaves no object, and
        one that is down would only be asked again.)"""
        try:
            yield
        except BaseException:
            if self.is_local:
                with suppress(OSError):
                    os.unlink(self.path(tmp))
            raise

    def remove_tmp_folder(self) -> None:
        """Remove the temporary folder unless a (crashed) writer left parts in it. Object stores that
        keep folders (SeaweedFS) list it as an entry of its own; plain S3 has nothing to remove."""
        fs, tmp = self.fs, self.path(TMP_DIR)
        try:
            if not any(p.endswith(".part") for p in fs.find(tmp)):
                fs.rm(tmp, recursive=True)
        except (FileNotFoundError, OSError):
            pass
        fs.invalidate_cache(self.root)

    def sweep_parts(self, older_than: float) -> tuple[int, int]:
        """Remove the partial files in the temporary folder last written before `older_than` (Unix
        time): those of runs that died or failed mid-write (a full disk). Returns (files, bytes)."""

        def sweep() -> tuple[int, int]:
            try:
                found = self.fs.find(self.path(TMP_DIR), detail=True)
            except FileNotFoundError:
                return 0, 0
            files = size = 0
            for path, info in found.items():
                written = _written_at(info)
                if path.endswith(".part") and written is not None and written < older_than:
                    with suppress(FileNotFoundError):
                        self.fs.rm_file(path)
                        files, size = files + 1, size + int(info.get("size") or 0)
            return files, size

        return self._call("clear old partial files in", TMP_DIR, sweep)

    def free_bytes(self) -> int | None:
        """Free space on the disk of a local folder (None on object stores, which do not fill up)."""
        if not self.is_local:
            return None
        folder = Path(self.root)
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        return shutil.disk_usage(folder).free

    def _tmp_name(self, name: str) -> str:
        return f"{TMP_DIR}/{name.replace('/', '__')}.{uuid.uuid4().hex}.part"

    def _mkparent(self, name: str) -> fsspec.AbstractFileSystem:
        # Folders must exist before a write or a rename (local disks, SFTP). Object stores have none,
        # and s3fs's makedirs would ask for the bucket on every write, and create it if it is missing.
        fs = self.fs
        if not self._object_store:
            fs.makedirs(posixpath.dirname(self.path(name)), exist_ok=True)
        return fs

    def _commit(self, tmp: str, name: str) -> None:
        def move() -> None:
            fs, source, target = self._mkparent(name), self.path(tmp), self.path(name)
            try:
                if isinstance(fs, LocalFileSystem):
                    fs.mv(source, target)  # a rename
                else:  # a server-side copy; `mv` would read a name with [ ] * ? as a glob
                    fs.cp_file(source, target)
                    fs.rm_file(source)
            except FileNotFoundError:
                # A retried move whose first try landed before the connection broke finds its source gone.
                if not fs.exists(target):
                    raise

        self._call("commit", name, move)

    def _call(self, verb: str, name: str, fn: Callable[[], T]) -> T:
        return call(verb, self.url_of(name), fn, self.retry_seconds)


def _written_at(info: Mapping[str, Any]) -> float | None:
    """When a file was last written, as Unix time, from fsspec's `info` (None where it says nothing)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
    return None


def _several(names: Sequence[str]) -> str:
    """How a message names a request for many files: the first, and how many more."""
    return f"{names[0]} (and {len(names) - 1} more)" if len(names) > 1 else names[0]


def call(verb: str, url: str, fn: Callable[[], T], retry_seconds: float = 60.0) -> T:
    """Run one storage operation on `url`; retry it while the store is unreachable, then fail clearly
    (StorageError naming the URL). Not found and already there stay FileNotFoundError and
    FileExistsError, as `NotFound` and `AlreadyExists` naming the URL (a user's to fix)."""
    backoff = tenacity.wait_exponential(multiplier=0.5, max=10)

    def wait(state: tenacity.RetryCallState) -> float:  # the last try at the end of the window, not past it
        return min(backoff(state), max(0.0, retry_seconds - state.seconds_since_start))

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        wait=wait,
        stop=tenacity.stop_after_delay(retry_seconds),
        reraise=True,
    )
    try:
        return retrying(fn)
    except (NotFound, AlreadyExists):
        raise
    except FileNotFoundError as e:  # "The specified bucket does not exist" names no bucket: the URL does
        raise NotFound(f"{redact(url)}: could not {verb}: {e}") from e
    except FileExistsError as e:
        raise AlreadyExists(f"{redact(url)}: could not {verb}: {e}") from e
    except Exception as e:
        hint = credentials_hint(e)
        if not (hint or is_transient(e) or isinstance(e, (OSError, RuntimeError))):
            if not raised_by_storage_library(e):
                raise  # a defect here: its traceback is wanted
            hint = ". Check the URL and the storage options (--storage-option; a job spec: [storage])"
            e = RuntimeError(f"{type(e).__name__}: {e}")
        why = f"still unreachable after {retry_seconds:.0f} s of retries: " if is_transient(e) else ""
        raise StorageError(f"{redact(url)}: could not {verb}: {why}{redact_text(str(e))}{hint}") from e


STORAGE_LIBRARIES = frozenset({"fsspec", "s3fs", "botocore", "aiobotocore", "aiohttp", "gcsfs", "adlfs", "azure"})


def raised_by_storage_library(error: BaseException) -> bool:
    """Whether `error` was raised inside a storage library (an invalid bucket name, endpoint or option
    is its answer to the user's input, not a defect here)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    parts = Path(frames[-1].filename).parts
    return "site-packages" in parts and parts[parts.index("site-packages") + 1] in STORAGE_LIBRARIES


def credentials_hint(error: BaseException) -> str:
    """What to do about an S3 store that was given no (or half its) credentials; "" for other errors."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:
        return ""
    if not isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return ""
    return (
        ". Give them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or as --storage-option "
        "key=... and --storage-option secret=... (a job spec: [storage] key_env, secret_env); a public bucket: "
        "--storage-option anon=true"
    )


def is_transient(error: BaseException) -> bool:
    """A failure worth retrying: the store did not answer (connection refused or reset, timeout), as
    opposed to an answer (not found, access denied)."""
    if isinstance(error, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:  # s3fs reports an unreachable endpoint with botocore's own exception types
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return False
    return isinstance(error, (BotoConnectionError, HTTPClientError))
