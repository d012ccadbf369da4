"""The writer side: the process that owns the only write connection.

The loop (`loop.py`) reads requests and groups them; the batch runner
(`batch.py`) commits each group; reply pipes (`reply_pipes.py`) carry the
answers back. Imports the wire protocol, never the caller side.
"""
