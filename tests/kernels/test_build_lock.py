import os
import time

from tokenmill.kernels.cpu import STALE_LOCK_SECONDS, _clear_stale_lock


def test_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path):
    lock = tmp_path / "lock"
    lock.touch()
    _clear_stale_lock(tmp_path)
    assert lock.exists()  # a build may be running right now
    old = time.time() - STALE_LOCK_SECONDS - 5
    os.utime(lock, (old, old))
    _clear_stale_lock(tmp_path)
    assert not lock.exists()
    _clear_stale_lock(tmp_path)  # no lock at all: nothing to do
