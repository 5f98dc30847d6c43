"""The pure pieces of the SLURM integration: host lists, head address, port, end time."""

import datetime

import pytest

from dgxtrain.distributed import slurm
from dgxtrain.distributed.preempt import deadline_near, job_end_time


@pytest.mark.parametrize("hostlist,hosts", [
    ("dgx07", ["dgx07"]),
    ("dgx[07-09]", ["dgx07", "dgx08", "dgx09"]),
    ("gpu[3,5-6],cpu1", ["gpu3", "gpu5", "gpu6", "cpu1"]),
    ("a-b-1,a-b-2", ["a-b-1", "a-b-2"]),
    ("n[098-101]-ib", ["n098-ib", "n099-ib", "n100-ib", "n101-ib"]),
])
def test_expand_hostlist(hostlist, hosts):
    assert slurm.expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize("bad", ["", "dgx[a-b]", "dgx[1-x]"])
def test_bad_hostlist_says_what_to_set(bad):
    with pytest.raises(slurm.SlurmError, match="MASTER_ADDR"):
        slurm.expand_hostlist(bad)


def test_port_from_job_id_is_stable_distinct_and_unprivileged():
    assert slurm.rendezvous_port("4242") == slurm.rendezvous_port(4242) == 19242
    ports = {slurm.rendezvous_port(j) for j in range(1000, 1100)}
    assert len(ports) == 100 and min(ports) >= 15000 and max(ports) < 35000


def test_head_address_single_node_is_loopback_without_asking_slurm(monkeypatch):
    monkeypatch.setattr(slurm, "_scontrol", lambda *a: pytest.fail("asked scontrol"))
    assert slurm.head_address("dgx[01-04]", 1) == "127.0.0.1"


def test_head_address_prefers_slurm_node_addr():
    record = "NodeName=dgx01 Arch=x86_64 CoresPerSocket=56 NodeAddr=10.0.3.1 NodeHostName=dgx01"
    assert slurm.head_address("dgx[01-04]", 4, node_record=record) == "10.0.3.1"


def test_head_address_without_scontrol(monkeypatch):
    monkeypatch.setattr(slurm, "_scontrol", lambda *a: None)  # e.g. inside a container
    assert slurm.head_address("dgx-unresolvable-[01-02]", 2) == "dgx-unresolvable-01"
    # A name that resolves to loopback would send every node to itself: refuse it.
    with pytest.raises(slurm.SlurmError, match="export MASTER_ADDR"):
        slurm.head_address("localhost,dgx02", 2)


def test_run_id_is_stable_per_job_and_array_task():
    assert slurm.run_id({"SLURM_JOB_ID": "12"}) == "slurm-12"
    assert slurm.run_id({"SLURM_JOB_ID": "13", "SLURM_ARRAY_JOB_ID": "12",
                         "SLURM_ARRAY_TASK_ID": "1"}) == "slurm-12_1"
    assert slurm.run_id({}) is None


def test_end_time_from_scontrol_record():
    start = datetime.datetime(2026, 11, 30, 2, 11, 55)
    end = start + datetime.timedelta(minutes=2)
    record = ("JobId=3 JobName=x RunTime=00:00:10 TimeLimit=00:02:00 "
              f"StartTime={start.isoformat()} EndTime={end.isoformat()} Deadline=N/A")
    assert slurm.end_time("3", job_record=record) == start.timestamp() + 120
    assert slurm.end_time("3", job_record="JobId=3 EndTime=Unknown") is None
    assert slurm.end_time("3", job_record="") is None


@pytest.mark.parametrize("remaining,step,ckpt,margin,near", [
    (100.0, 1.0, 5.0, 60.0, False),   # 100 s left, 66 s needed
    (65.0, 1.0, 5.0, 60.0, True),     # 65 s left, 66 s needed
    (10.0, 0.0, 0.0, 5.0, False),
    (4.9, 0.0, 0.0, 5.0, True),
])
def test_deadline_math(remaining, step, ckpt, margin, near):
    assert deadline_near(1000.0, 1000.0 + remaining, step, ckpt, margin) is near


def test_no_end_time_is_never_near():
    assert not deadline_near(1e9, None, 1e6, 1e6, 1e6)


def test_job_end_time_from_the_batch_script_else_from_one_rank_asking_slurm(monkeypatch):
    asked = []
    monkeypatch.setattr(slurm, "_scontrol", lambda *a: asked.append(a) or
                        "JobId=9 EndTime=2026-11-30T03:00:00")
    assert job_end_time(True, {"DGXTRAIN_JOB_END_TIME": "1700000000"}) == 1.7e9
    assert job_end_time(False, {"SLURM_JOB_ID": "9"}) is None and asked == []
    assert job_end_time(True, {"SLURM_JOB_ID": "9"}) == datetime.datetime(
        2026, 11, 30, 3).timestamp()
    assert asked == [("show", "job", "-o", "9")]
    assert job_end_time(True, {}) is None  # not in a SLURM job
