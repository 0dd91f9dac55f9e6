"""Ray for the GPU machine, whose image lacks it and whose calls carry at most 64 MiB.

`slim WHEEL`: rewrite Ray's 79 MB wheel as `<name>.slim.zip` without its Java jars (32 MB; Python
never loads them) and the dashboard's source maps (about 45 MB left).
`unpack ZIP SITE`: unpack it into a folder on PYTHONPATH, keeping each member's mode bits (raylet and
gcs_server must stay executable; zipfile's own extract drops them).
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path


def dropped(name: str) -> bool:
    return name.startswith("ray/jars/") or name.endswith(".js.map")


def slim(wheel: Path) -> Path:
    out = wheel.with_name(wheel.name.removesuffix(".whl") + ".slim.zip")
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if not dropped(info.filename):
                zout.writestr(info, zin.read(info))
    return out


def unpack(archive: Path, site: Path) -> int:
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            path = Path(z.extract(info, site))
            if mode := info.external_attr >> 16:
                path.chmod(mode & 0o777)
        return len(z.infolist())


if __name__ == "__main__":
    verb, *paths = sys.argv[1:]
    if verb == "slim":
        print(f"wrote {slim(Path(paths[0]))}")
    elif verb == "unpack":
        print(f"{paths[0]}: {unpack(Path(paths[0]), Path(paths[1]))} files into {paths[1]}")
    else:
        sys.exit(f"usage: {sys.argv[0]} slim WHEEL | unpack ZIP SITE")
