"""Sweep summaries (lego/sweep.py, scripts/summarize_sweep.py): mean ± std over seeds, paired gaps to baselines."""

import csv
import json
import math
from pathlib import Path

import pytest
from conftest import TINY as TINY_RUN, load_script
from conftest import lego_run
from omegaconf import OmegaConf

from lego.sweep import SweepSummary, read_full_depth, read_job_config, write_summary


# 2 configurations x 2 seeds; numbers chosen so that a per-seed pairing and an unpaired one differ.
JOBS = [  # (job dir, ratio, seed, ppl, standard_ppl, phase1_ppl, acc)
    ("0_hard_example_ratio=0.3,seed=0", 0.3, 0, 50.0, 40.0, 60.0, 0.25),
    ("1_hard_example_ratio=0.3,seed=1", 0.3, 1, 52.0, 44.0, 64.0, 0.375),
    ("2_hard_example_ratio=0.7,seed=0", 0.7, 0, 45.0, 50.0, 60.0, 0.5),
    ("3_hard_example_ratio=0.7,seed=1", 0.7, 1, 47.5, 48.0, 64.0, 0.5),
]


def _read_csv(path: Path) -> list:
    return list(csv.DictReader(path.read_text().splitlines()))


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):  # sample standard deviation, written out
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _fake_sweep(root: Path) -> Path:
    for name, ratio, seed, ppl, std_ppl, p1_ppl, acc in JOBS:
        job = root / name
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra/overrides.yaml").write_text(f"- hard_example_ratio={ratio}\n- seed={seed}\n- device=cpu\n")
        (job / "metrics.json").write_text(json.dumps({
            "ppl": ppl, "standard_ppl": std_ppl, "phase1_ppl": p1_ppl, "acc": acc, "seed": seed,
            "hard_ppl_ashem": 100.0,  # not a baseline of `ppl` (hard tokens only): no paired gap
            "train_macs_total": 1e9 * (1 + seed), "stages": ["phase1"], "wall_s": {"phase1": 1.0}, "ok": True}))
    (root / "4_unfinished").mkdir()
    return root


def test_summary_means_stds_and_paired_gaps(tmp_path):
    sweep = _fake_sweep(tmp_path)
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    rows = _read_csv(sweep / "summary.csv")
    assert [r["config"] for r in rows] == ["hard_example_ratio=0.3 device=cpu", "hard_example_ratio=0.7 device=cpu"]
    assert [r["n"] for r in rows] == ["2", "2"] and [r["seeds"] for r in rows] == ["0 1", "0 1"]
    for row, jobs in zip(rows, (JOBS[:2], JOBS[2:])):
        ppl, std_ppl, p1, acc = ([j[k] for j in jobs] for k in (3, 4, 5, 6))
        got = {k: float(v) for k, v in row.items() if k not in ("config", "n", "seeds")}
        expect = {"ppl": ppl, "standard_ppl": std_ppl, "phase1_ppl": p1, "acc": acc, "hard_ppl_ashem": [100.0] * 2,
                  "train_macs_total": [1e9, 2e9],
                  # paired by seed: (ppl - baseline) of the same job, and in percent of that baseline
                  "ppl_minus_standard": [a - b for a, b in zip(ppl, std_ppl)],
                  "ppl_minus_standard_pct": [100 * (a - b) / b for a, b in zip(ppl, std_ppl)],
                  "ppl_minus_phase1": [a - b for a, b in zip(ppl, p1)],
                  "ppl_minus_phase1_pct": [100 * (a - b) / b for a, b in zip(ppl, p1)]}
        assert set(got) == {f"{k}_{s}" for k in expect for s in ("mean", "std")}  # no seed, no dicts/bools
        for k, xs in expect.items():
            assert got[f"{k}_mean"] == pytest.approx(_mean(xs), rel=1e-12, abs=1e-12), k
            assert got[f"{k}_std"] == pytest.approx(_std(xs), rel=1e-12, abs=1e-12), k
    # the first configuration by hand: gaps 10 and 8 -> mean 9, std sqrt(2); 25% and 18.18...%
    assert float(rows[0]["ppl_minus_standard_mean"]) == 9.0
    assert float(rows[0]["ppl_minus_standard_std"]) == math.sqrt(2)
    assert float(rows[0]["ppl_minus_standard_pct_mean"]) == pytest.approx((25 + 800 / 44) / 2, rel=1e-12)
    # pairing matters: unpaired (mean of ppl minus mean of baseline) agrees on the mean, not on the std
    assert float(rows[1]["ppl_minus_standard_std"]) == pytest.approx(_std([45 - 50, 47.5 - 48]))
    assert float(rows[1]["ppl_minus_standard_std"]) != pytest.approx(math.hypot(_std([45, 47.5]), _std([50, 48])))
    md = (sweep / "summary.md").read_text()
    assert "| hard_example_ratio=0.3 | 2 | 0 1 | 51 ± 1.414 |" in md  # the shared override is listed once
    assert "Overrides shared by every configuration: `device=cpu`" in md


def test_one_seed_has_no_std_and_nothing_finished_writes_nothing(tmp_path):
    assert write_summary(tmp_path) == [] and not (tmp_path / "summary.csv").exists()
    job = tmp_path / "0_x=1"
    job.mkdir()
    (job / "metrics.json").write_text(json.dumps({"ppl": 3.0}))
    (row,) = write_summary(tmp_path)
    assert row == {"config": "", "_overrides": [], "n": 1, "seeds": "?", "ppl_mean": 3.0, "ppl_std": None}  # no seed
    assert "| (defaults) | 1 | ? | 3 |" in (tmp_path / "summary.md").read_text()


def test_summarize_sweep_script_keeps_its_command_line(tmp_path, capsys):
    mod = load_script("summarize_sweep")
    sweep = _fake_sweep(tmp_path / "s")
    assert mod.main([str(sweep)]) == 0
    assert "51 ± 1.414" in capsys.readouterr().out
    assert len(_read_csv(sweep / "summary.csv")) == 2
    assert mod.main([str(tmp_path / "nope")]) == 2
    (tmp_path / "empty").mkdir()
    assert mod.main([str(tmp_path / "empty")]) == 2


TINY = [*TINY_RUN, "eval.standard_baseline=false"]  # debug=tiny, one thread


@pytest.mark.slow
def test_multirun_writes_summary_at_the_sweep_root(tmp_path):
    """`lego-run -m seed=0,1` (main in this process; tests/test_cli.py drives a sweep in a subprocess)."""
    # microseconds in the sweep dir: the callback must see the very directory the jobs were written to
    args = ["-m", "seed=0,1", *TINY, "hydra.sweep.dir=sweep/${now:%H-%M-%S-%f}"]  # the callback is on by default
    res = lego_run(args, cwd=tmp_path, env={"LEGO_CACHE_DIR": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr[-3000:]
    (sweep,) = (tmp_path / "sweep").iterdir()
    jobs = sorted(sweep.glob("*/metrics.json"))
    assert len(jobs) == 2
    metrics = [json.loads(p.read_text()) for p in jobs]
    assert [m["seed"] for m in metrics] == [0, 1]
    (row,) = _read_csv(sweep / "summary.csv")
    assert row["n"] == "2" and row["seeds"] == "0 1" and "seed" not in row["config"]
    for k in ("ppl", "acc", "flop_cost", "no_routing_ppl"):
        xs = [m[k] for m in metrics]
        assert float(row[f"{k}_mean"]) == pytest.approx(_mean(xs), rel=1e-12)
        assert float(row[f"{k}_std"]) == pytest.approx(_std(xs), rel=1e-12, abs=1e-12)
    gaps = [m["ppl"] - m["no_routing_ppl"] for m in metrics]
    assert float(row["ppl_minus_no_routing_mean"]) == pytest.approx(_mean(gaps), rel=1e-12, abs=1e-12)


def test_ranking_orders_variants_by_gap_at_inference_cost_and_flags_the_moonshot(tmp_path):
    # (variant, seed, gap at inference cost, gap at training compute, flop_cost)
    jobs = [("spec", 0, 9.0, 5.0, 0.70), ("spec", 1, 11.0, 7.0, 0.72),
            ("copy", 0, 1.0, 1.5, 0.74), ("copy", 1, 3.0, 2.5, 0.74),  # mean gap 2.0 <= 2, cost 0.74: reached
            ("finetune", 0, 4.0, -1.0, 0.80), ("finetune", 1, 4.0, 1.0, 0.80),  # best at training compute, too dear
            ("spec_bytes", 0, 6.0, -7.0, 0.71), ("spec_bytes", 1, 6.0, -5.0, 0.71)]  # dense 2 layers beat dense 4
    for i, (variant, seed, g_inf, g_train, cost) in enumerate(jobs):
        g_best = g_inf if variant == "spec_bytes" else g_train  # the best dense model: a shallower one, or the deep one
        job = tmp_path / f"{i}_+variant={variant},seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra/overrides.yaml").write_text(f"- +variant={variant}\n- seed={seed}\n")
        (job / "metrics.json").write_text(json.dumps({
            "ppl": 10.0, "seed": seed, "flop_cost": cost, "gap_at_inference_cost_pct": g_inf,
            "gap_at_training_compute_pct": g_train, "gap_to_best_dense_pct": g_best}))
    write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    ranking = md[md.index("## Ranked by the gap to the dense frontier"):].splitlines()
    rows = [line.split(" | ") for line in ranking if line.startswith("| ") and line[2].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("| 1", "+variant=copy"), ("| 2", "+variant=finetune"),
                                            ("| 3", "+variant=spec_bytes"), ("| 4", "+variant=spec")]
    assert [r[-2] for r in rows] == ["3", "2", "1", "4"]  # rank at equal training compute
    # spec_bytes is 6% better than the dense 4-layer model at 0.71 of its cost, but a shallower dense model is better
    assert [r[-1] for r in rows] == ["yes |", "no |", "hollow |", "no |"]
    # copy: ppl, no hard/easy numbers, cost, no MACs, then gap at inference cost (1, 3), at training compute
    assert rows[0][2:10] == ["2", "10 ± 0", "", "", "0.74 ± 0", "", "2 ± 1.414", "2 ± 0.7071"]


def test_no_dense_frontier_no_ranking(tmp_path):
    job = tmp_path / "0_x=1"
    job.mkdir()
    (job / "metrics.json").write_text(json.dumps({"ppl": 3.0, "flop_cost": 0.5}))
    write_summary(tmp_path)
    assert "Ranked" not in (tmp_path / "summary.md").read_text()


def test_moonshot_on_chains_needs_the_answers_of_every_hop_count(tmp_path):
    # both configs are within 2% of the dense 2-layer model at 0.7 of its cost; "far" answers 1-hop queries
    # 3 points below it in one seed and 1 point in the other (mean 2 points: still within), and 2-hop ones
    # 1 and 5 points below (mean 3: too far); the dense 1-layer model is worse everywhere
    accs = {"near": [(0.99, 0.98), (0.985, 0.99)], "far": [(0.97, 0.99), (0.99, 0.95)]}
    for i, (variant, seed) in enumerate([("near", 0), ("near", 1), ("far", 0), ("far", 1)]):
        a1, a2 = accs[variant][seed]
        job = tmp_path / f"{i}_+variant={variant},seed={seed}"
        (job / ".hydra").mkdir(parents=True)
        (job / ".hydra/overrides.yaml").write_text(f"- +variant={variant}\n- seed={seed}\n")
        (job / ".hydra/config.yaml").write_text("blocks: null\nphase1:\n  layers: 1\nphase2:\n  layers: 2\n")
        (job / "metrics.json").write_text(json.dumps({
            "ppl": 3.0, "seed": seed, "flop_cost": 0.7, "gap_at_inference_cost_pct": 1.0,
            "gap_at_training_compute_pct": 1.0, "gap_to_best_dense_pct": 1.0,
            "acc_hops1_ashem": a1, "acc_hops2_ashem": a2, "acc_hops1_dense2": 1.0, "acc_hops2_dense2": 1.0,
            "acc_hops1_dense1": 0.4, "acc_hops2_dense1": 0.6}))
    rows = {r["config"]: r for r in write_summary(tmp_path)}
    assert rows["+variant=near"]["answer_gap_hops1_mean"] == pytest.approx(-0.0125)
    assert rows["+variant=far"]["answer_gap_hops1_mean"] == pytest.approx(-0.02)
    assert rows["+variant=far"]["answer_gap_hops2_mean"] == pytest.approx(-0.03)
    md = (tmp_path / "summary.md").read_text()
    ranking = md[md.index("## Ranked by the gap to the dense frontier"):].splitlines()
    verdicts = {r.split(" | ")[1]: r.split(" | ")[-1] for r in ranking if r.startswith("| ") and r[2].isdigit()}
    assert verdicts == {"+variant=near": "yes |", "+variant=far": "no |"}


def test_full_depth_is_the_last_block(tmp_path):
    (tmp_path / ".hydra").mkdir()
    assert read_full_depth(read_job_config(tmp_path)) is None
    (tmp_path / ".hydra/config.yaml").write_text("blocks: [2, 4, 6]\nphase2:\n  layers: 4\n")
    assert read_full_depth(read_job_config(tmp_path)) == 6
    (tmp_path / ".hydra/config.yaml").write_text("blocks: null\nphase2:\n  layers: 4\n")
    assert read_full_depth(read_job_config(tmp_path)) == 4
