"""Job spec files (TOML): one `adarevd` command described as data, validated with the line at fault.

```toml
name = "deblur-archive-2026"
kind = "deblur"                       # ingest | synth | deblur | train | eval
priority = 0
input = "s3://archive/frames"
output = "s3://archive/deblurred"
model = "adarevd-tiny"                # optional; weights = ["..."] too

[resources]                           # optional
workers = 2
cpus_per_worker = 1.0
gpus_per_worker = 0.5

[storage]                             # optional; secrets only by environment-variable name
endpoint_url = "http://127.0.0.1:8333"
region = "us-east-1"
key_env = "ARCHIVE_KEY_ID"            # read on the machine that runs the job
secret_env = "ARCHIVE_SECRET"

[options]                             # any other option of the command, by its long name
frames_per_batch = 16
```
`to_argv` turns a spec into the command line of the kind; the secrets are handed over as the usual
`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` environment of the run, never as arguments.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from adarevd.errors import InvalidInput

JobKind = Literal["ingest", "synth", "deblur", "train", "eval"]
KINDS: tuple[JobKind, ...] = ("ingest", "synth", "deblur", "train", "eval")
TOP = {
    "name": str,
    "kind": str,
    "priority": int,
    "input": str,
    "output": str,
    "model": str,
    "weights": list,
    "stage": str,
}
RESOURCES = {"workers": int, "cpus_per_worker": (int, float), "gpus_per_worker": (int, float), "num_cpus": (int, float)}
STORAGE = {"endpoint_url": str, "region": str, "key_env": str, "secret_env": str}
SECRET_NAMES = re.compile(r"(secret|password|token|key)$", re.IGNORECASE)


class SpecError(InvalidInput):
    """A spec that cannot be run; the message names the file, the line and the field."""


@dataclass(frozen=True)
class JobSpec:
    path: str
    name: str
    kind: JobKind
    priority: int = 0
    input: str | None = None
    output: str | None = None
    model: str | None = None
    weights: tuple[str, ...] = ()
    stage: str | None = None  # train: encoder | decoders | classifier
    resources: dict[str, float] = field(default_factory=dict)
    storage: dict[str, str] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def load_spec(path: str | Path) -> JobSpec:
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"{path}: cannot read the spec ({e})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{path}: not valid TOML: {e}") from None

    def fail(table: str | None, key: str, problem: str) -> SpecError:
        where = f"{table}.{key}" if table else key
        return SpecError(f"{path}:{_line_of(text, table, key)}: {where}: {problem}")

    for key, value in data.items():
        if isinstance(value, dict) and key in ("resources", "storage", "options"):
            continue
        if key not in TOP:
            raise fail(None, key, f"unknown field; known: {', '.join([*TOP, 'resources', 'storage', 'options'])}")
        if not isinstance(value, TOP[key]):
            raise fail(None, key, f"expected {_type_name(TOP[key])}, got {value!r}")
    for key in ("name", "kind"):
        if key not in data:
            raise SpecError(f"{path}: missing required field {key!r}")
    if data["kind"] not in KINDS:
        raise fail(None, "kind", f"{data['kind']!r} is not one of {', '.join(KINDS)}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", data["name"]):
        raise fail(None, "name", "use letters, digits, '.', '_' and '-' (at most 100)")
    kind = data["kind"]
    needs = {
        "ingest": ("input", "output"),
        "synth": ("output",),
        "deblur": ("input", "output"),
        "train": ("input", "output", "stage"),
        "eval": ("input",),
    }[kind]
    for key in needs:
        if key not in data:
            raise SpecError(f"{path}: kind {kind!r} needs {key!r}")
    if kind == "train" and data["stage"] not in ("encoder", "decoders", "classifier"):
        raise fail(None, "stage", "expected encoder, decoders or classifier")
    sections: dict[str, dict[str, Any]] = {}
    for table, allowed in (("resources", RESOURCES), ("storage", STORAGE)):
        section = data.get(table, {})
        for key, value in section.items():
            if table == "storage" and key not in allowed and SECRET_NAMES.search(key):
                raise fail(
                    table, key, "secrets only by environment-variable name: set one and name it in key_env / secret_env"
                )
            if key not in allowed:
                raise fail(table, key, f"unknown field; known: {', '.join(allowed)}")
            if not isinstance(value, allowed[key]) or isinstance(value, bool):
                raise fail(table, key, f"expected {_type_name(allowed[key])}, got {value!r}")
        sections[table] = dict(section)
    options = dict(data.get("options", {}))
    for key, value in options.items():
        if SECRET_NAMES.search(key) and isinstance(value, str):
            raise fail(
                "options",
                key,
                "looks like a secret: put it in an environment variable and name that in "
                "[storage] key_env / secret_env",
            )
        if isinstance(value, dict):
            raise fail("options", key, "nested tables are not options")
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and (problem := _unsafe_value(item)):
                raise fail("options", key, problem)
    weights = data.get("weights", [])
    if not all(isinstance(w, str) for w in weights):
        raise fail(None, "weights", "expected a list of file names")
    for table, key, value in [
        *((None, k, data[k]) for k in ("input", "output") if isinstance(data.get(k), str)),
        *((None, "weights", w) for w in weights),
        *(("storage", k, v) for k, v in sections["storage"].items() if isinstance(v, str)),
    ]:
        if problem := _unsafe_value(value):
            raise fail(table, key, problem)
    return JobSpec(
        path=str(path),
        name=data["name"],
        kind=kind,
        priority=data.get("priority", 0),
        input=data.get("input"),
        output=data.get("output"),
        model=data.get("model"),
        weights=tuple(weights),
        stage=data.get("stage"),
        resources=sections["resources"],
        storage=sections["storage"],
        options=options,
    )


def _unsafe_value(value: str) -> str | None:
    """Why a spec's value must not be used as given: it would read as a flag, or it holds a secret (a
    `name=value` whose name looks like one, or a URL with a user name or password)."""
    if value.startswith("-"):
        return f"{value!r} starts with '-' and would read as a flag; values from a spec are values"
    name, _, rest = value.partition("=")
    if rest and SECRET_NAMES.search(name.rsplit(".", 1)[-1]):
        return (
            f"{name}=... looks like a secret: put it in an environment variable and name that in "
            "[storage] key_env / secret_env"
        )
    for text in (value, rest):
        url = urlsplit(text) if "://" in text else None
        if url is not None and (url.username or url.password):
            return (
                "a URL with a user name or password: give credentials by environment-variable name "
                "([storage] key_env / secret_env)"
            )
    return None


def check_options(spec: JobSpec, known: Iterable[str]) -> None:
    """Refuse [resources] and [options] fields that are not long options (`known`) of the command."""
    known = set(known)
    text = Path(spec.path).read_text()
    for table, section in (("resources", spec.resources), ("options", spec.options)):
        for key in section:
            if "--" + key.replace("_", "-") not in known:
                choices = ", ".join(sorted(k[2:].replace("-", "_") for k in known if k != "--help"))
                raise SpecError(
                    f"{spec.path}:{_line_of(text, table, key)}: {table}.{key}: not an option of "
                    f"`adarevd {spec.kind}`; known: {choices}"
                )


def to_argv(spec: JobSpec) -> list[str]:
    """The `adarevd` command line of the spec (without secrets)."""
    argv: list[str] = [spec.kind]
    if spec.kind == "train":
        argv += [str(spec.stage), str(spec.input), "--output", str(spec.output)]
    elif spec.kind == "ingest":
        argv += [str(spec.input), "--output", str(spec.output)]
    elif spec.kind == "synth":
        argv += ["--output", str(spec.output)]
    elif spec.kind == "deblur":
        argv += [str(spec.input), str(spec.output)]
    else:
        argv += [str(spec.input)]
    if spec.model:
        argv += ["--model", spec.model]
    if spec.weights:
        argv += [arg for weights in spec.weights for arg in ("--weights", weights)]
    for key, value in {**spec.resources, **spec.options}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is not False:
            argv += [flag, *(map(str, value) if isinstance(value, list) else [str(value)])]
    if "endpoint_url" in spec.storage:
        argv.append(f"--storage-option=client_kwargs.endpoint_url={spec.storage['endpoint_url']}")
    if "region" in spec.storage:
        argv.append(f"--storage-option=client_kwargs.region_name={spec.storage['region']}")
    return argv


def secret_environment(spec: JobSpec) -> dict[str, str]:
    """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the variables the spec names, read here and now."""
    env = {}
    for field_name, target in (("key_env", "AWS_ACCESS_KEY_ID"), ("secret_env", "AWS_SECRET_ACCESS_KEY")):
        name = spec.storage.get(field_name)
        if name is None:
            continue
        if name not in os.environ:
            raise SpecError(f"{spec.path}: [storage] {field_name} names ${name}, which is not set here")
        env[target] = os.environ[name]
    return env


def _line_of(text: str, table: str | None, key: str) -> int:
    """1-based line where `key` is set (inside `[table]` when given); 0 if not found."""
    inside = table is None
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(r"\s*\[([^\]]+)\]", line)
        if header:
            inside = header.group(1).strip() == table
            continue
        if inside and re.match(rf"\s*{re.escape(key)}\s*=", line):
            return number
    return 0


def _type_name(kind: type | tuple[type, ...]) -> str:
    if isinstance(kind, tuple):
        return "number"
    return {"int": "integer", "str": "string"}.get(kind.__name__, kind.__name__)
