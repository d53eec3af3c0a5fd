# Sourced by scripts/serve.sh and scripts/test.sh:
#
#   use_venv CHECKOUT EXTRAS      # then "$VENV_PYTHON" is the environment's interpreter
#
# Runs what follows in a virtual environment with the checkout installed (editable, with the
# given extras, e.g. "dev"): the active one if python3 already runs in one, else CHECKOUT/.venv,
# made on first use. A system Python (Debian/Ubuntu: PEP 668 "externally-managed-environment")
# refuses `pip install` outside a virtual environment, so the README's commands make their own.
#
# ./.venv sees the interpreter's own site-packages (--system-site-packages): what is installed
# there already (a CI image's packages) is not downloaded again, and pip installs the rest, or
# newer versions, into .venv. Without Debian's python3-venv (no ensurepip), .venv is made without
# pip and uses the system's pip (python3-pip), which installs into .venv when run from there.
# The install is skipped when pyproject.toml and the extras are those of the last one.

use_venv() {
    local root=$1 extras=$2 me=${0##*/} python stamp want
    if python3 -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)' 2>/dev/null; then
        python=$(command -v python3)  # already in a virtual environment: use it
    else
        if [[ ! -x $root/.venv/bin/python ]]; then
            python=$(_base_python "$me")
            echo "$me: making a virtual environment in $root/.venv ($("$python" --version))" >&2
            if ! "$python" -m venv --system-site-packages "$root/.venv" >/dev/null 2>&1; then
                rm -rf "$root/.venv"  # no ensurepip (Debian without python3-venv): pip comes from the system
                "$python" -m venv --system-site-packages --without-pip "$root/.venv"
            fi
        fi
        python=$root/.venv/bin/python
        export VIRTUAL_ENV=$root/.venv PATH=$root/.venv/bin:$PATH
        unset PYTHONHOME
    fi
    if ! "$python" -m pip --version >/dev/null 2>&1; then
        echo "$me: no pip for $python: install it (Debian/Ubuntu: apt-get install python3-pip python3-venv)" >&2
        exit 1
    fi
    stamp="$("$python" -c 'import sys; print(sys.prefix)')/.relayd-install${extras:+-$extras}"
    want="$root [$extras] $(cksum <"$root/pyproject.toml")"
    if [[ ! -f $stamp || $(<"$stamp") != "$want" ]]; then
        echo "$me: installing relayd${extras:+[$extras]} from this checkout" >&2
        "$python" -m pip install -q --disable-pip-version-check -e "$root${extras:+[$extras]}"
        echo "$want" >"$stamp"
    fi
    VENV_PYTHON=$python
}

# The first python3.N (N >= 11) found: python3 itself, else a versioned one.
_base_python() {
    local candidate
    for candidate in python3 python3.13 python3.12 python3.11; do
        if command -v "$candidate" >/dev/null &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return
        fi
    done
    echo "$1: relayd needs Python 3.11 or newer; none found as python3, python3.13, python3.12 or python3.11" >&2
    exit 1
}
