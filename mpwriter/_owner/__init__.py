"""The owner: starts the writer, supervises it, and stops it.

It composes both sides: it builds the caller's `Writer` handle around the
descriptors it made, and runs the writer side in a child process.
"""
