"""A small Django project (a bank) for tests/test_django.py (and tools/bench_django.py).

`write_project` writes it into a directory: a settings module
(``dj_settings``), the app ``shop`` (customers, accounts, a ledger, a
counter), its migrations (the second rebuilds a referenced table), views
(``/transfer``, ``/increment``, ``/hold``) and a management command
(``transfer_loop``). The rest runs it: Django set up in a forked child that
attaches an inherited writer handle, a gunicorn master forked from here, and
the workload of gunicorn's web requests beside a ``manage.py`` loop.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import multiprocessing
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple

import mpwriter

FORK = multiprocessing.get_context("fork")

SETTINGS = """
DATABASES = {{"default": {{"ENGINE": {engine!r}, "NAME": {db!r}, "OPTIONS": {options!r}}}}}
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
        worst = 0.0
        stop = time.monotonic() + seconds
        while time.monotonic() < stop:
            started = time.monotonic()
            try:
                bank.transfer(rng)
                transfers += 1
                bank.increment()
                increments += 1
            except Exception as exc:
                errors += 1
                self.stderr.write(repr(exc))
            worst = max(worst, time.monotonic() - started)
        self.stdout.write(f"{transfers} {increments} {errors} {worst}")
"""


def write_project(
    directory: Path, engine: str = "mpwriter.django", options: dict[str, Any] | None = None
) -> Path:
    """Write the project into ``directory`` (its database: ``app.db`` there)."""
    app = directory / "shop"
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
    settings = SETTINGS.format(
        engine=engine,
        db=str(directory / "app.db"),
        options=options or {},
        fifo=str(directory / "hold.fifo"),
    )
    (directory / "dj_settings.py").write_text(settings)
    return directory


def setup_django(project: Path, writer: mpwriter.Writer | None) -> None:
    """In a forked child: attach the inherited handle (if any), then set Django up."""
    if writer is not None:
        mpwriter.attach(writer)
    sys.path.insert(0, str(project))
    os.environ["DJANGO_SETTINGS_MODULE"] = "dj_settings"
    import django

    django.setup()


def _child(
    project: Path, writer: mpwriter.Writer | None, out: Connection, body: Callable[[], object]
) -> None:
    try:
        setup_django(project, writer)
        out.send(("ok", body()))
    except BaseException as exc:
        out.send(("error", f"{type(exc).__name__}: {exc}"))
        raise


def start_child(
    project: Path, writer: mpwriter.Writer | None, body: Callable[[], object]
) -> tuple[Any, Connection]:
    """A forked child set up for Django running ``body``; its answer comes on the pipe."""
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_child, args=(project, writer, send, body))
    child.start()
    send.close()
    return child, receive


def answer(child: Any, receive: Connection, timeout: float = 50.0) -> Any:
    """What ``body`` returned in ``child`` (AssertionError if it raised); reaps it."""
    try:
        if not receive.poll(timeout):
            raise AssertionError("the Django child did not answer in time")
        status, value = receive.recv()
    finally:
        receive.close()
        reap(child)
    assert status == "ok", value
    return value


def in_child(project: Path, writer: mpwriter.Writer | None, body: Callable[[], object]) -> Any:
    """Run ``body`` in a forked child set up for Django; return its result."""
    return answer(*start_child(project, writer, body))


def reap(child: Any) -> None:
    child.join(10.0)
    if child.is_alive():
        child.kill()
        child.join(10.0)


def migrate(target: str = "0002") -> None:
    from django.core.management import call_command

    call_command("migrate", "shop", target, verbosity=0)


def prepare_bank() -> object:
    migrate("0003")
    from shop import bank

    bank.open_bank()
    return True


# -- gunicorn beside a manage.py loop --------------------------------------------------


def _gunicorn_master(project: Path, writer: mpwriter.Writer | None, port: int, ready: int) -> None:
    """A gunicorn master (4 sync workers) serving the project, with the inherited handle."""
    setup_django(project, writer)
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


@contextlib.contextmanager
def gunicorn(project: Path, handle: mpwriter.Writer | None) -> Iterator[int]:
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


class Workload(NamedTuple):
    """What both sides got done in the workload's seconds."""

    seconds: float
    web_transfers: int
    web_increments: int
    web_errors: int
    web_worst: float  # the slowest answered web request, in seconds
    loop_transfers: int
    loop_increments: int
    loop_errors: int
    loop_worst: float  # the slowest transfer + increment of the loop


def _loop(seconds: float) -> object:
    from django.core.management import call_command

    out = io.StringIO()
    call_command("transfer_loop", seconds, stdout=out)
    transfers, increments, errors, worst = out.getvalue().split()
    return int(transfers), int(increments), int(errors), float(worst)


def _web_client(port: int, until: float, tally: dict[str, float], lock: threading.Lock) -> None:
    rng = random.Random()
    while time.monotonic() < until:
        path = "/transfer" if rng.random() < 0.5 else "/increment"
        started = time.monotonic()
        status = post(port, path)
        took = time.monotonic() - started
        with lock:
            key = f"{path} {status}" if status == 200 else "error"
            tally[key] = tally.get(key, 0) + 1
            tally["worst"] = max(tally.get("worst", 0.0), took)


def workload(
    project: Path, handle: mpwriter.Writer | None, port: int, seconds: float, clients: int = 8
) -> Workload:
    """``clients`` threads posting transfers and increments to gunicorn on ``port``,
    beside a ``manage.py transfer_loop`` process, for ``seconds``."""
    tally: dict[str, float] = {}
    lock = threading.Lock()
    until = time.monotonic() + seconds
    loop, receive = start_child(project, handle, lambda: _loop(seconds))
    threads = [
        threading.Thread(target=_web_client, args=(port, until, tally, lock))
        for _ in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 30.0)
    transfers, increments, errors, worst = answer(loop, receive, timeout=30.0)
    return Workload(
        seconds,
        int(tally.get("/transfer 200", 0)),
        int(tally.get("/increment 200", 0)),
        int(tally.get("error", 0)),
        tally.get("worst", 0.0),
        transfers,
        increments,
        errors,
        worst,
    )
