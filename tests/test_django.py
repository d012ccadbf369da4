"""mpwriter.django: a minimal Django project through the writer, in forked processes.

Each test writes a project (settings module, one app, its migrations) into
tmp_path, starts a writer with `mpwriter.django.writer_init` in this process,
and runs Django in children forked from here: they inherit the handle and
attach it, as gunicorn's workers do. Django itself is configured only in the
children, never in the pytest process.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import sys
import textwrap
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

import mpwriter

pytest.importorskip("django")

import mpwriter.django

FORK = multiprocessing.get_context("fork")

SETTINGS = """
DATABASES = {{"default": {{"ENGINE": "mpwriter.django", "NAME": {db!r}}}}}
INSTALLED_APPS = ["shop"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
SECRET_KEY = "test"
"""

MODELS = """
from django.db import models


class Customer(models.Model):
    name = models.CharField(max_length=20)


class Account(models.Model):
    customer = models.ForeignKey(Customer, models.CASCADE)
    balance = models.IntegerField(default=0)
    label = models.CharField(max_length=40, default="")
    touched = models.DateTimeField(null=True)
    year = models.IntegerField(default=0)
"""

INITIAL = """
from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True
    dependencies = []
    operations = [
        migrations.CreateModel(
            name="Customer",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("name", models.CharField(max_length=10)),
            ],
        ),
        migrations.CreateModel(
            name="Account",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("customer", models.ForeignKey(on_delete=models.CASCADE, to="shop.customer")),
                ("balance", models.IntegerField(default=0)),
                ("label", models.CharField(max_length=40, default="")),
                ("touched", models.DateTimeField(null=True)),
                ("year", models.IntegerField(default=0)),
            ],
        ),
    ]
"""

# SQLite has no ALTER COLUMN: Django rebuilds the table (new table, copy,
# drop, rename) with foreign key enforcement off, here the parent table of
# rows that reference it.
REBUILD = """
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0001_initial")]
    operations = [
        migrations.AlterField("customer", "name", models.CharField(max_length=20)),
    ]
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """The project's directory (on sys.path in the children)."""
    app = tmp_path / "shop"
    (app / "migrations").mkdir(parents=True)
    (app / "__init__.py").write_text("")
    (app / "models.py").write_text(MODELS)
    (app / "migrations" / "__init__.py").write_text("")
    (app / "migrations" / "0001_initial.py").write_text(INITIAL)
    (app / "migrations" / "0002_rebuild.py").write_text(REBUILD)
    settings = SETTINGS.format(db=str(tmp_path / "app.db"))
    (tmp_path / "dj_settings.py").write_text(textwrap.dedent(settings))
    return tmp_path


@pytest.fixture
def handle(project: Path) -> Iterator[mpwriter.Writer]:
    writer = mpwriter.start(
        project / "app.db", init=mpwriter.django.writer_init, timeout=10.0, context="fork"
    )
    try:
        yield writer
    finally:
        writer.close(timeout=10.0)


def _django(project: Path, writer: mpwriter.Writer) -> None:
    """In a forked child: attach the inherited handle, then set Django up."""
    mpwriter.attach(writer)
    sys.path.insert(0, str(project))
    os.environ["DJANGO_SETTINGS_MODULE"] = "dj_settings"
    import django

    django.setup()


def _child(
    project: Path, writer: mpwriter.Writer, out: Connection, body: Callable[[], object]
) -> None:
    try:
        _django(project, writer)
        out.send(("ok", body()))
    except BaseException as exc:
        out.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


def in_child(project: Path, writer: mpwriter.Writer, body: Callable[[], object]) -> Any:
    """Run ``body`` in a forked child set up for Django; return its result."""
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_child, args=(project, writer, send, body))
    child.start()
    send.close()
    try:
        if not receive.poll(50.0):
            raise AssertionError("the Django child did not answer in time")
        status, value = receive.recv()
    finally:
        receive.close()
        reap(child)
    assert status == "ok", value
    return value


def reap(child: Any) -> None:
    child.join(10.0)
    if child.is_alive():
        child.kill()
        child.join(10.0)


def migrate(target: str = "0002") -> None:
    from django.core.management import call_command

    call_command("migrate", "shop", target, verbosity=0)


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
    receivers = []
    children = []
    for _ in range(4):
        receive, send = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_child, args=(project, handle, send, lambda: _increments(50)))
        child.start()
        send.close()
        receivers.append(receive)
        children.append(child)
    acknowledged = 0
    try:
        for receive in receivers:
            assert receive.poll(50.0), "an incrementing child did not answer in time"
            status, value = receive.recv()
            assert status == "ok", value
            acknowledged += value
    finally:
        for child in children:
            reap(child)
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
    receive, send = FORK.Pipe(duplex=False)
    victim = FORK.Process(
        target=_child, args=(project, handle, send, lambda: _hold_inside_atomic(child_end))
    )
    victim.start()
    send.close()
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


def _without_the_handle(project: Path, out: Connection) -> None:
    sys.path.insert(0, str(project))
    os.environ["DJANGO_SETTINGS_MODULE"] = "dj_settings"
    import django
    from django.core.exceptions import ImproperlyConfigured
    from django.db import connection

    django.setup()
    try:
        connection.ensure_connection()
    except ImproperlyConfigured as exc:
        out.send(str(exc))
    else:
        out.send("connected")


def test_a_process_without_the_handle_is_told_another_process_runs_the_writer(
    project: Path, handle: mpwriter.Writer
) -> None:
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_without_the_handle, args=(project, send))
    child.start()
    send.close()
    try:
        assert receive.poll(50.0), "the child did not answer in time"
        message = receive.recv()
    finally:
        receive.close()
        reap(child)
    assert "another process runs the writer" in message
