"""The SQLite job store: records round-trip, FIFO queue, compare-and-set transitions, id prefixes,
event sequences under concurrency, durability across close and SIGKILL, and the file's privacy."""

from __future__ import annotations

import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorad.errors import LoradError
from lorad.jobs import EventRecord, JobNotFound, JobRecord, JobState, JobStore
from lorad.jobs import store as store_module
from lorad.paths import jobs_db_path


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "jobs.sqlite3"


@pytest.fixture
def store(db_path: Path) -> Iterator[JobStore]:
    with JobStore(db_path) as s:
        yield s


def make_job(store: JobStore, name: str = "job", **overrides: object) -> JobRecord:
    values: dict[str, object] = {
        "name": name,
        "config_yaml": "base_model: some/model\nepochs: 1\n",
        "base_dir": "/configs",
        "source_name": f"{name}.yaml",
        "base_model": "some/model",
        "output_dir": f"/out/{name}",
    }
    values.update(overrides)
    return store.create_job(**values)  # type: ignore[arg-type]


def fixed_ids(monkeypatch: pytest.MonkeyPatch, *ids: str) -> None:
    """Make the store hand out ``ids`` in order instead of random ones."""
    pending = iter(ids)
    monkeypatch.setattr(store_module, "new_job_id", lambda: next(pending))


def run_threads(count: int, target: object) -> None:
    """Run ``target(index)`` in ``count`` threads; re-raise the first error any of them hit."""
    errors: list[BaseException] = []

    def body(index: int) -> None:
        try:
            target(index)  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]


# -- records -------------------------------------------------------------------------------------


def test_final_states() -> None:
    assert {s for s in JobState if s.final} == {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED}
    assert not JobState.INTERRUPTED.final


def test_job_not_found_is_a_lorad_error_with_a_hint() -> None:
    err = JobNotFound("no job with id 'x'")
    assert isinstance(err, LoradError)
    assert "lorad jobs" in err.hint


# -- jobs ----------------------------------------------------------------------------------------


def test_create_job_starts_queued_and_round_trips(store: JobStore) -> None:
    before = time.time()
    job = make_job(store, "style", keep_alive_seconds=30)
    assert len(job.job_id) == 10
    assert set(job.job_id) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert job.state is JobState.QUEUED
    assert job.attempt == 0
    assert before <= job.created_at <= time.time()
    assert job.started_at is None and job.finished_at is None
    assert job.outputs == {} and job.progress is None
    assert (job.error, job.hint, job.checkpoint) == ("", "", "")
    assert job.keep_alive_seconds == 30.0
    assert job.config_yaml == "base_model: some/model\nepochs: 1\n"
    assert store.get(job.job_id) == job


def test_ids_are_unique(store: JobStore) -> None:
    ids = {make_job(store, f"j{i}").job_id for i in range(50)}
    assert len(ids) == 50


def test_an_id_collision_draws_a_new_id(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_ids(monkeypatch, "aaaaaaaaaa", "aaaaaaaaaa", "bbbbbbbbbb")
    assert make_job(store, "first").job_id == "aaaaaaaaaa"
    assert make_job(store, "second").job_id == "bbbbbbbbbb"
    assert store.get("aaaaaaaaaa").name == "first"


def test_get_unknown_id_raises(store: JobStore) -> None:
    with pytest.raises(JobNotFound, match="nosuchjob0") as info:
        store.get("nosuchjob0")
    assert "lorad jobs" in info.value.hint


def test_get_accepts_a_unique_prefix(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    fixed_ids(monkeypatch, "abcd234567", "abcdefghij", "zzzz222222")
    make_job(store, "one")
    make_job(store, "two")
    make_job(store, "three")
    assert store.get("abcd2").name == "one"
    assert store.get("abcde").name == "two"
    assert store.get("zzzz").name == "three"
    assert store.get("zzzz222222").name == "three"
    with pytest.raises(JobNotFound, match="ambiguous") as info:
        store.get("abcd")
    assert "abcd234567" in str(info.value) and "abcdefghij" in str(info.value)
    with pytest.raises(JobNotFound) as short:
        store.get("zzz")  # shorter than 4 characters: never treated as a prefix
    assert "ambiguous" not in str(short.value)
    with pytest.raises(JobNotFound):
        store.get("abcdx")
    with pytest.raises(JobNotFound):
        store.get("zzzz2222222")  # longer than the id it starts with


def test_update_changes_fields_and_returns_the_committed_record(store: JobStore) -> None:
    job = make_job(store)
    updated = store.update(
        job.job_id,
        state=JobState.FAILED,
        started_at=10.0,
        finished_at=20.5,
        outputs={"kohya": "/out/job/job.safetensors"},
        progress={"step": 3, "total_steps": 10, "loss": 0.25},
        error="boom",
        hint="try again",
        attempt=2,
        checkpoint="/out/job/checkpoints/step-3",
        keep_alive_seconds=5.0,
    )
    assert updated == store.get(job.job_id)
    assert updated.state is JobState.FAILED
    assert updated.outputs == {"kohya": "/out/job/job.safetensors"}
    assert updated.progress == {"step": 3, "total_steps": 10, "loss": 0.25}
    assert (updated.started_at, updated.finished_at, updated.attempt) == (10.0, 20.5, 2)
    assert updated.created_at == job.created_at
    assert store.update(job.job_id, progress=None).progress is None
    assert store.update(job.job_id, state="running").state is JobState.RUNNING
    assert store.update(job.job_id) == store.get(job.job_id)


@pytest.mark.parametrize("field", ["job_id", "created_at", "colour"])
def test_update_rejects_other_fields_and_writes_nothing(store: JobStore, field: str) -> None:
    job = make_job(store)
    with pytest.raises(ValueError, match=field):
        store.update(job.job_id, error="written?", **{field: "x"})
    assert store.get(job.job_id) == job


def test_update_unknown_job_raises(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.update("nosuchjob0", error="x")


def test_list_is_newest_first_with_state_filter_and_limit(store: JobStore) -> None:
    jobs = [make_job(store, f"j{i}") for i in range(6)]
    store.update(jobs[1].job_id, state=JobState.RUNNING)
    store.update(jobs[2].job_id, state=JobState.SUCCEEDED)
    store.update(jobs[4].job_id, state=JobState.SUCCEEDED)
    store.update(jobs[5].job_id, state=JobState.FAILED)

    assert [j.name for j in store.list()] == ["j5", "j4", "j3", "j2", "j1", "j0"]
    assert [j.name for j in store.list(limit=2)] == ["j5", "j4"]
    assert [j.name for j in store.list([JobState.SUCCEEDED])] == ["j4", "j2"]
    assert [j.name for j in store.list([JobState.QUEUED, JobState.RUNNING])] == ["j3", "j1", "j0"]
    assert [j.name for j in store.list([JobState.SUCCEEDED, JobState.FAILED], limit=2)] == ["j5", "j4"]
    assert store.list([JobState.CANCELLED]) == []
    assert store.list()[0] == store.get(jobs[5].job_id)
    with pytest.raises(ValueError):
        store.list(limit=0)


def test_queue_is_fifo_with_positions(store: JobStore) -> None:
    assert store.next_queued() is None
    a, b, c = (make_job(store, name) for name in "abc")
    assert store.next_queued() == a
    assert [store.queue_position(j.job_id) for j in (a, b, c)] == [1, 2, 3]

    store.transition(a.job_id, expect=[JobState.QUEUED], to=JobState.RUNNING)
    assert store.next_queued() == b
    assert [store.queue_position(j.job_id) for j in (a, b, c)] == [0, 1, 2]

    store.transition(b.job_id, expect=[JobState.QUEUED], to=JobState.CANCELLED)
    d = make_job(store, "d")
    assert store.next_queued() == c
    assert [store.queue_position(j.job_id) for j in (a, b, c, d)] == [0, 0, 1, 2]
    with pytest.raises(JobNotFound):
        store.queue_position("nosuchjob0")


def test_queue_breaks_created_at_ties_by_insertion_order(store: JobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    # Random ids sort in any order; with equal timestamps only insertion order may decide.
    fixed_ids(monkeypatch, "zzzzzzzzzz", "mmmmmmmmmm", "aaaaaaaaaa")
    monkeypatch.setattr(store_module, "_now", lambda: 1000.0)
    jobs = [make_job(store, name) for name in ("first", "second", "third")]
    assert store.next_queued() == jobs[0]
    assert [store.queue_position(j.job_id) for j in jobs] == [1, 2, 3]
    assert [j.name for j in store.list()] == ["third", "second", "first"]


def test_transition_is_compare_and_set(store: JobStore) -> None:
    job = make_job(store)
    running = store.transition(job.job_id, expect=[JobState.QUEUED], to=JobState.RUNNING, started_at=5.0)
    assert running is not None
    assert (running.state, running.started_at) == (JobState.RUNNING, 5.0)
    assert running == store.get(job.job_id)

    assert store.transition(job.job_id, expect=[JobState.QUEUED], to=JobState.CANCELLED, error="x") is None
    assert store.get(job.job_id) == running  # a lost compare-and-set changes nothing

    done = store.transition(
        job.job_id, expect={JobState.RUNNING, JobState.QUEUED}, to=JobState.SUCCEEDED, finished_at=9.0
    )
    assert done is not None and done.state is JobState.SUCCEEDED and done.finished_at == 9.0
    assert store.transition(job.job_id, expect=[], to=JobState.FAILED) is None


def test_transition_rejects_bad_arguments(store: JobStore) -> None:
    job = make_job(store)
    with pytest.raises(ValueError, match="`to`"):
        store.transition(job.job_id, expect=[JobState.QUEUED], to=JobState.RUNNING, state=JobState.FAILED)
    with pytest.raises(ValueError, match="colour"):
        store.transition(job.job_id, expect=[JobState.QUEUED], to=JobState.RUNNING, colour="red")
    with pytest.raises(JobNotFound):
        store.transition("nosuchjob0", expect=[JobState.QUEUED], to=JobState.RUNNING)
    assert store.get(job.job_id) == job


def race_to(store: JobStore, job_id: str, targets: tuple[JobState, ...]) -> dict[JobState, JobRecord | None]:
    """Start one thread per target state at the same moment, each moving the QUEUED job there."""
    barrier = threading.Barrier(len(targets))
    results: dict[JobState, JobRecord | None] = {}

    def race(index: int) -> None:
        barrier.wait()
        results[targets[index]] = store.transition(job_id, expect=[JobState.QUEUED], to=targets[index])

    run_threads(len(targets), race)
    return results


def test_racing_transitions_have_exactly_one_winner(store: JobStore) -> None:
    for _ in range(25):
        job = make_job(store)
        results = race_to(store, job.job_id, (JobState.RUNNING, JobState.CANCELLED))
        assert len(results) == 2
        winners = [record for record in results.values() if record is not None]
        assert len(winners) == 1
        assert store.get(job.job_id) == winners[0]


# -- events --------------------------------------------------------------------------------------


def test_events_are_numbered_per_job_and_paged(store: JobStore) -> None:
    a, b = make_job(store, "a"), make_job(store, "b")
    assert store.last_seq(a.job_id) == 0
    assert store.events(a.job_id) == []

    first = store.append_event(a.job_id, "TrainingStarted", {"total_steps": 3, "start_step": 0}, time=100.0)
    assert first == EventRecord(a.job_id, 1, 100.0, "TrainingStarted", {"total_steps": 3, "start_step": 0})
    for step in (1, 2, 3):
        store.append_event(a.job_id, "StepDone", {"step": step, "loss": 1.0 / step, "tags": ["x", step]})
    other = store.append_event(b.job_id, "LogLine", {"text": "hello"})
    assert other.seq == 1

    events = store.events(a.job_id)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert events[0] == first
    assert events[2].payload == {"step": 2, "loss": 0.5, "tags": ["x", 2]}
    assert [e.seq for e in store.events(a.job_id, after_seq=2)] == [3, 4]
    assert [e.seq for e in store.events(a.job_id, after_seq=1, limit=2)] == [2, 3]
    assert store.events(a.job_id, after_seq=4) == []
    assert store.events(a.job_id, limit=0) == []
    assert store.last_seq(a.job_id) == 4 and store.last_seq(b.job_id) == 1
    assert all(e.time > 100.0 for e in events[1:])


def test_appended_record_is_what_was_stored(store: JobStore) -> None:
    job = make_job(store)
    payload = {"shape": (64, 64), "nested": {"ok": True}, "none": None}
    record = store.append_event(job.job_id, "Custom", payload)
    assert record.payload == {"shape": [64, 64], "nested": {"ok": True}, "none": None}
    assert store.events(job.job_id) == [record]


def test_a_nan_loss_is_stored_not_refused(store: JobStore) -> None:
    # A diverging run reports a NaN loss; recording that event must not fail the run a second way.
    job = make_job(store)
    store.append_event(job.job_id, "StepDone", {"loss": float("nan")})
    assert math.isnan(store.events(job.job_id)[0].payload["loss"])


def test_a_bad_payload_writes_nothing(store: JobStore) -> None:
    job = make_job(store)
    with pytest.raises(TypeError):
        store.append_event(job.job_id, "Bad", {"value": object()})
    assert store.last_seq(job.job_id) == 0
    assert store.append_event(job.job_id, "Good", {}).seq == 1


def test_events_of_an_unknown_job_raise(store: JobStore) -> None:
    with pytest.raises(JobNotFound):
        store.append_event("nosuchjob0", "LogLine", {})
    with pytest.raises(JobNotFound):
        store.events("nosuchjob0")
    with pytest.raises(JobNotFound):
        store.last_seq("nosuchjob0")


def test_concurrent_appends_keep_each_jobs_seqs_dense(store: JobStore) -> None:
    jobs = [make_job(store, f"j{i}") for i in range(4)]

    def append(index: int) -> None:
        for step in range(1, 201):
            record = store.append_event(jobs[index].job_id, "StepDone", {"step": step, "worker": index})
            assert record.seq == step

    run_threads(4, append)
    for index, job in enumerate(jobs):
        events = store.events(job.job_id)
        assert [e.seq for e in events] == list(range(1, 201))
        assert [e.payload["step"] for e in events] == list(range(1, 201))
        assert {e.payload["worker"] for e in events} == {index}


def test_concurrent_appends_to_one_job_never_share_a_seq(store: JobStore) -> None:
    job = make_job(store)
    run_threads(4, lambda index: [store.append_event(job.job_id, "LogLine", {"w": index}) for _ in range(100)])
    assert [e.seq for e in store.events(job.job_id)] == list(range(1, 401))


def test_readers_see_a_dense_prefix_while_events_are_appended(store: JobStore) -> None:
    job = make_job(store)
    done = threading.Event()

    def work(index: int) -> None:
        if index == 0:
            try:
                for step in range(1, 401):
                    store.append_event(job.job_id, "StepDone", {"step": step})
            finally:
                done.set()
            return
        seen = 0
        while not done.is_set():
            seqs = [e.seq for e in store.events(job.job_id)]
            assert seqs == list(range(1, len(seqs) + 1))
            assert len(seqs) >= seen  # committed events never disappear
            seen = len(seqs)
            store.get(job.job_id)

    run_threads(3, work)
    assert store.last_seq(job.job_id) == 400


def test_reads_do_not_wait_for_a_write_in_progress(store: JobStore, db_path: Path) -> None:
    job = make_job(store)
    store.append_event(job.job_id, "LogLine", {"text": "committed"})
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # holds the write lock until rolled back
        other.execute("UPDATE jobs SET name = 'uncommitted'")
        other.execute("DELETE FROM events")
        start = time.perf_counter()
        assert store.get(job.job_id).name == "job"
        assert len(store.events(job.job_id)) == 1
        assert store.list()[0].name == "job"
        # Well below the busy timeout a blocked read would wait out.
        assert time.perf_counter() - start < 1.0
    finally:
        other.execute("ROLLBACK")
        other.close()


def test_appends_are_fast(store: JobStore) -> None:
    # A sanity bound, not a benchmark: appends sit on the training loop's path.
    job = make_job(store)
    start = time.perf_counter()
    for step in range(1000):
        store.append_event(job.job_id, "StepDone", {"step": step, "loss": 0.1, "lr": 1e-4, "seconds": 0.5})
    assert time.perf_counter() - start < 2.0


# -- persistence ---------------------------------------------------------------------------------


def test_reopening_after_close_keeps_everything(db_path: Path) -> None:
    with JobStore(db_path) as first:
        job = make_job(first)
        first.transition(job.job_id, expect=[JobState.QUEUED], to=JobState.RUNNING, started_at=1.5)
        for step in range(1, 51):
            first.append_event(job.job_id, "StepDone", {"step": step})
        queued = make_job(first, "later")
        saved_job, saved_events = first.get(job.job_id), first.events(job.job_id)
    with JobStore(db_path) as second:
        assert second.get(job.job_id) == saved_job
        assert second.events(job.job_id) == saved_events
        assert second.next_queued() == queued
        assert second.append_event(job.job_id, "TrainingFinished", {}).seq == 51


def test_a_closed_store_refuses_work(db_path: Path) -> None:
    store = JobStore(db_path)
    job = make_job(store)
    store.close()
    store.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        store.get(job.job_id)
    with pytest.raises(RuntimeError, match="closed"):
        store.append_event(job.job_id, "LogLine", {})


def test_default_location_is_in_lorad_home(_lorad_home: Path) -> None:
    with JobStore(jobs_db_path()) as store:
        make_job(store)
    assert (_lorad_home / "jobs.sqlite3").is_file()


def test_schema_version_is_recorded(db_path: Path) -> None:
    JobStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_version")]
    conn.close()
    assert versions == [store_module.SCHEMA_VERSION]
    JobStore(db_path).close()  # opening again applies nothing twice
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1
    conn.close()


def test_a_newer_schema_is_refused(db_path: Path) -> None:
    JobStore(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("INSERT INTO schema_version (version, applied_at) VALUES (99, 0)")
    conn.close()
    with pytest.raises(LoradError, match="99") as info:
        JobStore(db_path)
    assert "Upgrade lorad" in info.value.hint


def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"definitely not sqlite\n" * 200)
    with pytest.raises(LoradError, match="not a usable job store") as info:
        JobStore(db_path)
    assert "move it aside" in info.value.hint


def test_a_daemon_on_a_partly_damaged_store_stops_with_the_hint_not_a_traceback(tmp_path: Path) -> None:
    """Damage inside the file (not in its header) used to pass the open and crash startup at the
    first read of a bad page, with a raw traceback."""
    home = tmp_path / "home"
    db = jobs_db_path(home)
    with JobStore(db) as store:
        for i in range(40):
            job = make_job(store, f"job{i}")
            for _ in range(5):
                store.append_event(job.job_id, "log", {"message": "m" * 2000})
    size = db.stat().st_size
    with open(db, "r+b") as fh:  # three pages in the middle of the file
        fh.seek(size // 2 // 4096 * 4096)
        fh.write(os.urandom(3 * 4096))
    served = subprocess.run(
        [sys.executable, "-m", "lorad.cli", "serve", "--listen", f"unix:{tmp_path}/s.sock"],
        env={**os.environ, "LORAD_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert served.returncode != 0
    assert "is not a usable job store" in served.stderr and "move it aside" in served.stderr
    assert "Traceback" not in served.stderr


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_database_files_are_private(db_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        with JobStore(db_path) as store:
            make_job(store)
            for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
                assert path.stat().st_mode & 0o777 == 0o600, path
    finally:
        os.umask(old_umask)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_an_existing_database_file_is_made_private(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.touch()
    db_path.chmod(0o644)
    JobStore(db_path).close()
    assert db_path.stat().st_mode & 0o777 == 0o600


# -- crash safety --------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from lorad.jobs import JobState, JobStore

    store = JobStore(Path(sys.argv[1]))
    mode = sys.argv[2]
    job = store.create_job(name="crash", config_yaml="epochs: 1\\n", base_dir="/c", source_name="c.yaml",
                           base_model="m", output_dir="/o")
    store.transition(job.job_id, expect=[JobState.QUEUED], to=JobState.RUNNING, started_at=123.0)
    print(job.job_id, flush=True)
    step = 0
    while True:
        step += 1
        seq = store.append_event(job.job_id, "StepDone", {"step": step, "loss": 1.0 / step}).seq
        store.update(job.job_id, progress={"step": step})
        print(seq, flush=True)
        if mode == "ready" and step == 300:
            print("ready", flush=True)
            time.sleep(120)
    """
)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("mode", ["ready", "streaming"])
def test_committed_writes_survive_sigkill(db_path: Path, mode: str) -> None:
    """Kill a writer process outright; reopening shows everything its calls had returned."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db_path), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = proc.stdout.readline().strip()  # type: ignore[union-attr]
        last_returned = 0
        while True:
            line = proc.stdout.readline().strip()  # type: ignore[union-attr]
            assert line, f"writer exited early: {proc.stderr.read()}"  # type: ignore[union-attr]
            if line == "ready" or (mode == "streaming" and last_returned >= 200):
                break
            last_returned = int(line)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    # The WAL is still there: the data had to be recovered from it, not from a clean close.
    assert Path(f"{db_path}-wal").exists()

    with JobStore(db_path) as store:
        job = store.get(job_id)
        events = store.events(job_id)
    assert job.state is JobState.RUNNING and job.started_at == 123.0
    if mode == "ready":
        assert len(events) == 300
    else:
        # The writer may have committed a few more after its last line was read, never fewer.
        assert len(events) >= last_returned
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [e.payload["step"] for e in events] == list(range(1, len(events) + 1))
    assert job.progress is not None and job.progress["step"] >= len(events) - 1
