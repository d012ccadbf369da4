"""What SQLite offers SQLAlchemy's suite: the same for the stock and the mpwriter runs.

One class for both dialects, so that a test open here and failing on
sqlite+mpwriter only is a difference of the driver, not of the setup.
"""

from __future__ import annotations

from sqlalchemy.testing import exclusions
from sqlalchemy.testing.requirements import SuiteRequirements


class Requirements(SuiteRequirements):
    @property
    def savepoints(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def views(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def ctes(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def ctes_with_update_delete(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def ctes_on_dml(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def window_functions(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def intersect(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def except_(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def json_type(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def autocommit(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def isolation_level(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def get_isolation_level_values(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def update_from(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def server_defaults(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def reflects_pk_names(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def indexes_with_expressions(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def datetime_historic(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def date_historic(self) -> exclusions.compound:
        return exclusions.open()

    @property
    def parens_in_union_contained_select_w_limit_offset(self) -> exclusions.compound:
        return exclusions.closed()  # SQLite's grammar has no parenthesized SELECT in a UNION

    @property
    def schemas(self) -> exclusions.compound:
        # The stock provisioning ATTACHes "test_schema" per connection; the
        # writer's one connection cannot (see test/conftest.py).
        return exclusions.closed()

    @property
    def temporary_tables(self) -> exclusions.compound:
        # A temporary table lives on one connection: mpwriter's reads and
        # writes run on different ones (see docs/orm.md).
        return exclusions.closed()

    @property
    def temp_table_reflection(self) -> exclusions.compound:
        return exclusions.closed()
