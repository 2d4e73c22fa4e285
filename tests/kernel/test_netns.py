"""bpfilter.netns against real namespaces: entering, leaving, errors, interface lookup."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from bpfilter import netns, testbed


@pytest.fixture
def pair() -> Iterator[testbed.NetnsPair]:
    with testbed.netns_pair() as p:
        yield p


def _mnt() -> int:
    return os.stat("/proc/thread-self/ns/mnt").st_ino


def test_entered_switches_thread_and_always_comes_back(pair):
    home = netns.inode()
    with netns.entered(pair.a):
        assert netns.inode() == netns.inode(pair.a) != home
        assert netns.current_name() == pair.a
    assert netns.inode() == home
    with pytest.raises(RuntimeError, match="boom"), netns.entered(pair.b):
        assert netns.inode() == netns.inode(pair.b)
        raise RuntimeError("boom")
    assert netns.inode() == home


def test_entered_moves_only_the_calling_thread_and_not_its_mounts(pair):
    home, mounts = netns.inode(), _mnt()
    seen: list[int] = []
    go = threading.Event()

    def other_thread() -> None:
        go.wait(5)
        seen.append(netns.inode())

    # Started before entering: a thread created inside would inherit the namespace.
    t = threading.Thread(target=other_thread)
    t.start()
    with netns.entered(pair.a):
        go.set()
        t.join()
        # Pins made here land in the caller's bpffs: the mount namespace did not change.
        assert _mnt() == mounts
    assert seen == [home]


def test_entered_none_stays_put():
    home = netns.inode()
    with netns.entered(None):
        assert netns.inode() == home


def test_missing_namespace_is_a_clear_error():
    home = netns.inode()
    missing = testbed.unique_name("bpft-missing")
    expected = rf"{missing}.*does not exist.*ip netns add"
    with pytest.raises(netns.NetnsError, match=expected), netns.entered(missing):
        pytest.fail("body must not run")
    assert netns.inode() == home
    assert not netns.exists(missing)
    with pytest.raises(netns.NetnsError, match="does not exist"):
        netns.ifindex("lo", missing)


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "x\0y"])
def test_invalid_names_are_refused(bad):
    with pytest.raises(netns.NetnsError, match="invalid"):
        netns.path(bad)


def test_ifindex_inside_namespace(pair):
    assert netns.ifindex(pair.if_a, pair.a) == pair.ifindex_a
    assert netns.ifindex(pair.if_b, pair.b) == pair.ifindex_b
    assert netns.ifindex("lo", pair.a) == 1
    with pytest.raises(netns.NetnsError, match=rf"no interface 'veth-b' in .*{pair.a}"):
        netns.ifindex(pair.if_b, pair.a)


def test_names_and_exists(pair):
    assert {pair.a, pair.b} <= set(netns.names())
    assert netns.exists(pair.a)
    assert netns.current_name() is None or netns.current_name() not in (pair.a, pair.b)
