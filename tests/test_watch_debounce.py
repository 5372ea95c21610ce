"""The debouncer's rules, with an injected clock and file sizes: no threads, no sleeps."""

from __future__ import annotations

import pytest

from lorad.watching.debounce import Debouncer, Settled
from lorad.watching.file_rules import FileStat, is_image_path


class FakeFiles:
    """A clock and a folder of (size, mtime) the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0
        self.files: dict[str, FileStat] = {}

    def clock(self) -> float:
        return self.now

    def stat(self, path: str) -> FileStat | None:
        return self.files.get(path)

    def write(self, path: str, size: int) -> None:
        self.files[path] = (size, int(self.now * 1e9))


@pytest.fixture
def fs() -> FakeFiles:
    return FakeFiles()


def debouncer(fs: FakeFiles, quiet: float = 10.0) -> Debouncer:
    return Debouncer(quiet, clock=fs.clock, stat=fs.stat)


def test_nothing_happens_without_events(fs: FakeFiles) -> None:
    d = debouncer(fs)
    assert not d.busy and d.deadline() is None and d.poll() is None


def test_settles_only_after_the_quiet_period_since_the_last_event(fs: FakeFiles) -> None:
    d = debouncer(fs)
    fs.write("/w/a.png", 10)
    d.closed("/w/a.png")
    fs.now += 6
    fs.write("/w/b.png", 10)
    d.closed("/w/b.png")  # restarts the quiet period
    fs.now += 9.9
    assert d.poll() is None and d.busy
    assert d.deadline() == pytest.approx(fs.now + 0.1)
    fs.now += 0.1
    assert d.poll() == Settled(changed=("/w/a.png", "/w/b.png"), removed=())
    assert not d.busy and d.poll() is None  # reported once


def test_a_file_still_growing_without_events_is_not_complete(fs: FakeFiles) -> None:
    # A polling observer or a network drive: no close event, and writes may come without events.
    d = debouncer(fs, quiet=2)
    fs.write("/w/a.png", 100)
    d.changed("/w/a.png")
    fs.now += 1
    fs.write("/w/a.png", 200)  # grew, but no event reached us
    fs.now += 1.5
    assert d.poll() is None  # quiet, but size and mtime moved since the last look
    assert d.deadline() == pytest.approx(fs.now + 2)
    fs.now += 1
    assert d.poll() is None  # stable for only 1 s of the 2 s needed
    fs.now += 1
    assert d.poll() == Settled(changed=("/w/a.png",), removed=())


def test_without_a_close_event_stable_size_over_the_quiet_period_counts(fs: FakeFiles) -> None:
    d = debouncer(fs, quiet=2)
    fs.write("/w/a.png", 100)
    d.changed("/w/a.png")
    fs.now += 2
    assert d.poll() == Settled(changed=("/w/a.png",), removed=())


def test_modified_after_close_needs_a_new_close_or_stability(fs: FakeFiles) -> None:
    d = debouncer(fs, quiet=2)
    fs.write("/w/a.png", 100)
    d.closed("/w/a.png")
    fs.now += 1
    fs.write("/w/a.png", 150)
    d.changed("/w/a.png")  # reopened and written: the earlier close no longer vouches for it
    fs.now += 2
    assert d.poll() == Settled(changed=("/w/a.png",), removed=())  # 2 s without change or event


def test_closed_file_changed_behind_our_back_waits(fs: FakeFiles) -> None:
    d = debouncer(fs, quiet=2)
    fs.write("/w/a.png", 100)
    d.closed("/w/a.png")
    fs.now += 2
    fs.write("/w/a.png", 120)  # no event (e.g. a network drive)
    assert d.poll() is None
    fs.now += 2
    assert d.poll() == Settled(changed=("/w/a.png",), removed=())


def test_renamed_into_place_is_complete(fs: FakeFiles) -> None:
    d = debouncer(fs, quiet=1)
    fs.write("/w/x.png", 100)
    d.changed("/w/x.png", complete=True)
    fs.now += 1
    assert d.poll() == Settled(changed=("/w/x.png",), removed=())


def test_deleted_files_drop_out_and_are_reported(fs: FakeFiles) -> None:
    d = debouncer(fs, quiet=1)
    fs.write("/w/a.png", 1)
    d.closed("/w/a.png")
    fs.write("/w/b.png", 1)
    d.closed("/w/b.png")
    del fs.files["/w/a.png"]
    d.removed("/w/a.png")
    del fs.files["/w/b.png"]  # vanished without its event yet
    fs.now += 1
    assert d.poll() == Settled(changed=(), removed=("/w/a.png",))


def test_a_deleted_then_recreated_file_is_new_again(fs: FakeFiles) -> None:
    d = debouncer(fs, quiet=1)
    d.removed("/w/a.png")
    fs.write("/w/a.png", 5)
    d.closed("/w/a.png")
    fs.now += 1
    assert d.poll() == Settled(changed=("/w/a.png",), removed=())


def test_zero_quiet_period_settles_on_the_next_poll(fs: FakeFiles) -> None:
    d = debouncer(fs, quiet=0)
    fs.write("/w/a.png", 5)
    d.closed("/w/a.png")
    assert d.poll() == Settled(changed=("/w/a.png",), removed=())


def test_negative_quiet_period_is_refused() -> None:
    with pytest.raises(ValueError, match="quiet_seconds"):
        Debouncer(-1)


@pytest.mark.parametrize(
    ("name", "counts"),
    [
        ("a.png", True),
        ("sub/deeper/b.JPG", True),
        ("c.webp", True),
        ("d.jpeg", True),
        (".hidden.png", False),
        (".cache/e.png", False),
        ("x.png.part", False),
        ("x.png.crdownload", False),
        ("x.png.tmp", False),
        ("x.png~", False),
        ("notes.txt", False),
        ("metadata.csv", False),
        ("animation.gif", False),
    ],
)
def test_which_files_count_as_images(name: str, counts: bool) -> None:
    assert is_image_path(f"/w/{name}", "/w") is counts


def test_files_outside_the_folder_do_not_count() -> None:
    assert not is_image_path("/elsewhere/a.png", "/w")
    assert not is_image_path("/w", "/w")
