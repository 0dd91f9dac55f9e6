"""Thin command-line entry points: `adarevd <command>`."""
