"""edgefleet's shared core: the wire contract and the hardware model that both the controller
and the device agent import. Nothing here opens a socket, a database or a terminal."""

__version__ = "0.1.0"
