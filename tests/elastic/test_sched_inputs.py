"""Bad trace and workload files are refused with errors that name the file, the row, the column or the job."""

from __future__ import annotations

import pytest

from glassbox.elastic.sched.simulator import simulate
from glassbox.elastic.sched.tiresias import TiresiasPolicy
from glassbox.elastic.sched.traces import TraceError, load_model_trace
from glassbox.elastic.sched.workload import Cluster, WorkloadError, check_workload, read_workload

from sched_testlib import write_toy_trace


def test_toy_trace_loads_and_interpolates(tmp_path):
    trace = load_model_trace(write_toy_trace(tmp_path))
    assert (trace.init_batch_size, trace.max_batch_size, trace.min_local_bsz, trace.max_local_bsz) == (10, 40, 10, 20)
    assert trace.step_time((1,), 15) == pytest.approx((1.5, 0.0))           # linear in the local batch
    assert trace.step_time((0, 2), 10) == pytest.approx((1.0, 0.2))         # empty nodes do not count
    assert trace.max_epochs == 2 and list(trace.epoch_progress) == [0.0, 100.0, 200.0]


def test_missing_column_names_file_and_column(tmp_path):
    d = write_toy_trace(tmp_path)
    (d / "placements.csv").write_text("placement,local_bsz,step_time\n1,10,1.0\n")
    with pytest.raises(TraceError, match=r"placements\.csv: missing column\(s\) sync_time"):
        load_model_trace(d)


def test_bad_number_names_row_and_column(tmp_path):
    d = write_toy_trace(tmp_path)
    text = (d / "validation-20.csv").read_text().replace("200,200,0.6,1.0,0.0", "200,200,0.6,fast,0.0")
    (d / "validation-20.csv").write_text(text)
    with pytest.raises(TraceError, match=r"validation-20\.csv: row 3, column grad_sqr: 'fast' is not a number"):
        load_model_trace(d)


def test_impossible_placement_and_sync_are_refused(tmp_path):
    d = write_toy_trace(tmp_path)
    (d / "placements.csv").write_text("placement,local_bsz,step_time,sync_time\n1,10,1.0,0.0\n10,10,1.0,0.0\n")
    with pytest.raises(TraceError, match=r"row 3, column placement"):
        load_model_trace(d)
    (d / "placements.csv").write_text("placement,local_bsz,step_time,sync_time\n1,10,1.0,2.0\n")
    with pytest.raises(TraceError, match=r"row 2, column sync_time"):
        load_model_trace(d)


def write_workload(path, rows: str):
    path.write_text("name,time,application,num_replicas,batch_size\n" + rows)
    return path


def test_workload_errors_name_row_and_job(tmp_path):
    traces = {"toy": load_model_trace(write_toy_trace(tmp_path))}
    cluster = Cluster(num_nodes=1, gpus_per_node=2)
    bad = write_workload(tmp_path / "w.csv", "a,0,toy,1,10\nb,5,toy,x,10\n")
    with pytest.raises(WorkloadError, match=r"w\.csv: row 3 \(job 'b'\), column num_replicas: 'x' is not a number"):
        read_workload(bad)
    (tmp_path / "m.csv").write_text("name,time,application,batch_size\na,0,toy,10\n")
    with pytest.raises(WorkloadError, match=r"m\.csv: missing column\(s\) num_replicas"):
        read_workload(tmp_path / "m.csv")
    big = read_workload(write_workload(tmp_path / "big.csv", "a,0,toy,1,10\nhuge,0,toy,3,40\n"))
    with pytest.raises(WorkloadError, match=r"job 'huge': asks for 3 GPUs but the cluster has 2"):
        check_workload(big, traces, cluster)
    with pytest.raises(WorkloadError, match=r"job 'huge': asks for 3 GPUs"):
        simulate(big, traces, TiresiasPolicy(), cluster)
    unknown = read_workload(write_workload(tmp_path / "u.csv", "a,0,resnet,1,10\n"))
    with pytest.raises(WorkloadError, match=r"job 'a': unknown application 'resnet'"):
        check_workload(unknown, traces, cluster)
    batch = read_workload(write_workload(tmp_path / "b.csv", "a,0,toy,2,12\n"))
    with pytest.raises(WorkloadError, match=r"job 'a': batch size 12 cannot give each of 2 replicas"):
        check_workload(batch, traces, cluster)
    dup = write_workload(tmp_path / "d.csv", "a,0,toy,1,10\na,1,toy,1,10\n")
    with pytest.raises(WorkloadError, match=r"row 3: job 'a' repeats the name of row 2"):
        read_workload(dup)
