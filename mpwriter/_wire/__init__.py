"""The wire protocol: what crosses between callers and the writer process.

Frames on the request pipe, replies on the reply pipes, the registration and
hand-over messages on the side socket, and the shared state word. This package
imports neither side (`mpwriter._caller`, `mpwriter._writer`); both import it.
"""
