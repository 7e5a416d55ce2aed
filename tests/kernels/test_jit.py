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


_CHURN = """
import resource, numpy as np, kenstream.kernels as k
def step():  # a frame's pattern: two arrays of about 2 MB, the larger freed first
    out = np.empty(1 << 20, np.uint16); out[::2048] = 1
    scratch = np.empty((1 << 18) + 1, np.uint64); scratch[::512] = 1
    del scratch
    return out
k.keep_freed_memory()
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 20)
"""


def _faults_a_step(env):
    out = subprocess.run([sys.executable, "-c", _CHURN], env=env, capture_output=True, text=True,
                         check=True)
    return int(out.stdout.strip())


def test_freed_frame_arrays_are_reused_not_faulted_in_again():
    """After kernels.keep_freed_memory (which every process that writes a shard calls) a
    thread's freed arrays are reused: without the allocator settings (KENSTREAM_MALLOC=0),
    this glibc faults the arrays' pages in afresh at every step."""
    env = {k: v for k, v in os.environ.items() if k != "KENSTREAM_MALLOC"}
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (AttributeError, ValueError, OSError):
        glibc = ""
    if not glibc.startswith("glibc"):  # another C library: nothing to set
        from kenstream.kernels import keep_freed_memory
        assert keep_freed_memory() is False
        return
    assert _faults_a_step(env) < 50
    assert _faults_a_step(dict(env, KENSTREAM_MALLOC="0")) > 500
