"""Host and process collectors and the session counter (local /proc and files only)."""

from __future__ import annotations

import os
from pathlib import Path

from agent.app import next_session
from agent.collect import ProcessSampler, collect_host


def test_collect_host_reads_sane_values() -> None:
    host = collect_host()
    assert host.mem_total_bytes > 0
    assert 0.0 <= host.mem_percent <= 100.0
    assert 0.0 <= host.cpu_percent <= 100.0 * (os.cpu_count() or 1)
    assert any(disk.mount == "/" for disk in host.disks) or host.disks == []
    again = collect_host(host)
    assert again.net_recv_bytes >= host.net_recv_bytes


def test_the_sampler_reads_a_live_process_and_forgets_dead_ones() -> None:
    sampler = ProcessSampler(max_cached=2)
    sample = sampler.collect_process(os.getpid())
    assert sample is not None
    assert sample.rss_bytes > 0
    assert sample.num_threads >= 1
    assert sample.num_fds > 0
    assert sampler.collect_process(2**22 + 12345) is None
    samples = sampler.collect_many([os.getpid()])
    assert list(samples) == [os.getpid()]


def test_sessions_only_grow_and_survive_a_garbled_counter(tmp_path: Path) -> None:
    assert next_session(tmp_path, 1_700_000_000.0) == 1
    assert next_session(tmp_path, 1_700_000_000.0) == 2
    (tmp_path / "session").write_text("garbage")
    assert next_session(tmp_path, 1_700_000_000.0) == 1_700_000_001
    assert (tmp_path / "session").read_text() == "1700000001\n"
