#!/bin/sh
# one process per section (see comment in bench.py)
cd "$(dirname "$0")"
for s in celexpr celpy-interp celpy-compiled mem-celexpr mem-celpy; do
  venv/bin/python bench.py $s ${1:-10000} 2>&1 | grep -v '^WARNING: All log\|^E0000'
done
