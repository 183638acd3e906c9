"""Server plumbing shared by every service."""
import pytest

from ilf.grpc_util import Server


def test_a_second_server_on_a_taken_port_fails_instead_of_sharing_it():
    first = Server(["ilf.v1.Test"], 0)
    first.start()
    try:
        with pytest.raises(OSError, match="cannot listen"):
            Server(["ilf.v1.Test"], first.port)
    finally:
        first.grpc_server.stop(None)
