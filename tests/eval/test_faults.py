"""The fault-injection suite at CI size (benchmarks/faults.py runs the long version)."""

from hashret.eval.faults import BAD, run_faults


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
