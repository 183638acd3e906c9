"""Server plumbing shared by every service."""
import pytest

from conftest import empty_server


def test_a_second_server_on_a_taken_port_fails_instead_of_sharing_it():
    first = empty_server()
    first.start()
    try:
        with pytest.raises(OSError, match="cannot listen"):
            empty_server(first.port)
    finally:
        first.stop(0)
