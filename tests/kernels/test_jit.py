"""The numba settings every kernel shares (kenstream.kernels._jit)."""

import os
import subprocess
import sys


def _policy_after_import(env):
    code = "import os, kenstream.kernels; print(os.environ.get('OMP_WAIT_POLICY'))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_openmp_workers_sleep_between_kernels_unless_the_user_says_otherwise():
    """Idle OpenMP workers spinning would take the cores from compress's coding threads;
    the default asks them to sleep, and a policy the user set is left alone."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _policy_after_import(env) == "PASSIVE"
    assert _policy_after_import(dict(env, OMP_WAIT_POLICY="ACTIVE")) == "ACTIVE"
