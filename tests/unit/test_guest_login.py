"""A guest's SSH login against a real SSH server (paramiko's, on a socket pair): a key the
guest refuses is an error of its own; a connection that ends during the login is a dropped
login, tried again by the caller (a guest whose kernel crashed mid-login, in CI, read as
"the guest does not accept the run's key")."""
import socket
import threading
from types import SimpleNamespace

import paramiko
import pytest

from pytest_kvmcheck.errors import GuestLoginError, VMError
from pytest_kvmcheck.guests.session import GuestSession

HOST_KEY = paramiko.RSAKey.generate(1024)
CLIENT_KEY = SimpleNamespace(pkey=paramiko.RSAKey.generate(1024))


class Guest(paramiko.ServerInterface):
    def __init__(self, transport: paramiko.Transport, hang_up: bool):
        self.transport, self.hang_up = transport, hang_up

    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        if self.hang_up:
            self.transport.sock.close()  # the guest went away mid-login
        return paramiko.AUTH_FAILED


def login(hang_up: bool):
    ours, theirs = socket.socketpair()
    server = paramiko.Transport(theirs)
    server.add_server_key(HOST_KEY)
    threading.Thread(target=server.start_server, kwargs={"server": Guest(server, hang_up)}, daemon=True).start()
    try:
        GuestSession(ours, CLIENT_KEY, f"{HOST_KEY.get_name()} {HOST_KEY.get_base64()}", "g", timeout=5)
    finally:
        server.close()


def test_a_refused_key_is_not_tried_again():
    with pytest.raises(VMError, match="SSH login refused: .* does not accept the run's key") as info:
        login(hang_up=False)
    assert not isinstance(info.value, GuestLoginError)


def test_a_connection_that_ends_during_the_login_is_a_dropped_login():
    with pytest.raises(GuestLoginError, match="the connection ended during authentication"):
        login(hang_up=True)
