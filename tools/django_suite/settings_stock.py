"""Django's test settings for the stock SQLite backend, on files (the baseline run)."""

import os

_dir = os.environ["DJANGO_SUITE_DIR"]

DATABASES = {
    alias: {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.join(_dir, f"{alias}.db"),
        "TEST": {"NAME": os.path.join(_dir, f"test_{alias}.db")},
    }
    for alias in ("default", "other")
}

SECRET_KEY = "django_tests_secret_key"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = False
