"""The caller side: the `Writer` handle and everything a calling process runs.

Imports the wire protocol (`mpwriter._wire`) and the shared errors, never the
writer side: a caller's process loads none of SQLite's plumbing.
"""
