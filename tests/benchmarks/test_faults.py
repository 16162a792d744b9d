"""The fault-injection suite at CI size (benchmarks/faults.py runs the long version)."""

from faults import BAD, run_faults
from shard_faults import run_shard_kills


def test_no_traceback_signal_silent_answer_changed_index_or_lost_commit(tmp_path):
    res = run_faults(tmp_path, seed=0, scale=1, kills=12, log=lambda *a: None)
    bad = [(r["family"], r["damage"], r["args"], r["outcome"], r.get("stderr", "")[-200:]) for r in res["bad"]]
    assert not bad, bad
    counts = res["counts"]
    # every family ran and caught what it injected (a harness that injects nothing cannot pass)
    for family, least in (("checkpoint", 60), ("index", 30), ("input", 30), ("api", 45),
                          ("writers", 7), ("kill", 12)):
        assert counts[family].get("detected", 0) >= least, (family, counts[family])
    assert res["total"] >= 230 and not set().union(*counts.values()) & set(BAD)


def test_the_sharded_kill_families_keep_every_acknowledged_batch(tmp_path):
    """A few trials of benchmarks/shard_faults.py (faults.py runs 30 of each family)."""
    runs = run_shard_kills(tmp_path, seed=1, python=3, served=1, log=lambda *a: None)
    assert [r["family"] for r in runs] == ["shard-kill-python"] * 3 + ["shard-kill-served"]
    assert all(r["outcome"] == "kept" for r in runs), [r["why"] for r in runs]
    assert runs[-1]["acked"] > 0  # the clients wrote before the kill
