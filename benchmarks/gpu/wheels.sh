#!/usr/bin/env bash
# Run HERE (a machine with pip access), not on the GPU machine: fetches into .whl/ (in .gitignore) the
# Python 3.12 x86-64 wheels that the device machine's image lacks, for benchmarks/gpu/run.sh.
# Ray's wheel (79 MB) is over the 64 MiB a device call may carry: its Java jars (32 MB, unused by
# Python) and the dashboard's source maps are dropped, and the rest is unpacked there from .whl/.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .whl && mkdir -p .whl
ray_version=$(.venv/bin/python -c 'import ray; print(ray.__version__)')
wheels=(
  "ray==$ray_version" webdataset==1.0.2 braceexpand==0.1.7 tenacity==9.2.1
  jsonschema==4.25.1 jsonschema-specifications==2025.9.1 referencing==0.36.2 rpds-py==0.27.1
  # ray.train imports pydantic, which the image lacks (found by running the checks here in a venv of
  # only the image's packages: the Ray Train GPU test failed with "ray.train.v2 requires pydantic").
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
python3 benchmarks/gpu/wheelhouse.py slim .whl/ray-*.whl && rm .whl/ray-*.whl
du -sh .whl && ls -la .whl
