"""Imported at start-up by any Python whose path holds this folder: blocks all networking.

Tests run the pipeline with it to prove that nothing is downloaded at run time. Libraries often
swallow a failed connection and carry on, so every attempt is also appended to the file named
by ``NO_NETWORK_LOG`` (when set): a test can assert that nothing even tried.
"""

import os
import socket

_real_socket = socket.socket


def _refuse(what: str) -> OSError:
    log = os.environ.get("NO_NETWORK_LOG")
    if log:
        with open(log, "a") as f:
            f.write(what + "\n")
    return OSError(f"network blocked by tests/no_network: {what}")


class _NoNetworkSocket(_real_socket):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise _refuse(f"connect to {address}")
        return super().connect(address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise _refuse(f"connect to {address}")
        return super().connect_ex(address)


def _no_getaddrinfo(*args, **kwargs):
    raise _refuse(f"getaddrinfo{args[:2]}")


def _no_create_connection(*args, **kwargs):
    raise _refuse(f"create_connection{args[:1]}")


socket.socket = _NoNetworkSocket
socket.getaddrinfo = _no_getaddrinfo
socket.create_connection = _no_create_connection
