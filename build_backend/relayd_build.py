"""relayd's build backend: setuptools', plus mypyc when ``RELAYD_MYPYC=1`` (setup.py).

The additions: the build requirement (mypyc comes with mypy, pinned here because the C it
generates is tied to its release); editable installs are never compiled (a stale extension module
would shadow the edited ``.py`` file): ``RELAYD_MYPYC`` is ignored for them, with a note; and a
wheel is built from fresh build directories, since setuptools packs whatever its ``build/lib``
holds: the extension modules of an earlier compiled build (a module since taken out of setup.py's
``HOT_MODULES``, or any of them in a pure build) would otherwise ship in the wheel and shadow
the ``.py`` files.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the backend's hooks, unchanged unless below)

MYPYC_REQUIRES = ["mypy==2.4.1"]


def _compiled() -> bool:
    return os.environ.get("RELAYD_MYPYC") == "1"


def get_requires_for_build_wheel(config_settings: Any = None) -> list[str]:
    if _compiled():
        # (not setuptools' own answer: it runs setup.py, which needs mypyc then; setuptools >= 77,
        # in [build-system] requires, needs nothing more to build a wheel)
        return list(MYPYC_REQUIRES)
    return _setuptools.get_requires_for_build_wheel(config_settings)


def _pure_for_editable(say: bool = False) -> None:
    if _compiled():
        del os.environ["RELAYD_MYPYC"]  # (each hook runs in a process of its own)
        if say:
            print("relayd: RELAYD_MYPYC=1 is ignored for an editable install (pure Python)", file=sys.stderr)


def get_requires_for_build_editable(config_settings: Any = None) -> list[str]:
    _pure_for_editable()
    return _setuptools.get_requires_for_build_editable(config_settings)


def prepare_metadata_for_build_editable(metadata_directory: str, config_settings: Any = None) -> str:
    _pure_for_editable()
    return _setuptools.prepare_metadata_for_build_editable(metadata_directory, config_settings)


def build_editable(wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None) -> str:
    _pure_for_editable(say=True)
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)


# What setuptools (build_py, build_ext, bdist_wheel) and mypyc (its C, in build/) leave in build/
# and take up again in the next build. build/compiled (scripts/test.sh's install target) stays.
_BUILD_LEFTOVERS = ("build/lib.*", "build/lib", "build/temp.*", "build/bdist.*", "build/__native*", "build/relayd")


def build_wheel(wheel_directory: str, config_settings: Any = None, metadata_directory: str | None = None) -> str:
    for leftover in (path for pattern in _BUILD_LEFTOVERS for path in glob.glob(pattern)):
        if os.path.isdir(leftover) and not os.path.islink(leftover):
            shutil.rmtree(leftover)
        else:
            os.remove(leftover)
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)
