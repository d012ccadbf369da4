#!/usr/bin/env bash
# Django's own test suite (tests/runtests.py of its source distribution)
# against mpwriter.django, then against the stock SQLite backend the same way
# (file databases, same apps, same options) as the baseline. Not part of the
# test command: run it by hand, it takes a long while.
#
#   tools/django_suite.sh [stock|mpwriter ...]   (default: both)
#
# DJANGO_SRC: the unpacked source distribution (default
# /work/django-src/django-5.2.19); PYTHON picks the interpreter; PARALLEL the
# runner's processes (default 1); OUT where the full reports go (default: a
# temp dir). Prints each run's summary.
set -u
here=$(cd "$(dirname "$0")/django_suite" && pwd)
repo=$(cd "$here/../.." && pwd)
python=${PYTHON:-/work/venv/bin/python}
src=${DJANGO_SRC:-/work/django-src/django-5.2.19}
out=${OUT:-$(mktemp -d)}
apps="backends basic transactions transaction_hooks model_fields expressions db_functions
bulk_create update delete queries migrations schema select_for_update get_or_create"
runs=${*:-mpwriter stock}
status=0
for backend in $runs; do
    work=$(mktemp -d)
    # shellcheck disable=SC2086  # $apps is a list of words
    (cd "$src/tests" && DJANGO_SUITE_DIR="$work" PYTHONPATH="$repo:$here" \
        timeout 7200 "$python" -W ignore runtests.py --settings="settings_$backend" \
        --parallel "${PARALLEL:-1}" -v 2 $apps > "$out/$backend.txt" 2>&1) || status=1
    echo "$backend: $(grep -E '^(Ran |OK|FAILED)' "$out/$backend.txt" | tr '\n' ' ')"
    rm -rf "$work"
done
echo "reports: $out"
exit $status
