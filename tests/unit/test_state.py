"""CompressionState without a process group: validation, pickling, choice of collective."""

import pickle

import pytest
import torch

import gradcomp
from gradcomp.codecs import FPCodec, HalfCodec, IdentityCodec, PruneFPCodec, TopKCodec
from gradcomp.comm.collectives import choose_collective, expected_bytes_sent, expected_messages, shard_bounds


@pytest.mark.parametrize("kwargs,msg", [
    ({"codec": "fp6"}, "codec must be a gradcomp.codecs.Codec"),
    ({"error_feedback": "yes"}, "error_feedback must be one of"),
    ({"error_feedback": 1}, "error_feedback must be one of"),
    ({"warmup_steps": -1}, "warmup_steps must be an int >= 0"),
    ({"refit_every": 0}, "refit_every must be an int >= 1"),
    ({"seed": 1.5}, "seed must be an int"),
    ({"collective": "ring"}, "collective must be one of"),
    ({"collective": "allreduce"}, "no all_reduce can add"),
    ({"reduce_codec": 3}, "reduce_codec must be a Codec"),
])
def test_invalid_configuration_raises_at_construction(kwargs, msg):
    args = {"codec": FPCodec(6), **kwargs}
    with pytest.raises(ValueError, match=msg):
        gradcomp.CompressionState(**args)


def test_valid_configurations():
    s = gradcomp.CompressionState(HalfCodec(), collective="allreduce")
    assert s.collective == "allreduce"
    s = gradcomp.CompressionState(PruneFPCodec(0.85, 6), error_feedback="reduce", seed=7)
    assert s.reduce_feedback and not s.worker_feedback
    assert s.reduce_codec == PruneFPCodec(0.85, 6).reduce_codec()


def test_state_pickles_without_group_and_thread():
    s = gradcomp.CompressionState(TopKCodec(0.01), error_feedback=True, seed=3)
    s.step = 42
    t = pickle.loads(pickle.dumps(s))
    assert t.step == 42 and t.seed == 3 and t.process_group is None and t._worker is None and t._comm is None
    assert t.codec == TopKCodec(0.01)


def test_choose_collective_by_cost_model():
    assert choose_collective("auto", IdentityCodec(), 8) == "allreduce"
    assert choose_collective("auto", FPCodec(6), 2) == "allgather"
    assert choose_collective("auto", FPCodec(6), 3) == "two_phase"
    assert choose_collective("allgather", FPCodec(6), 8) == "allgather"
    # Two-phase bytes per rank stay flat as N grows; all-gather's grow linearly.
    s = 1_000_000
    assert expected_bytes_sent("two_phase", 8, 4 * s, s) < 2 * s
    assert expected_bytes_sent("allgather", 8, 4 * s, s) == 7 * s
    assert expected_bytes_sent("two_phase", 2, 4 * s, s) == expected_bytes_sent("allgather", 2, 4 * s, s)


def test_expected_messages_counts_rounds():
    assert expected_messages("allgather", 4) == 3
    assert expected_messages("allgather", 4, sizes_exchanged=1) == 6
    assert expected_messages("two_phase", 5, sizes_exchanged=2) == 16
    assert expected_messages("allreduce", 3) == 4
    assert expected_messages("two_phase", 1) == 0


@pytest.mark.parametrize("numel,world", [(0, 3), (1, 4), (10, 3), (1001, 4), (7, 7)])
def test_shard_bounds_cover_the_bucket(numel, world):
    b = shard_bounds(numel, world)
    assert len(b) == world and b[0][0] == 0 and b[-1][1] == numel
    assert all(b[i][1] == b[i + 1][0] for i in range(world - 1))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1


def test_stats_before_any_step():
    st = gradcomp.CompressionState(FPCodec(6)).stats()
    assert {"bytes_sent", "dense_bytes", "bits_per_element", "steps", "buckets"} <= set(st)
    assert st["steps"] == 0 and st["bytes_sent"] == 0


def test_residuals_follow_parameters_across_a_bucket_rebuild():
    # DDP rebuilds buckets after the first step: a residual stored for bucket 0 = [p0, p1]
    # must reach the new buckets [p1] and [p2, p0] through the parameters.
    s = gradcomp.CompressionState(FPCodec(6), error_feedback=True)
    s.memory.residuals[0] = (((10, 3), (11, 2)), torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
    r = s.memory.residual_for(1, ((11, 2),), torch.zeros(2))
    assert r.tolist() == [4.0, 5.0]
    r = s.memory.residual_for(2, ((12, 1), (10, 3)), torch.zeros(4))
    assert r.tolist() == [0.0, 1.0, 2.0, 3.0]  # p2 had no residual yet


def test_register_needs_a_ddp_model():
    with pytest.raises(ValueError, match="needs a DistributedDataParallel model"):
        gradcomp.register(torch.nn.Linear(2, 2), codec=FPCodec(6))


@pytest.mark.parametrize("timeout,msg", [(0, "positive"), (-1.0, "positive"), (float("inf"), "finite"),
                                         ("10", "seconds"), (True, "seconds")])
def test_invalid_timeout_raises(timeout, msg):
    with pytest.raises(ValueError, match=msg):
        gradcomp.CompressionState(FPCodec(6), timeout=timeout)


def test_timeout_accepts_seconds_and_timedelta():
    import datetime

    assert gradcomp.CompressionState(FPCodec(6), timeout=7).timeout == datetime.timedelta(seconds=7)
    assert gradcomp.CompressionState(FPCodec(6), timeout=datetime.timedelta(minutes=2)).timeout.total_seconds() == 120


class _OneRankTransport(gradcomp.collectives.Transport):
    """A Transport of one rank: nothing ever crosses a network."""

    rank, world_size = 0, 1


def test_state_on_a_given_transport_binds_at_once_and_stays_bound():
    transport = _OneRankTransport()
    s = gradcomp.CompressionState(FPCodec(6), transport=transport)
    assert s.transport is transport and s._bound and s.process_group is None
    assert (s.rank, s.world_size) == (0, 1)
    s.close()
    assert s.transport is transport and s._bound  # no group of its own to release
    with pytest.raises(TypeError, match="cannot be unpickled"):
        pickle.loads(pickle.dumps(s))
    with pytest.raises(ValueError, match="not both"):
        gradcomp.CompressionState(FPCodec(6), process_group=object(), transport=transport)
    with pytest.raises(ValueError, match="must be a gradcomp.comm.collectives.Transport"):
        gradcomp.CompressionState(FPCodec(6), transport=object())


def test_wire_stats_checkpoint_roundtrip_and_required_counters():
    from gradcomp.comm.collectives import ReduceStats
    from gradcomp.comm.stats import FSDP_COUNTERS, HOOK_COUNTERS, WireStats

    st = WireStats(FSDP_COUNTERS)
    st.record(ReduceStats(bytes_sent=10, payload_bytes=4, messages=1), dense_bytes=40.0, elements=8)
    st.record_replica(ReduceStats(bytes_sent=3, messages=1), dense_bytes=6.0)
    st.count_nonfinite_step()
    assert list(st.state_dict()) == list(FSDP_COUNTERS)
    again = WireStats(FSDP_COUNTERS)
    again.load_state_dict(st.state_dict())
    assert again.state_dict() == st.state_dict() == {
        "bytes_sent": 10, "messages": 2, "dense_bytes": 40.0, "payload_bytes": 4, "payload_elements": 8,
        "replica_bytes_sent": 3, "replica_dense_bytes": 6.0, "nonfinite_steps": 1}
    hook = WireStats(HOOK_COUNTERS)
    hook.load_state_dict({"bytes_sent": "5", "dense_bytes": 1, "payload_bytes": 0, "payload_elements": 0})
    assert hook.counters["bytes_sent"] == 5 and isinstance(hook.counters["dense_bytes"], float)
    assert hook.counters["messages"] == 0  # older checkpoints lack it
    with pytest.raises(KeyError):
        hook.load_state_dict({"dense_bytes": 1.0}, required=("bytes_sent",))
    with pytest.raises(ValueError, match="unknown wire counters"):
        WireStats(("bytes",))
