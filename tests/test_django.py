"""mpwriter.django: a minimal Django project through the writer, in forked processes.

Each test writes a project (settings module, one app, its migrations) into
tmp_path, starts a writer with `mpwriter.django.writer_init` in this process,
and runs Django in children forked from here: they inherit the handle and
attach it, as gunicorn's workers do. Django itself is configured only in the
children, never in the pytest process.
"""

from __future__ import annotations

import contextlib
import http.client
import multiprocessing
import os
import random
import select
import signal
import socket
import sqlite3
import sys
import textwrap
import threading
import time
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
ALLOWED_HOSTS = ["*"]
MIDDLEWARE = []
ROOT_URLCONF = "shop.urls"
HOLD_FIFO = {fifo!r}
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


class Ledger(models.Model):
    account = models.ForeignKey(Account, models.CASCADE)
    delta = models.IntegerField()


class Counter(models.Model):
    n = models.IntegerField(default=0)
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


BANK = """
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [("shop", "0002_rebuild")]
    operations = [
        migrations.CreateModel(
            name="Ledger",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("account", models.ForeignKey(on_delete=models.CASCADE, to="shop.account")),
                ("delta", models.IntegerField()),
            ],
        ),
        migrations.CreateModel(
            name="Counter",
            fields=[
                ("id", models.AutoField(primary_key=True, serialize=False)),
                ("n", models.IntegerField(default=0)),
            ],
        ),
    ]
"""

# The bank: a transfer moves money between two accounts and writes both
# ledger lines in one atomic() block; an increment bumps the counter with F().
BANK_CODE = """
import random

from django.db import transaction
from django.db.models import F

from shop.models import Account, Counter, Ledger

ACCOUNTS = 10
OPENING = 1000


def open_bank():
    from shop.models import Customer

    customer = Customer.objects.create(name="bank")
    Account.objects.bulk_create(
        Account(customer=customer, balance=OPENING) for _ in range(ACCOUNTS)
    )
    Counter.objects.create()


def transfer(rng):
    ids = list(Account.objects.values_list("pk", flat=True))
    source, target = rng.sample(ids, 2)
    amount = rng.randint(1, 50)
    with transaction.atomic():
        Account.objects.select_for_update().get(pk=source)
        Account.objects.filter(pk=source).update(balance=F("balance") - amount)
        Account.objects.filter(pk=target).update(balance=F("balance") + amount)
        Ledger.objects.bulk_create(
            [Ledger(account_id=source, delta=-amount), Ledger(account_id=target, delta=amount)]
        )


def increment():
    Counter.objects.filter(pk=1).update(n=F("n") + 1)
"""

VIEWS = """
import random

from django.http import HttpResponse
from django.urls import path

from shop import bank

_rng = random.Random()


def transfer(request):
    bank.transfer(_rng)
    return HttpResponse("ok")


def increment(request):
    bank.increment()
    return HttpResponse("ok")


def hold(request):
    # Inside atomic(): a write, then this worker's pid to the test, which
    # SIGKILLs it. Never answers (bounded, should the test be gone).
    import os
    import select

    from django.conf import settings
    from django.db import transaction
    from django.db.models import F

    from shop.models import Account

    with transaction.atomic():
        Account.objects.filter(pk=1).update(balance=F("balance") + 1000)
        fifo = os.open(settings.HOLD_FIFO, os.O_WRONLY | os.O_NONBLOCK)
        os.write(fifo, f"{os.getpid()}\\n".encode())
        os.close(fifo)
        select.select([], [], [], 60.0)
    return HttpResponse("not killed")


urlpatterns = [
    path("transfer", transfer),
    path("increment", increment),
    path("hold", hold),
]
"""

# The management command a separate process runs: transfers and increments
# in a loop for the given seconds; prints "transfers increments errors".
LOOP_COMMAND = """
import random
import time

from django.core.management.base import BaseCommand

from shop import bank


class Command(BaseCommand):
    def add_arguments(self, parser):
        parser.add_argument("seconds", type=float)

    def handle(self, *args, seconds, **options):
        rng = random.Random()
        transfers = increments = errors = 0
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            try:
                bank.transfer(rng)
                transfers += 1
                bank.increment()
                increments += 1
            except Exception as exc:
                errors += 1
                self.stderr.write(repr(exc))
        self.stdout.write(f"{transfers} {increments} {errors}")
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
    (app / "migrations" / "0003_bank.py").write_text(BANK)
    (app / "bank.py").write_text(BANK_CODE)
    (app / "urls.py").write_text(VIEWS)
    commands = app / "management" / "commands"
    commands.mkdir(parents=True)
    (app / "management" / "__init__.py").write_text("")
    (commands / "__init__.py").write_text("")
    (commands / "transfer_loop.py").write_text(LOOP_COMMAND)
    settings = SETTINGS.format(db=str(tmp_path / "app.db"), fifo=str(tmp_path / "hold.fifo"))
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


# -- gunicorn beside a manage.py loop ------------------------------------------------

WORKLOAD_SECONDS = 5.0


def _gunicorn_master(project: Path, writer: mpwriter.Writer, port: int, ready: int) -> None:
    """A gunicorn master (4 sync workers) serving the project, with the inherited handle."""
    _django(project, writer)
    from django.core.wsgi import get_wsgi_application
    from gunicorn.app.base import BaseApplication

    application = get_wsgi_application()

    def when_ready(server: Any) -> None:
        os.write(ready, b"ready")

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in {
                "bind": f"127.0.0.1:{port}",
                "workers": 4,
                "worker_class": "sync",
                "when_ready": when_ready,
                "control_socket_disable": True,
                "loglevel": "warning",
            }.items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            return application

    Server().run()


def _loop(seconds: float) -> object:
    import io

    from django.core.management import call_command

    out = io.StringIO()
    call_command("transfer_loop", seconds, stdout=out)
    return tuple(int(word) for word in out.getvalue().split())


def _web_client(port: int, until: float, tally: dict[str, int], lock: threading.Lock) -> None:
    rng = random.Random()
    while time.monotonic() < until:
        path = "/transfer" if rng.random() < 0.5 else "/increment"
        status = post(port, path)
        with lock:
            key = f"{path} {status}" if status == 200 else "error"
            tally[key] = tally.get(key, 0) + 1


def _prepare_bank() -> object:
    migrate("0003")
    from shop import bank

    bank.open_bank()
    return True


@contextlib.contextmanager
def gunicorn(project: Path, handle: mpwriter.Writer) -> Iterator[int]:
    """A gunicorn master forked from here, ready; yields its port; stopped after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    ready_r, ready_w = os.pipe()
    master = FORK.Process(target=_gunicorn_master, args=(project, handle, port, ready_w))
    master.start()
    os.close(ready_w)
    try:
        assert select.select([ready_r], [], [], 50.0)[0], "gunicorn did not become ready"
        yield port
    finally:
        os.close(ready_r)
        if master.pid is not None and master.is_alive():
            os.kill(master.pid, signal.SIGTERM)
        reap(master)


def post(port: int, path: str) -> int:
    """POST ``path``; the HTTP status, 0 if the connection failed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10.0)
    try:
        conn.request("POST", path)
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


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
    assert in_child(project, handle, _prepare_bank) is True
    tally: dict[str, int] = {}
    lock = threading.Lock()
    with gunicorn(project, handle) as port:
        receive, send = FORK.Pipe(duplex=False)
        loop = FORK.Process(
            target=_child, args=(project, handle, send, lambda: _loop(WORKLOAD_SECONDS))
        )
        until = time.monotonic() + WORKLOAD_SECONDS
        loop.start()
        send.close()
        try:
            clients = [
                threading.Thread(target=_web_client, args=(port, until, tally, lock))
                for _ in range(8)
            ]
            for client in clients:
                client.start()
            for client in clients:
                client.join(30.0)
            assert receive.poll(30.0), "the manage.py loop did not answer in time"
            status, value = receive.recv()
            assert status == "ok", value
            loop_transfers, loop_increments, loop_errors = value
        finally:
            receive.close()
            reap(loop)
    web_transfers = tally.get("/transfer 200", 0)
    web_increments = tally.get("/increment 200", 0)
    print(
        f"web: {web_transfers} transfers, {web_increments} increments;"
        f" loop: {loop_transfers} transfers, {loop_increments} increments"
    )
    assert tally.get("error", 0) == 0
    assert loop_errors == 0
    bank_is_consistent(project, web_increments + loop_increments)
    assert committed(project, "SELECT count(*) FROM shop_ledger") == [
        (2 * (web_transfers + loop_transfers),)
    ]
    # Not starved: the web workers get a fair share of the writer.
    web = web_transfers + web_increments
    loop = loop_transfers + loop_increments
    assert web >= 0.2 * loop, f"web requests starved: {web} against the loop's {loop}"


@pytest.mark.timeout(120)  # gunicorn's start, a worker's replacement and stop
def test_a_gunicorn_worker_killed_inside_atomic(project: Path, handle: mpwriter.Writer) -> None:
    assert in_child(project, handle, _prepare_bank) is True
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
