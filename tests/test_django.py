"""mpwriter.django: a minimal Django project through the writer, in forked processes.

Each test writes a project (settings module, one app, its migrations) into
tmp_path, starts a writer with `mpwriter.django.writer_init` in this process,
and runs Django in children forked from here: they inherit the handle and
attach it, as gunicorn's workers do. Django itself is configured only in the
children, never in the pytest process.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

import mpwriter

pytest.importorskip("django")

import mpwriter.django
from _django_project import (
    FORK,
    answer,
    gunicorn,
    in_child,
    migrate,
    post,
    prepare_bank,
    reap,
    start_child,
    workload,
    write_project,
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The project's directory (on sys.path in the children)."""
    return write_project(tmp_path)


@pytest.fixture
def handle(project: Path) -> Iterator[mpwriter.Writer]:
    writer = mpwriter.start(
        project / "app.db", init=mpwriter.django.writer_init, timeout=10.0, context="fork"
    )
    try:
        yield writer
    finally:
        writer.close(timeout=10.0)


def committed(project: Path, sql: str) -> list[tuple[Any, ...]]:
    with mpwriter.reader(project / "app.db") as conn:
        return list(conn.execute(sql).fetchall())


# -- the tests -------------------------------------------------------------------


def _autocommit() -> object:
    migrate()
    from shop.models import Account, Customer

    customer = Customer.objects.create(name="ann")
    account = Account.objects.create(customer=customer, balance=10)
    Account.objects.filter(pk=account.pk).update(balance=15)
    account.refresh_from_db()
    return account.balance


def test_autocommit_create_and_update_are_committed_on_return(
    project: Path, handle: mpwriter.Writer
) -> None:
    assert in_child(project, handle, _autocommit) == 15
    assert committed(project, "SELECT balance FROM shop_account") == [(15,)]


def _nested_atomic() -> object:
    migrate()
    from django.db import connection, transaction
    from shop.models import Customer

    with transaction.atomic():
        Customer.objects.create(name="outer")
        try:
            with transaction.atomic():
                Customer.objects.create(name="inner")
                raise LookupError("roll the inner block back")
        except LookupError:
            pass
        # Inside the transaction, reads see its own writes.
        seen = sorted(Customer.objects.values_list("name", flat=True))
        assert connection.in_atomic_block
    return seen


def test_atomic_with_a_nested_atomic_rolled_back(project: Path, handle: mpwriter.Writer) -> None:
    assert in_child(project, handle, _nested_atomic) == ["outer"]
    assert committed(project, "SELECT name FROM shop_customer") == [("outer",)]


def _increments(count: int) -> object:
    from django.db.models import F
    from shop.models import Account

    acknowledged = 0
    for _ in range(count):
        Account.objects.filter(pk=1).update(balance=F("balance") + 1)
        acknowledged += 1
    return acknowledged


def _one_account() -> object:
    migrate()
    from shop.models import Account, Customer

    return Account.objects.create(customer=Customer.objects.create(name="c")).pk


def test_f_increments_from_several_processes(project: Path, handle: mpwriter.Writer) -> None:
    assert in_child(project, handle, _one_account) == 1
    started = [start_child(project, handle, lambda: _increments(50)) for _ in range(4)]
    acknowledged = sum(answer(child, receive) for child, receive in started)
    assert acknowledged == 200
    assert committed(project, "SELECT balance FROM shop_account") == [(200,)]


def _functions() -> object:
    migrate()
    from django.db.models import F
    from django.db.models.functions import ExtractYear, Lower, Now
    from shop.models import Account, Customer

    Account.objects.create(customer=Customer.objects.create(name="c"), label="MiXeD", balance=2)
    # Each update runs in the writer: Django's SQL functions must exist there.
    Account.objects.update(touched=Now(), label=Lower("label"), balance=F("balance") * 21)
    Account.objects.update(year=ExtractYear("touched"))
    return list(Account.objects.values_list("label", "balance", "year"))


def test_django_sql_functions_run_in_the_writer(project: Path, handle: mpwriter.Writer) -> None:
    [(label, balance, year)] = in_child(project, handle, _functions)
    assert (label, balance) == ("mixed", 42)
    [(touched, stored_year)] = committed(project, "SELECT touched, year FROM shop_account")
    assert stored_year == year == int(touched[:4])


def _migrate_with_rebuild() -> object:
    from django.db import IntegrityError, connection, transaction
    from shop.models import Account, Customer

    migrate("0001")
    ann = Customer.objects.create(name="ann")
    Account.objects.create(customer=ann, balance=7)
    migrate("0002")  # rebuilds shop_customer, which shop_account references
    with connection.cursor() as cursor:
        cursor.execute("SELECT sql FROM sqlite_master WHERE name = 'shop_customer'")
        schema = cursor.fetchone()[0]
    # Enforcement is back on for everyone after the rebuild.
    try:
        with transaction.atomic():
            Account.objects.create(customer_id=999)
    except IntegrityError:
        refused = True
    else:
        refused = False
    Customer.objects.create(name="a name of twenty chr")
    return schema, refused, list(Account.objects.values_list("customer__name", "balance"))


def test_migrate_rebuilds_a_referenced_table_with_foreign_keys_off(
    project: Path, handle: mpwriter.Writer
) -> None:
    schema, refused, rows = in_child(project, handle, _migrate_with_rebuild)
    assert "varchar(20)" in schema
    assert refused, "a dangling foreign key was committed after the rebuild"
    assert rows == [("ann", 7)]
    assert committed(project, "PRAGMA foreign_key_check") == []
    # A plain request too is refused a dangling key: the writer enforces again.
    with pytest.raises(sqlite3.IntegrityError):
        handle.execute("INSERT INTO shop_account(customer_id, balance, label) VALUES (999, 0, '')")


def _hold_inside_atomic(ready: Connection) -> object:
    from django.db import transaction
    from django.db.models import F
    from shop.models import Account

    with transaction.atomic():
        Account.objects.filter(pk=1).update(balance=F("balance") + 1000)
        ready.send("inside")
        ready.recv()  # never comes: the parent SIGKILLs this process
    return "not killed"


def test_a_process_killed_inside_atomic_is_rolled_back_alone(
    project: Path, handle: mpwriter.Writer
) -> None:
    in_child(project, handle, _one_account)
    assert in_child(project, handle, lambda: _increments(5)) == 5
    parent_end, child_end = FORK.Pipe()
    victim, receive = start_child(project, handle, lambda: _hold_inside_atomic(child_end))
    try:
        assert parent_end.poll(50.0), "the child did not enter atomic() in time"
        assert parent_end.recv() == "inside"
        os.kill(victim.pid, signal.SIGKILL)
        victim.join(10.0)
        assert victim.exitcode == -signal.SIGKILL
    finally:
        reap(victim)
        receive.close()
    # The writer rolls the dead caller's transaction back and serves the others.
    assert in_child(project, handle, lambda: _increments(5)) == 5
    assert committed(project, "SELECT balance FROM shop_account") == [(10,)]
    assert handle.stats()["sessions_expired"] >= 1


def _connected() -> object:
    migrate()
    from django.db import connection
    from shop.models import Customer

    Customer.objects.create(name="connected")
    writer = mpwriter.django.writer_for(connection.settings_dict["NAME"])
    return writer.stats()["pid"]


def test_a_process_without_the_handle_connects_to_the_writer_another_process_runs(
    project: Path, handle: mpwriter.Writer
) -> None:
    assert in_child(project, None, _connected) == handle.stats()["pid"]
    assert committed(project, "SELECT name FROM shop_customer") == [("connected",)]


# -- gunicorn beside a manage.py loop ------------------------------------------------

WORKLOAD_SECONDS = 5.0


def bank_is_consistent(project: Path, increments: int) -> None:
    """Money conserved, every balance equal to its ledger, the counter equal to ``increments``."""
    [(total, accounts)] = committed(project, "SELECT sum(balance), count(*) FROM shop_account")
    assert total == 1000 * accounts  # money conserved
    assert (
        committed(
            project,
            "SELECT a.id FROM shop_account a LEFT JOIN (SELECT account_id, sum(delta) AS d"
            " FROM shop_ledger GROUP BY account_id) l ON l.account_id = a.id"
            " WHERE a.balance != 1000 + coalesce(l.d, 0)",
        )
        == []
    )  # every balance equals its ledger
    assert committed(project, "SELECT n FROM shop_counter") == [(increments,)]


@pytest.mark.timeout(120)  # a 5-second workload, plus gunicorn's start and stop
def test_gunicorn_workers_beside_a_manage_py_loop(project: Path, handle: mpwriter.Writer) -> None:
    assert in_child(project, handle, prepare_bank) is True
    with gunicorn(project, handle) as port:
        got = workload(project, handle, port, WORKLOAD_SECONDS)
    print(got)
    assert got.web_errors == 0
    assert got.loop_errors == 0
    bank_is_consistent(project, got.web_increments + got.loop_increments)
    assert committed(project, "SELECT count(*) FROM shop_ledger") == [
        (2 * (got.web_transfers + got.loop_transfers),)
    ]
    # Not starved: the web workers get a fair share of the writer.
    web = got.web_transfers + got.web_increments
    loop = got.loop_transfers + got.loop_increments
    assert web >= 0.2 * loop, f"web requests starved: {web} against the loop's {loop}"


@pytest.mark.timeout(120)  # gunicorn's start, a worker's replacement and stop
def test_a_gunicorn_worker_killed_inside_atomic(project: Path, handle: mpwriter.Writer) -> None:
    assert in_child(project, handle, prepare_bank) is True
    fifo_path = project / "hold.fifo"
    os.mkfifo(fifo_path)
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        with gunicorn(project, handle) as port:
            assert [post(port, "/transfer") for _ in range(5)] == [200] * 5
            assert [post(port, "/increment") for _ in range(3)] == [200] * 3
            holder = threading.Thread(target=post, args=(port, "/hold"))
            holder.start()
            assert select.select([fifo], [], [], 30.0)[0], (
                "the /hold request never entered atomic()"
            )
            worker = int(os.read(fifo, 64).split()[0])
            os.kill(worker, signal.SIGKILL)
            holder.join(30.0)
            # The writer rolled the dead worker's transaction back; the others go on.
            assert [post(port, "/transfer") for _ in range(5)] == [200] * 5
            assert post(port, "/increment") == 200
    finally:
        os.close(fifo)
    bank_is_consistent(project, 4)  # without the held +1000
    assert committed(project, "SELECT count(*) FROM shop_ledger") == [(20,)]
    assert handle.stats()["sessions_expired"] >= 1


# -- the documented deployment: manage.py migrate, then gunicorn with the hooks ---------

GUNICORN_CONF = """
import os

import mpwriter.django
import mpwriter.gunicorn

on_starting, on_exit = mpwriter.gunicorn.writer_hooks(
    {db!r}, init=mpwriter.django.writer_init
)
workers = 2
bind = "127.0.0.1:{port}"
wsgi_app = "wsgi:application"
control_socket_disable = True


def when_ready(server):
    fifo = os.open({fifo!r}, os.O_WRONLY | os.O_NONBLOCK)
    os.write(fifo, b"ready")
    os.close(fifo)
"""

WSGI = """
import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dj_settings")

from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()
"""


def django_admin(project: Path, *args: str) -> str:
    """``python -m django ARGS`` in the project: a process tree of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "django", *args, "--settings=dj_settings"],
        cwd=project,
        env=project_env(project),
        capture_output=True,
        text=True,
        timeout=50.0,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def project_env(project: Path) -> dict[str, str]:
    path = [str(Path(mpwriter.__file__).parent.parent), str(project)]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


@pytest.mark.timeout(120)  # three Django commands, gunicorn's start and stop
def test_migrate_on_deploy_then_gunicorn_with_the_documented_hooks(tmp_path: Path) -> None:
    project = write_project(tmp_path)
    # Nothing serves the file: each command starts a writer, owns it, closes it.
    django_admin(project, "migrate", "--verbosity=0")
    django_admin(project, "shell", "-c", "from shop import bank; bank.open_bank()")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fifo = project / "ready.fifo"
    os.mkfifo(fifo)
    ready = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    conf = GUNICORN_CONF.format(db=str(project / "app.db"), port=port, fifo=str(fifo))
    (project / "gunicorn.conf.py").write_text(conf)
    (project / "wsgi.py").write_text(WSGI)
    master = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py"],
        cwd=project,
        env=project_env(project),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert select.select([ready], [], [], 50.0)[0], "gunicorn did not become ready"
        assert [post(port, "/transfer") for _ in range(10)] == [200] * 10
        assert [post(port, "/increment") for _ in range(5)] == [200] * 5
        # A command in another process tree (cron, a task worker) connects to
        # the writer the gunicorn master owns.
        django_admin(project, "shell", "-c", "from shop import bank; bank.increment()")
    finally:
        os.close(ready)
        master.terminate()
        try:
            _, errors = master.communicate(timeout=30.0)
        except subprocess.TimeoutExpired:
            master.kill()
            _, errors = master.communicate(timeout=10.0)
    assert master.returncode == 0, errors.decode()
    bank_is_consistent(project, 6)
    assert committed(project, "SELECT count(*) FROM shop_ledger") == [(20,)]
    # on_exit closed the writer: the file is free for the next deploy's migrate.
    django_admin(project, "migrate", "--verbosity=0")


def synchronous_of(conn: sqlite3.Connection) -> int:
    """In the writer (a `Writer.call` function): its durability setting."""
    return int(conn.execute("PRAGMA synchronous").fetchone()[0])


def _own_writer() -> object:
    from django.db import connection

    connection.ensure_connection()  # nothing serves the file: this process starts a writer
    name = connection.settings_dict["NAME"]
    synchronous = mpwriter.django.writer_for(name).call(synchronous_of)
    connection.close()
    # A multiprocessing child runs no atexit hooks (a main process does):
    # close the writer it owns explicitly.
    mpwriter.django.close_writer(name)
    return synchronous


def test_a_process_with_no_writer_starts_its_own_with_the_options_durability(
    tmp_path: Path,
) -> None:
    project = write_project(tmp_path, options={"synchronous": "FULL"})
    child, receive = start_child(project, None, _own_writer)
    assert answer(child, receive) == 2  # FULL
    assert child.exitcode == 0
    # It closed its writer: the file is free.
    mpwriter.start(project / "app.db", context="fork").close(timeout=10.0)
