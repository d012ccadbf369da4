"""SQLAlchemy's pytest plugin, and for sqlite+mpwriter a writer for the suite's database.

``MPWRITER_SUITE_DB`` names the database file: a writer is started on it and
attached to this process, so that ``sqlite+mpwriter:///<that file>`` finds
its handle. The stock pysqlite run leaves it unset.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
from sqlalchemy.dialects import registry

import mpwriter

registry.register("sqlite.mpwriter", "mpwriter.sqlalchemy", "MPWriterDialect")
pytest.register_assert_rewrite("sqlalchemy.testing.assertions")

# SQLite's provisioning ATTACHes a "test_schema" database on every new
# connection and deletes the database file when an engine is disposed (after
# each test class). Under a running writer both are wrong: the writer owns
# the file for the whole run, and ATTACH is per connection, which the writer's
# one connection cannot share. The mpwriter run skips that hook (the schema
# tests are closed in sqla_requirements for both runs).
import sqlalchemy.dialects.sqlite.provision  # noqa: E402, F401 - registers the stock hooks first
from sqlalchemy.testing.provision import post_configure_engine  # noqa: E402

# (for_db returns its registry, not the function: take the function from it.)
_stock_post_configure_engine = post_configure_engine.fns["sqlite"]


@post_configure_engine.for_db("sqlite")
def _post_configure_engine(url: Any, engine: Any, follower_ident: Any) -> None:
    if engine.driver == "mpwriter":
        return
    _stock_post_configure_engine(url, engine, follower_ident)


from sqlalchemy.testing.plugin.pytestplugin import *  # noqa: E402, F403 - the plugin's hooks

_path = os.environ.get("MPWRITER_SUITE_DB")
if _path:
    mpwriter.attach(mpwriter.start(_path, timeout=30.0))
