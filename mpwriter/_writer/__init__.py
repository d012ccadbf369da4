"""The writer side: the process that owns the only write connection.

Data flows one way: the inbox (`inbox.py`) takes in frames, reply pipes
and handed-over payloads; the loop (`loop.py`) groups requests into batches
that an engine (`engine.py`) commits; the outbox (`outbox.py`) routes each
reply to its pipe. Imports the wire protocol, never the caller side.
"""
