"""Batching does not change any replica's result: TorchSim's autobatchers, per-replica noise, shards.

The bonded Morse potential is strictly per system, so a replica's trajectory is bit-identical whatever
batch it runs in; with a host model (MACE, NequIP) batching changes only round-off (the batch == alone
test in test_stability.py allows 1e-9).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase.build import bulk
from ase.io import read

from ggnd_plugin.default_data import default_data_path
from ggnd_plugin.errors import GGNDError
from ggnd_plugin.md import metrics
from ggnd_plugin.md.reference_models import bonded_morse_model
from ggnd_plugin.md.stability import (
    Batching,
    StabilityProtocol,
    UnfinishedReplicas,
    _ModelRun,
    build_monitor,
    checkpoint_files,
    plan_replicas,
    run_stability,
)


@pytest.fixture(scope="module")
def reference():
    return read(default_data_path("3bpa_300K_train"), index=":100")


@pytest.fixture(scope="module")
def start():
    return read(default_data_path("3bpa_300K_test"), index=":20")


@pytest.fixture(scope="module")
def bonds(reference):
    return metrics.reference_bonds(reference)


def _counting_model(bonds):
    model = bonded_morse_model(*bonds)
    model.sizes = []
    forward = model.forward

    def counted(state, **kwargs):
        model.sizes.append(state.n_systems)
        return forward(state, **kwargs)

    model.forward = counted
    return model


def _same(a, b):
    """Identical rows and time series (bit for bit)."""
    assert a.rows == b.rows
    assert a.series.keys() == b.series.keys()
    for key, series in a.series.items():
        for name, values in series.items():
            assert np.array_equal(values, b.series[key][name], equal_nan=True), (key, name)


# 300 K replicas survive, 5000 K replicas fail at different steps: the batch empties and refills.
HOT = dict(temperatures=(300.0, 5000.0), replicas=4, time_ps=0.3, record_every_steps=7)


@pytest.mark.parametrize("ensemble", ["nve", "nvt-langevin"])
def test_in_flight_and_binning_give_the_one_batch_result(ensemble, bonds, start, reference):
    protocol = StabilityProtocol(ensemble=ensemble, **HOT)
    whole = run_stability({"m": bonded_morse_model(*bonds)}, start, reference, protocol, progress=False)
    assert 0 < sum(row["failed"] for row in whole.rows) < len(whole.rows)
    for mode in ("binning", "in-flight"):
        model = _counting_model(bonds)
        batched = run_stability(
            {"m": model}, start, reference, protocol, progress=False, batching=Batching(mode, 3 * 27)
        )
        _same(whole, batched)
        assert max(model.sizes) == 3  # never more than --max-batch-atoms (81 atoms = 3 replicas)
        # every replica-step the model computed is one of a replica's steps: nothing run twice
        steps = sum(row["failure_step"] if row["failed"] else protocol.n_steps for row in whole.rows)
        assert batched.execution["replica_steps"] == steps
        if mode == "in-flight":
            # the batch is refilled while replicas wait: 3 systems on every step until the queue runs dry
            assert model.sizes[:60].count(3) >= 55, model.sizes[:60]


def test_in_flight_beats_binning_on_batch_occupancy(bonds, start, reference):
    """Binning's bins empty as replicas fail; in-flight keeps the batch full: fewer, fuller steps."""
    protocol = StabilityProtocol(**HOT)
    calls = {}
    for mode in ("binning", "in-flight"):
        model = _counting_model(bonds)
        run_stability({"m": model}, start, reference, protocol, progress=False, batching=Batching(mode, 81))
        calls[mode] = model.sizes
    assert sum(calls["binning"]) == sum(calls["in-flight"])  # the same replica-steps (plus start checks)
    assert len(calls["in-flight"]) < len(calls["binning"])


def test_in_flight_rdf_windows_follow_each_replica(tmp_path):
    """Periodic argon, RDF criterion: replicas join the batch at different steps; each keeps its own
    sampling phase and window, so failures and time series equal the one-batch run."""
    from torch_sim.models.lennard_jones import LennardJonesModel

    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(2)
    frames = []
    for seed in range(6):
        frame = crystal.copy()
        frame.rattle(0.08, seed=seed)
        frames.append(frame)
    model = LennardJonesModel(
        sigma=3.405, epsilon=0.0104, cutoff=5.0, dtype=torch.float64, compute_stress=False
    )
    protocol = StabilityProtocol(
        temperatures=(3000.0, 20.0),
        replicas=3,
        time_ps=0.3,
        timestep_fs=2.0,
        rdf_window_ps=0.1,
        rdf_every_steps=5,
        rdf_bins=30,
        record_every_steps=7,
    )
    whole = run_stability({"lj": model}, frames, frames, protocol, progress=False)
    # two replicas (64 atoms) at a time: the 20 K replicas wait until the hot ones melt at step 45
    batched = run_stability(
        {"lj": model}, frames, frames, protocol, progress=False, batching=Batching("in-flight", 64)
    )
    assert [row["failure_step"] for row in whole.rows] == [45, 45, 45, None, None, None]
    _same(whole, batched)


@pytest.mark.parametrize("ensemble", ["nve", "nvt-langevin", "nvt-nose-hoover"])
def test_a_replica_alone_equals_the_replica_in_a_batch(ensemble, bonds, start, reference):
    """Langevin noise is one stream per replica (TorchSim's is one per batch), so even a thermostatted
    replica does not depend on its batch."""
    protocol = StabilityProtocol(temperatures=(300.0, 5000.0), replicas=2, time_ps=0.2, ensemble=ensemble)
    plan = plan_replicas(protocol, {t: len(start) for t in protocol.temperatures})
    monitor = build_monitor(protocol, reference, start[0])

    def run(specs):
        model_run = _ModelRun(
            "m",
            bonded_morse_model(*bonds),
            specs,
            lambda s: start[s.start_frame],
            monitor,
            protocol,
            None,
            False,
        )
        model_run.start()
        model_run.run()
        return model_run

    batched = run(plan)
    assert any(row["failed"] for row in batched.rows())
    for index, spec in enumerate(plan):
        alone = run([spec])
        assert alone.rows()[0] == batched.rows()[index]
        for name, values in alone.series[0].items():
            assert np.array_equal(values, batched.series[index][name]), name


class _Stop(Exception):
    pass


def test_in_flight_run_resumes_to_the_uninterrupted_result(bonds, start, reference, tmp_path):
    protocol = StabilityProtocol(ensemble="nvt-langevin", checkpoint_every_steps=40, **HOT)
    batching = Batching("in-flight", 81)
    whole = run_stability({"m": bonded_morse_model(*bonds)}, start, reference, protocol, progress=False)
    stopping = bonded_morse_model(*bonds)
    forward = stopping.forward

    def forward_then_stop(state, **kwargs):
        if stopping.calls == 250:
            raise _Stop
        return forward(state, **kwargs)

    stopping.forward = forward_then_stop
    with pytest.raises(_Stop):
        run_stability(
            {"m": stopping}, start, reference, protocol, tmp_path, progress=False, batching=batching
        )
    checkpoint = torch.load(tmp_path / "checkpoints" / "m.pt", weights_only=False)
    statuses = [entry["status"] for entry in checkpoint["entries"].values()]
    assert "active" in statuses and not checkpoint["finished"]  # stopped mid-run, with replicas waiting
    assert len(statuses) < len(whole.rows)
    resumed = run_stability(
        {"m": bonded_morse_model(*bonds)},
        start,
        reference,
        protocol,
        tmp_path,
        resume=True,
        progress=False,
        batching=batching,
    )
    _same(whole, resumed)


class _FakeRanks:
    """Rank R of N as a thread of this process: the sharding and gathering without torchrun.

    ``alive`` ranks meet at the barriers; with fewer alive than N, rank 0's end barrier reports a
    missing peer, as gloo does when a rank's process is gone.
    """

    def __init__(self, rank, world_size, sync):
        self.rank, self.world_size, self.sync = rank, world_size, sync

    def agree(self, check):
        if self.rank == 0:
            check()
        self.sync["start"].wait()

    def barrier(self):
        self.sync["end"].wait()
        return self.sync["alive"] == self.world_size

    def should_stop(self):
        return False


def _sharded(models, start, reference, protocol, out, world_size, alive, **kwargs):
    """run_stability on ranks 0..alive-1 of world_size, each in a thread; rank 0's result (or error)."""
    import threading

    sync = {"start": threading.Barrier(alive), "end": threading.Barrier(alive), "alive": alive}
    results = {}

    def rank_main(rank):
        try:
            results[rank] = run_stability(
                models[rank],
                start,
                reference,
                protocol,
                out,
                progress=False,
                ranks=_FakeRanks(rank, world_size, sync),
                **kwargs,
            )
        except Exception as error:  # handed to the test
            results[rank] = error

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(alive)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(results[rank] is None for rank in range(1, alive)), results
    return results[0]


def test_shards_gathered_by_rank_0_equal_one_process_and_resume_with_any_rank_count(
    bonds, start, reference, tmp_path
):
    protocol = StabilityProtocol(checkpoint_every_steps=50, **HOT)

    def models():
        return {"a": bonded_morse_model(*bonds), "b": bonded_morse_model(*bonds, depth_eV=2.0)}

    whole = run_stability(models(), start, reference, protocol, progress=False)
    out = tmp_path / "run"
    gathered = _sharded([models() for _ in range(3)], start, reference, protocol, out, 3, 3)
    _same(whole, gathered)
    names = sorted(p.name for p in checkpoint_files(out / "checkpoints", "a"))
    assert names == ["a.rank0-of-3.pt", "a.rank1-of-3.pt", "a.rank2-of-3.pt"]
    owned = {
        (m, r): torch.load(out / "checkpoints" / f"{m}.rank{r}-of-3.pt", weights_only=False)["owned"]
        for r in range(3)
        for m in "ab"
    }
    # round robin over both models' 16 replicas in plan order: a's 8 give ranks 0,1,2,0,1,2,0,1 and b's
    # continue at rank 2, so every rank gets 5 or 6 replicas
    assert owned[("a", 0)] == [0, 3, 6] and owned[("b", 0)] == [1, 4, 7]
    assert sorted(sum(len(owned[(m, r)]) for m in "ab") for r in range(3)) == [5, 5, 6]

    # rank 2 dies before it starts: rank 0 reports its replicas unfinished
    partial = tmp_path / "partial"
    error = _sharded([models() for _ in range(2)], start, reference, protocol, partial, 3, 2)
    assert isinstance(error, UnfinishedReplicas) and "rank(s) 2 of 3" in str(error)
    assert {item["rank"] for item in error.replicas} == {2}
    assert {(i["model"], i["temperature_K"], i["replica"]) for i in error.replicas} == {
        ("a", 300.0, 2),
        ("a", 5000.0, 1),
        ("b", 300.0, 0),
        ("b", 300.0, 3),
        ("b", 5000.0, 2),
    }
    # a single process finishes only those (rank 2's never started, so they start fresh in one batch):
    # the model computes their steps and one start evaluation each, nothing else
    counting = {"a": _counting_model(bonds), "b": bonded_morse_model(*bonds, depth_eV=2.0)}
    resumed = run_stability(counting, start, reference, protocol, partial, resume=True, progress=False)
    _same(whole, resumed)
    finished_by_resume = [item for item in error.replicas if item["model"] == "a"]
    steps = {
        (r["temperature_K"], r["replica"]): (
            protocol.n_steps if r["failure_step"] is None else r["failure_step"]
        )
        for r in whole.rows
        if r["model"] == "a"
    }
    expected = sum(steps[(i["temperature_K"], i["replica"])] for i in finished_by_resume)
    assert sum(counting["a"].sizes) == expected + len(finished_by_resume)


def test_batching_is_checked(bonds, start, reference):
    protocol = StabilityProtocol(time_ps=0.01)
    model = {"m": bonded_morse_model(*bonds)}
    with pytest.raises(GGNDError, match="on the CPU needs --max-batch-atoms"):
        run_stability(model, start, reference, protocol, progress=False, batching=Batching("in-flight"))
    with pytest.raises(GGNDError, match="smaller than one replica \\(27 atoms\\)"):
        run_stability(model, start, reference, protocol, progress=False, batching=Batching("binning", 20))
    with pytest.raises(GGNDError, match="does not run Nose-Hoover"):
        run_stability(
            model,
            start,
            reference,
            StabilityProtocol(time_ps=0.01, ensemble="nvt-nose-hoover"),
            progress=False,
            batching=Batching("in-flight", 100),
        )
    with pytest.raises(GGNDError, match="unknown batching 'fast'"):
        run_stability(model, start, reference, protocol, progress=False, batching=Batching("fast", 100))
