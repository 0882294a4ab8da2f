"""What the gateway and the worker share: the wire protocol, log setup, CURVE keys. Imports neither side."""
