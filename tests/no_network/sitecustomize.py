"""Imported at start-up by any Python whose path holds this folder: blocks all networking.

Tests run the pipeline with it to prove that nothing is downloaded at run time.
"""

import socket

_real_socket = socket.socket


class _NoNetworkSocket(_real_socket):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network blocked by tests/no_network: connect to {address}")
        return super().connect(address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise OSError(f"network blocked by tests/no_network: connect to {address}")
        return super().connect_ex(address)


def _no_getaddrinfo(*args, **kwargs):
    raise OSError(f"network blocked by tests/no_network: getaddrinfo{args[:2]}")


socket.socket = _NoNetworkSocket
socket.getaddrinfo = _no_getaddrinfo
socket.create_connection = lambda *a, **k: (_ for _ in ()).throw(
    OSError(f"network blocked by tests/no_network: create_connection{a[:1]}"))
