"""Stage `generate` in a run: its files, `stages=[generate]` on a finished run, bad input.

One tiny finished run (`finished`) serves the module; the bad-input checks call `lego-run`'s
main in this process (tests/test_faults.py drives the console script) and stop at validation
(no training).
"""

import json
import shutil

import pytest
from conftest import TINY, lego_run, tiny_config

from lego.config import ConfigError
from lego.run import run

DECODERS = ["dense", "routed", "speculative_k2", "speculative_k4"]  # debug=tiny's: every decoder, k = 2 and 4


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("genstage")
    cfg = tiny_config(root / "cache", **{"eval.standard_baseline": False})
    summary = run(cfg, root / "run")
    return {"root": root, "run": root / "run", "summary": summary}


def _config(ws, **overrides):
    return tiny_config(ws["root"] / "cache", **{"eval.standard_baseline": False, **overrides})


def test_run_writes_samples_and_metrics(finished):
    d = finished["run"] / "generate"
    metrics = json.loads((d / "metrics.json").read_text())
    assert [k for k in metrics if k != "settings"] == DECODERS
    assert metrics["settings"]["max_new_tokens"] == 8 and metrics["settings"]["num_prompts"] == 2
    for name in DECODERS:
        assert metrics[name]["tokens"] == 2 * 8, name
    # greedy: speculative decoding reproduces dense decoding token for token
    assert metrics["speculative_k2"]["agreement_with_dense"] == metrics["speculative_k4"]["agreement_with_dense"] == 1
    samples = (d / "samples.md").read_text()
    assert samples.count("## Prompt") == 2 and all(f"**{name}**" in samples for name in DECODERS)
    s = finished["summary"]
    assert "generate" in s["wall_s"] and s["gen_speculative_k"] in (2, 4)
    assert s["gen_speculative_speedup"] > 0 and 0 <= s["gen_acceptance_rate"] <= 1
    assert s["gen_routed_exit_share"] == metrics["routed"]["exit_share"]


def test_generate_alone_on_a_finished_run_does_not_retrain(finished):
    d = finished["run"]
    before = (d / "generate/samples.md").read_text()
    mtimes = {p: (d / p).stat().st_mtime_ns for p in ("phase1/model.pt", "phase2/model.pt")}
    shutil.rmtree(d / "generate")
    summary = run(_config(finished, stages=["generate"]), d)
    assert (d / "generate/samples.md").read_text() == before  # greedy and seeded: the same text
    assert (d / "generate/metrics.json").exists()
    assert {p: (d / p).stat().st_mtime_ns for p in mtimes} == mtimes
    assert set(summary["wall_s"]) == {"data", "generate"}
    assert summary["ppl"] == finished["summary"]["ppl"]  # the summary keeps the finished run's numbers


def test_other_generate_settings_regenerate_in_the_same_run_dir(finished):
    d = finished["run"]
    cfg = _config(finished, stages=["generate"])
    cfg.generate.prompt, cfg.generate.decoders = "To be", ["dense", "routed"]
    run(cfg, d)  # generate keys are not part of the run-dir claim: no refusal
    metrics = json.loads((d / "generate/metrics.json").read_text())
    assert [k for k in metrics if k != "settings"] == ["dense", "routed"]
    assert metrics["settings"]["prompt_lens"] == [5]  # byte tokens
    assert "To be" in (d / "generate/samples.md").read_text()
    stamp = (d / "generate/metrics.json").stat().st_mtime_ns
    run(cfg, d)  # the same settings again: skipped
    assert (d / "generate/metrics.json").stat().st_mtime_ns == stamp


def test_text_prompt_too_long_for_the_model_is_refused(finished):
    cfg = _config(finished, stages=["generate"])
    cfg.generate.prompt = "To be, or not to be"  # 19 byte tokens > model.max_seq_len=16
    with pytest.raises(ConfigError, match="model.max_seq_len"):
        run(cfg, finished["run"])


def test_adaptive_drafting_with_its_own_calibrated_threshold(finished):
    """generate.draft_agreement: the threshold is calibrated on validation (draft_threshold.json: the agreement at
    or above it meets the target); the adaptive runs stop drafting below it, and stay exact (greedy)."""
    d = finished["run"]
    run(_config(finished, stages=["generate"], **{"generate.adaptive": True, "generate.draft_agreement": 0.3}), d)
    info = json.loads((d / "generate/draft_threshold.json").read_text())
    assert info["target"] == 0.3 and info["tokens"] > 0 and 0 <= info["draft_share"] <= 1
    assert info["draft_share"] == 0 or info["agreement"] >= 0.3
    metrics = json.loads((d / "generate/metrics.json").read_text())
    assert metrics["settings"]["draft_threshold"] == info["threshold"]
    assert metrics["settings"]["draft_threshold"] != metrics["settings"]["routing_threshold"]
    for k in (2, 4):
        assert metrics[f"speculative_adaptive_k{k}"]["agreement_with_dense"] == 1


def test_disabled_generation_writes_nothing(tmp_path, finished):
    d = tmp_path / "run"
    shutil.copytree(finished["run"], d)
    shutil.rmtree(d / "generate")
    summary = run(_config(finished, stages=["generate"], **{"generate.enabled": False}), d)
    assert not (d / "generate").exists() and "gen_speculative_speedup" not in summary


BAD_INPUT = [
    ("empty_prompt", ['generate.prompt=""'], ["generate.prompt", "empty"]),
    ("max_new_tokens_0", ["generate.max_new_tokens=0"], ["generate.max_new_tokens", "positive"]),
    ("beyond_max_seq_len", ["generate.prompt_len=10", "generate.max_new_tokens=8"],
     ["generate.max_new_tokens=8", "generate.prompt_len=10", "model.max_seq_len=16"]),
    ("k_0", ["generate.k_values=[0]"], ["generate.k_values", "positive"]),
    ("unknown_decoder", ["generate.decoders=[nope]"], ["generate.decoders", "nope", "dense, routed, speculative"]),
    ("draft_agreement_0", ["generate.draft_agreement=0"], ["generate.draft_agreement=0", "(0, 1]"]),
]


@pytest.mark.parametrize("name,args,words", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_generate_input_is_one_clear_line(tmp_path, name, args, words):
    res = lego_run([*TINY, *args, "hydra.run.dir=run"], cwd=tmp_path,
                   env={"LEGO_CACHE_DIR": str(tmp_path / "cache"), "HYDRA_FULL_ERROR": "0"})
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 2 and lines[0].startswith("lego-run: error: ") and lines[1].startswith("run dir: "), lines
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in res.stderr + res.stdout


def test_generation_lengths_follow_the_context_unless_set():
    """`lego-run model.max_seq_len=32 data.seq_len=32` says nothing about generation, so generation fits the
    context (prompts of 16 tokens, 16 new ones) instead of refusing a value the user never typed; an explicit
    impossible value is still refused, naming the keys that were typed."""
    from conftest import compose_config

    from lego.cli import to_config
    from lego.config import ConfigError, resolve, validate

    cfg = resolve(to_config(compose_config(["model.max_seq_len=32", "data.seq_len=32"])))
    validate(cfg)
    assert (cfg.generate.prompt_len, cfg.generate.max_new_tokens) == (16, 16)
    default = resolve(to_config(compose_config([])))
    assert (default.generate.prompt_len, default.generate.max_new_tokens) == (32, 32)  # max_seq_len 256
    typed = to_config(compose_config(["model.max_seq_len=32", "data.seq_len=32", "generate.prompt_len=30",
                                      "generate.max_new_tokens=8"]))
    with pytest.raises(ConfigError, match=r"^generate.max_new_tokens=8: generate.prompt_len=30 .* model.max_seq_len=32"):
        validate(typed)


def test_generate_batch_size_is_checked_where_the_config_is():
    from conftest import compose_config

    from lego.cli import to_config
    from lego.config import ConfigError, resolve, validate

    validate(resolve(to_config(compose_config(["generate.batch_size=1"]))))
    with pytest.raises(ConfigError, match=r"^generate.batch_size=0 must be a positive integer$"):
        validate(resolve(to_config(compose_config(["generate.batch_size=0"]))))
