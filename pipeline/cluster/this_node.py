"""The Ray node this process runs on, as `node_view.Place` names it in messages."""

from __future__ import annotations

import socket

import ray

from pipeline.cluster.node_view import Place


def this_node() -> Place:
    """The node this process runs on."""
    return Place(ray.get_runtime_context().get_node_id(), socket.gethostname(), ray.util.get_node_ip_address())
