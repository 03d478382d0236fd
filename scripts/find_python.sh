#!/usr/bin/env bash
# Print the path of a Python >= 3.12 interpreter: first on PATH, then under `pyenv root`.
# Exits non-zero with a message saying what to install when none is found.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
# 3.12 first: it is the version the DOLFINx wheel stack is verified on.
for name in "${PYTHON:-}" python3.12 python3 python3.13 python; do
    [ -n "$name" ] || continue
    path=$(command -v "$name" 2>/dev/null) || continue
    if ok "$path"; then echo "$path"; exit 0; fi
done
roots=""
command -v pyenv >/dev/null 2>&1 && roots=$(pyenv root)
roots="$roots ${PYENV_ROOT:-} $HOME/.pyenv"
for root in $roots; do
    [ -d "$root/versions" ] || continue
    for path in $(ls -d "$root"/versions/3.12*/bin/python3 "$root"/versions/3.1[3-9]*/bin/python3 2>/dev/null); do
        if ok "$path"; then echo "$path"; exit 0; fi
    done
done
cat >&2 <<'MSG'
error: dolfinx_mno needs Python >= 3.12, and none was found on PATH or under `pyenv root`.
Install one, for example:
    pyenv install 3.12        (then re-run make)
    apt-get install python3.12 python3.12-venv
or point the set-up at an interpreter: make PYTHON=/path/to/python3.12 test
MSG
exit 1
