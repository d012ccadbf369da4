"""Django's test settings for mpwriter.django: the baseline's, with the engine swapped.

A test class runs inside one transaction (Django's TestCase), so the
writer's bounds on a transaction are raised well past the defaults.
"""

from settings_stock import *  # noqa: F403

for _database in DATABASES.values():  # noqa: F405
    _database["ENGINE"] = "mpwriter.django"
    _database["OPTIONS"] = {"idle_limit": 120.0, "total_limit": 3600.0}
