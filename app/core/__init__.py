"""The config-set core shared by the receiver and the agent: no Flask, no requests, no click."""

__version__ = "0.1.0"
PROTOCOL = 2  # the wire: 2 = signatures name their target server
