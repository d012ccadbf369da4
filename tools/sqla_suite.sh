#!/usr/bin/env bash
# SQLAlchemy's dialect compliance suite against sqlite+mpwriter, then against
# the stock pysqlite dialect the same way (same requirements, same options) as
# the baseline. Not part of the test command: run it by hand, it takes minutes.
#
#   tools/sqla_suite.sh [extra pytest args]      (PYTHON=... to pick the interpreter)
#
# Prints each run's summary line; the full reports go to $OUT (default: a temp dir).
set -u
here=$(cd "$(dirname "$0")/sqla_suite" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-/work/venv/bin/python}
out=${OUT:-$(mktemp -d)}
status=0
for dialect in mpwriter pysqlite; do
    work=$(mktemp -d)
    # A relative file, in the work dir: SQLite's provisioning renames it
    # <name>_<driver>.db (suite_mpwriter.db, suite_pysqlite.db).
    if [ "$dialect" = mpwriter ]; then
        url="sqlite+mpwriter:///suite.db"
        export MPWRITER_SUITE_DB="$work/suite_mpwriter.db"
    else
        url="sqlite:///suite.db"
        unset MPWRITER_SUITE_DB
    fi
    # cwd: the work dir (SQLite's provisioning writes its files there).
    (cd "$work" && PYTHONPATH="$repo:$here" timeout 3000 "$python" -m pytest \
        -c "$here/setup.cfg" --rootdir "$here" --dburi "$url" -q -rfE "$here/test" "$@" \
        > "$out/$dialect.txt" 2>&1) || status=1
    echo "$dialect: $(tail -n 1 "$out/$dialect.txt")"
    rm -rf "$work"
done
echo "reports: $out"
exit $status
