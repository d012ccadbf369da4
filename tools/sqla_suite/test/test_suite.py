"""SQLAlchemy's dialect compliance suite, whole."""

from sqlalchemy.testing.suite import *  # noqa: F403 - the suite's test classes
