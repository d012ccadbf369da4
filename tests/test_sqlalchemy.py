"""sqlite+mpwriter: SQLAlchemy Core and ORM, Alembic and pandas through the writer."""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import multiprocessing
import os
import random
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mpwriter

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import (  # noqa: E402 - after the skip
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import registry  # noqa: E402
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column  # noqa: E402

from mpwriter.sqlalchemy import MPWriterDialect  # noqa: E402

ENTRY_POINT = "sqlite.mpwriter"


def _registered_by_entry_point() -> bool:
    points = importlib.metadata.entry_points(group="sqlalchemy.dialects")
    return any(point.name == ENTRY_POINT for point in points)


if not _registered_by_entry_point():
    # Running from a checkout (PYTHONPATH), not an installed package.
    registry.register(ENTRY_POINT, "mpwriter.sqlalchemy", "MPWriterDialect")


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[int] = mapped_column(primary_key=True)
    balance: Mapped[int]


class Ledger(Base):
    __tablename__ = "ledger"
    id: Mapped[int] = mapped_column(primary_key=True)
    account_id: Mapped[int] = mapped_column(ForeignKey("accounts.id"))
    delta: Mapped[int]


class Note(Base):
    __tablename__ = "notes"
    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(50))


@pytest.fixture
def handle(db_path: Path) -> Iterator[mpwriter.Writer]:
    writer = mpwriter.start(db_path, timeout=10.0, context="fork")
    mpwriter.attach(writer)
    try:
        yield writer
    finally:
        writer.close(timeout=10.0)


@pytest.fixture
def engine(handle: mpwriter.Writer) -> Iterator[Any]:
    eng = create_engine(f"sqlite+mpwriter:///{handle.path}")
    try:
        yield eng
    finally:
        eng.dispose()


def committed(path: str, sql: str) -> list[tuple[Any, ...]]:
    """Rows as another process would see them (a fresh read-only connection)."""
    with mpwriter.reader(path) as conn:
        return list(conn.execute(sql).fetchall())


def test_the_entry_point_names_the_dialect() -> None:
    try:
        importlib.metadata.distribution("mpwriter")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("mpwriter is not installed here: its entry points do not exist")
    (point,) = [
        p
        for p in importlib.metadata.entry_points(group="sqlalchemy.dialects")
        if p.name == ENTRY_POINT
    ]
    assert point.load() is MPWriterDialect


def test_the_url_loads_the_dialect_over_mpwriters_dbapi(engine: Any) -> None:
    assert isinstance(engine.dialect, MPWriterDialect)
    assert engine.dialect.driver == "mpwriter"
    assert engine.dialect.dbapi is mpwriter.dbapi
    with engine.connect() as conn:
        assert conn.execute(text("SELECT sqlite_version()")).scalar()


def test_core_executemany_returning_and_reflection(handle: mpwriter.Writer, engine: Any) -> None:
    metadata = MetaData()
    parents = Table("parents", metadata, Column("id", Integer, primary_key=True))
    kids = Table(
        "kids",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("parent_id", ForeignKey("parents.id"), index=True),
        Column("name", String(20), nullable=False),
    )
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(parents), [{"id": 1}, {"id": 2}])
        ids = conn.execute(
            insert(kids).returning(kids.c.id, kids.c.name, sort_by_parameter_order=True),
            [{"parent_id": 1, "name": f"k{i}"} for i in range(5)],
        ).all()
        assert [name for _, name in ids] == [f"k{i}" for i in range(5)]
        assert conn.execute(select(func.count()).select_from(kids)).scalar() == 5
        assert committed(handle.path, "SELECT count(*) FROM kids") == [(0,)]
    assert committed(handle.path, "SELECT count(*) FROM kids") == [(5,)]
    inspector = inspect(engine)
    assert set(inspector.get_table_names()) == {"parents", "kids"}
    assert [c["name"] for c in inspector.get_columns("kids")] == ["id", "parent_id", "name"]
    assert inspector.get_foreign_keys("kids")[0]["referred_table"] == "parents"
    assert inspector.get_indexes("kids")[0]["column_names"] == ["parent_id"]


def test_orm_flush_returns_keys_and_begin_nested_rolls_back_alone(
    handle: mpwriter.Writer, engine: Any
) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        kept = Note(body="kept")
        session.add(kept)
        session.flush()
        assert kept.id is not None
        assert committed(handle.path, "SELECT count(*) FROM notes") == [(0,)]
        nested = session.begin_nested()
        session.add(Note(body="undone"))
        session.flush()
        nested.rollback()
        with session.begin_nested():
            session.add(Note(body="nested kept"))
        assert session.scalar(select(func.count()).select_from(Note)) == 2
    assert committed(handle.path, "SELECT body FROM notes ORDER BY id") == [
        ("kept",),
        ("nested kept",),
    ]


def test_an_orm_get_of_a_missing_row_inside_a_transaction(engine: Any) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        assert session.get(Note, 12345) is None


def test_threads_share_one_engine(handle: mpwriter.Writer, engine: Any) -> None:
    # The pool hands connections from thread to thread (check_same_thread is
    # off); each runs its transactions in its own session.
    Base.metadata.create_all(engine)
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")

    def add(thread: int) -> None:
        mine = select(func.count()).where(Note.body.like(f"{thread}-%"))
        for n in range(10):
            with Session(engine) as session, session.begin():
                session.add(Note(body=f"{thread}-{n}"))
                session.flush()
                assert session.scalar(mine) == n + 1
            with auto.connect() as conn:  # a local read, on whichever pooled connection
                assert conn.scalar(mine) == n + 1

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(add, thread) for thread in range(4)]:
            future.result(timeout=60)
    assert committed(handle.path, "SELECT count(*) FROM notes") == [(40,)]


def test_an_exception_rolls_the_orm_transaction_back(handle: mpwriter.Writer, engine: Any) -> None:
    Base.metadata.create_all(engine)

    def fail_inside() -> None:
        with Session(engine) as session, session.begin():
            session.add(Note(body="gone"))
            session.flush()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        fail_inside()
    assert committed(handle.path, "SELECT count(*) FROM notes") == [(0,)]


def test_an_autocommit_engine_reads_locally(handle: mpwriter.Writer, engine: Any) -> None:
    Base.metadata.create_all(engine)
    auto = engine.execution_options(isolation_level="AUTOCOMMIT")
    before = handle.stats()["requests"]
    with auto.connect() as conn:
        conn.execute(insert(Note), [{"body": "a"}])
        assert conn.execute(select(Note.body)).scalars().all() == ["a"]
    assert handle.stats()["requests"] == before + 1


def test_a_writer_killed_mid_transaction_invalidates_the_connection(
    handle: mpwriter.Writer, engine: Any
) -> None:
    Base.metadata.create_all(engine)
    pid = handle.stats()["pid"]  # asked first: an open transaction holds every request
    with Session(engine) as session:
        session.begin()
        session.add(Note(body="lost"))
        session.flush()
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(sqlalchemy.exc.DBAPIError) as lost:
            session.execute(select(Note))
        assert lost.value.connection_invalidated
        assert isinstance(lost.value.orig, mpwriter.WriterCrashed)
    assert handle.execute("SELECT count(*) FROM notes", timeout=30.0).rows == [(0,)]


def test_alembic_upgrade_head(handle: mpwriter.Writer, tmp_path: Path) -> None:
    pytest.importorskip("alembic")
    from alembic import command
    from alembic.config import Config

    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(
        textwrap.dedent(
            """
            from alembic import context
            from sqlalchemy import create_engine

            engine = create_engine(context.config.get_main_option("sqlalchemy.url"))
            with engine.connect() as connection:
                context.configure(connection=connection)
                with context.begin_transaction():
                    context.run_migrations()
            engine.dispose()
            """
        )
    )
    (scripts / "versions" / "0001_widgets.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op

            revision = "0001"
            down_revision = None

            def upgrade():
                widgets = op.create_table(
                    "widgets",
                    sa.Column("id", sa.Integer, primary_key=True),
                    sa.Column("name", sa.String(20)),
                )
                op.bulk_insert(widgets, [{"name": "one"}, {"name": "two"}])
            """
        )
    )
    (scripts / "versions" / "0002_colour.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op

            revision = "0002"
            down_revision = "0001"

            def upgrade():
                op.add_column("widgets", sa.Column("colour", sa.String(10)))
                op.execute("UPDATE widgets SET colour = 'red'")
            """
        )
    )
    config = Config()
    config.set_main_option("script_location", str(scripts))
    config.set_main_option("sqlalchemy.url", f"sqlite+mpwriter:///{handle.path}")
    command.upgrade(config, "head")
    assert committed(handle.path, "SELECT version_num FROM alembic_version") == [("0002",)]
    assert committed(handle.path, "SELECT name, colour FROM widgets ORDER BY id") == [
        ("one", "red"),
        ("two", "red"),
    ]


def test_pandas_to_sql(handle: mpwriter.Writer, engine: Any) -> None:
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"name": ["a", "b", "c"], "score": [1.5, 2.5, 3.5]})
    assert frame.to_sql("scores", engine, index=False) == 3
    frame.to_sql("scores", engine, index=False, if_exists="append", chunksize=2)
    assert committed(handle.path, "SELECT count(*), sum(score) FROM scores") == [(6, 15.0)]
    back = pandas.read_sql("SELECT name FROM scores ORDER BY rowid LIMIT 3", engine)
    assert back["name"].tolist() == ["a", "b", "c"]


# -- the bank-transfer workload -------------------------------------------------------

ACCOUNTS = 20
OPENING = 1000


def transfers(path: str, seconds: float, seed: int) -> tuple[int, int]:
    """Run ORM transfers for ``seconds``; return (done, errors)."""
    engine = create_engine(f"sqlite+mpwriter:///{path}")
    rng = random.Random(seed)
    done = errors = 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            a, b = rng.sample(range(1, ACCOUNTS + 1), 2)
            amount = rng.randint(1, 50)
            try:
                with Session(engine) as session, session.begin():
                    source = session.get(Account, a)
                    target = session.get(Account, b)
                    assert source is not None
                    assert target is not None
                    source.balance -= amount
                    target.balance += amount
                    session.add(Ledger(account_id=a, delta=-amount))
                    session.add(Ledger(account_id=b, delta=amount))
                done += 1
            except Exception:  # counted: the test asserts there are none
                errors += 1
    finally:
        engine.dispose()
    return done, errors


@pytest.mark.timeout(120)  # 8 processes for 2 s each on a loaded 2-core machine
def test_bank_transfers_from_8_processes_conserve_money(
    handle: mpwriter.Writer, engine: Any
) -> None:
    Base.metadata.create_all(engine)
    with Session(engine) as session, session.begin():
        session.add_all(Account(id=i, balance=OPENING) for i in range(1, ACCOUNTS + 1))
    context = multiprocessing.get_context("fork")
    with context.Pool(8, initializer=mpwriter.attach, initargs=(handle,)) as pool:
        outcomes = pool.starmap_async(
            transfers, [(handle.path, 2.0, seed) for seed in range(8)]
        ).get(timeout=90)
    done = sum(d for d, _ in outcomes)
    errors = sum(e for _, e in outcomes)
    assert errors == 0
    assert done > 0
    assert committed(handle.path, "SELECT sum(balance) FROM accounts") == [(ACCOUNTS * OPENING,)]
    drift = committed(
        handle.path,
        "SELECT a.id FROM accounts a LEFT JOIN ledger l ON l.account_id = a.id "
        f"GROUP BY a.id HAVING a.balance != {OPENING} + coalesce(sum(l.delta), 0)",
    )
    assert drift == []
    assert committed(handle.path, "SELECT count(*) FROM ledger") == [(2 * done,)]
