"""Several processes, one run: lego.distributed's collectives in a 2-process gloo group, and a
whole `torchrun --nproc_per_node=2 -m lego` run on CPU checked against a single process."""

import copy
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import TINY as TINY_RUN

from lego import distributed
from lego.confidence import exact_quantile


# -- collectives, in a 2-process gloo group ----------------------------------------------------------
def _rows(rank: int) -> torch.Tensor:
    """Uneven per-rank data: 7 values on rank 0, 12 on rank 1."""
    return torch.rand(7 + 5 * rank, generator=torch.Generator().manual_seed(rank))


def _batches(seed: int, n: int = 4, b: int = 3, t: int = 8, vocab: int = 16):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, vocab, (n, b, t + 1), generator=g)
    return [(s[:, :-1].clone(), s[:, 1:].clone()) for s in seq]


def _ddp_equals_one_process(rank: int) -> None:
    """In a joined 2-rank group: two epochs of DDP training equal one process stepping on the mean of both
    ranks' losses, and every rank ends with bit-identical weights."""
    from lego.config import create_standard_config
    from lego.model import DeepSupervisionTransformer
    from lego.training import Trainer

    torch.manual_seed(0)
    model = DeepSupervisionTransformer(16, 16, 2, 2, max_seq_len=8)
    reference = copy.deepcopy(model)
    trainer = Trainer(create_standard_config(2), 16, "cpu", progress=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    shards = [_batches(0), _batches(1)]
    for epoch in (1, 2):
        loss = trainer.train_epoch(model, shards[rank], opt, epoch)
        ref_sum = ref_n = 0.0
        for both in zip(*shards):
            ref_opt.zero_grad()
            parts = [trainer.stage_loss_sum(reference, x, y) for x, y in both]
            sum(total / n for total, n in parts).div(2).backward()
            torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
            ref_opt.step()
            ref_sum += sum(float(total) for total, _ in parts)
            ref_n += sum(float(n) for _, n in parts)  # stage_loss_sum's count is a 0-d tensor
        assert loss == pytest.approx(ref_sum / ref_n, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    # ... and every rank holds bit-identical weights
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(distributed.broadcast(flat), flat)


def _worker(rank: int, init_file: str) -> None:
    from lego.batches import make_loader

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        assert distributed.is_distributed() and distributed.world_size() == 2 and distributed.rank() == rank

        # uneven lengths come back whole, in rank order; the quantile is the single-process one
        full = torch.cat([_rows(0), _rows(1)])
        gathered = distributed.all_gather_varlen(_rows(rank))
        assert torch.equal(gathered, full)
        for q in (0.1, 0.5, 0.73):
            assert exact_quantile(gathered, q) == exact_quantile(full, q) == float(torch.quantile(full, q))
        rows2d = distributed.all_gather_varlen(torch.full((rank, 3), rank, dtype=torch.long))  # 0 rows on rank 0
        assert rows2d.tolist() == [[1, 1, 1]]
        assert distributed.all_reduce_sum([1.5, rank]) == [3.0, 1.0]
        assert distributed.broadcast({"rank": rank}) == {"rank": 0}
        assert distributed.common_steps(5 + rank, 8) == 4 and distributed.common_steps(5 + rank, None) == 5

        # training batches: rank r takes batches r, r+2, ... of the very epoch a single process sees
        tokens = torch.arange(1000).numpy()
        for shuffle in (True, False):
            whole = make_loader(tokens, 8, 5, shuffle=shuffle, seed=3)
            mine = make_loader(tokens, 8, 5, shuffle=shuffle, seed=3, rank=rank, world_size=2)
            for epoch in (1, 2):
                whole.sampler.set_epoch(epoch)
                mine.sampler.set_epoch(epoch)
                expect = [x for x, _ in whole][rank::2]
                got = [x for x, _ in mine]
                assert len(got) == len(mine) == len(expect) and all(torch.equal(a, b) for a, b in zip(got, expect))

        _ddp_equals_one_process(rank)

        # Hydra's ${now:...} reads rank 0's clock, even when rank 1's runs 3 s ahead
        import hydra.core.utils as hydra_utils
        from omegaconf import OmegaConf

        real_time = time.time
        if rank == 1:
            time.time = lambda: real_time() + 3.0
        try:
            extra = distributed.hydra_args(["seed=1"])
        finally:
            time.time = real_time
        assert extra == (["seed=1"] if rank == 0 else ["seed=1", "++hydra.output_subdir=null",
                                                       "++hydra.job_logging.root=null"])
        hydra_utils.setup_globals()
        stamp = OmegaConf.create({"d": "${now:%Y-%m-%d_%H-%M-%S.%f}"}).d
        assert distributed.broadcast(stamp) == stamp
    finally:
        dist.destroy_process_group()


def test_collectives_sharding_and_ddp_in_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=2, join=True)


def test_single_process_helpers_are_identity():
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    t = torch.rand(5)
    assert distributed.all_gather_varlen(t) is t
    assert distributed.all_reduce_sum([1, 2.5]) == [1, 2.5]
    assert distributed.common_steps(10, 3) == 3 and distributed.common_steps(10, None) is None
    assert distributed.hydra_args(["a=1"]) == ["a=1"]
    distributed.barrier()
    assert distributed.setup() is False  # no WORLD_SIZE > 1 in this process


# -- Slurm tasks and sweep jobs ---------------------------------------------------------------------
def _slurm_task() -> None:
    """One task of `srun --ntasks=2` (run in a subprocess): joins from Slurm's variables alone."""
    torch.set_num_threads(1)
    rank = int(os.environ["SLURM_PROCID"])
    assert distributed.launched() and distributed.setup()
    try:
        assert (distributed.rank(), distributed.world_size(), distributed.local_rank()) == (rank, 2, rank)
        assert os.environ["MASTER_ADDR"] == "localhost"  # the first node of SLURM_JOB_NODELIST
        _ddp_equals_one_process(rank)
    finally:
        distributed.teardown()


def test_two_slurm_tasks_are_one_ddp_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    base.update(SLURM_NTASKS="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost,other[1-3]",
                MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_distributed as t; t._slurm_task()"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=dict(base, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)


@pytest.mark.slow
def test_slurm_tasks_train_phase1_as_torchrun_does(tmp_path):
    """`python -m lego` started twice as Slurm tasks (no torchrun) writes one run whose phase-1 weights
    equal, bit for bit, those of the same command under `torchrun --nproc_per_node=2`."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    args = ["-m", "lego", *TINY, "stages=[phase1]", "phase1.max_epochs=1", "phase1.cache=false"]
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", *args,
                          "hydra.run.dir=torchrun"], cwd=tmp_path, env=dict(env, LEGO_CACHE_DIR=str(tmp_path / "c1")),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slurm = dict(env, LEGO_CACHE_DIR=str(tmp_path / "c2"), SLURM_NTASKS="2", SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(port))
    procs = [subprocess.Popen([sys.executable, *args, "hydra.run.dir=slurm"], cwd=tmp_path,
                              env=dict(slurm, SLURM_PROCID=str(r), SLURM_LOCALID=str(r)), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert all(f"run dir: {tmp_path / 'slurm'}" in o for o in outs)  # both tasks in the one directory
    assert (tmp_path / "slurm/phase1/history.jsonl").read_text().count("\n") == 1  # written once, by rank 0
    ours, theirs = (torch.load(tmp_path / d / "phase1/model.pt", weights_only=True)["state_dict"]
                     for d in ("slurm", "torchrun"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_slurm_env_maps_to_torchrun_names():
    job = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234567",
           "SLURM_JOB_NODELIST": "gpu[07-08,12],cpu01"}
    assert distributed.slurm_env(job) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1",
                                          "MASTER_ADDR": "gpu07", "MASTER_PORT": str(15000 + 1234567 % 20000)}
    given = distributed.slurm_env({**job, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"})
    assert (given["MASTER_ADDR"], given["MASTER_PORT"]) == ("10.0.0.1", "29500")
    assert distributed.slurm_env({**job, "WORLD_SIZE": "16"}) == {}  # srun torchrun ...: torchrun's own
    assert distributed.slurm_env({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "2"}) == {}  # no task of a step
    assert [distributed.first_host(n) for n in ("node1", "a,b", "x[3]", "gpu[07-09,12]", "r1n[002,005]")] == \
        ["node1", "a", "x3", "gpu07", "r1n002"]


def test_sweep_jobs_take_distinct_slots_and_gpus(tmp_path):
    with distributed.job_slot(tmp_path) as a, distributed.job_slot(tmp_path) as b:
        assert (a, b) == (0, 1)
        with distributed.job_slot(tmp_path) as c:
            assert c == 2
    with distributed.job_slot(tmp_path) as again:  # freed slots are taken again, lowest first
        assert again == 0
    assert [distributed.gpu_for_slot(s, 4) for s in range(6)] == [0, 1, 2, 3, 0, 1]
    assert [distributed.gpu_for_slot(s, 2) for s in range(3)] == [0, 1, 0]
    assert distributed.gpu_for_slot(3, 1) is None and distributed.gpu_for_slot(0, 0) is None  # one GPU or CPU


# -- a whole run under torchrun ------------------------------------------------------------------
TINY = [*TINY_RUN, "data.eval_batch_size=32", "phase1.max_epochs=2", "phase2.max_epochs=2", "eval.standard_baseline=false"]


@pytest.mark.slow
def test_torchrun_two_processes_writes_one_run_with_the_global_threshold(tmp_path):
    from lego.ashem import compute_confidence_threshold
    from lego.batches import make_loader
    from lego.checkpoint import load_model
    from lego.config import DataConfig
    from lego.data import load_corpus

    env = dict(os.environ, LEGO_CACHE_DIR=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "lego", *TINY,
           "hydra.run.dir=run"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    d = tmp_path / "run"
    assert res.stdout.count(f"run dir: {d}") == 2  # both ranks ran in the same directory

    # one set of files: what a single-process run writes, once, nothing per rank
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()
                   and "cache" not in p.relative_to(tmp_path).parts)
    assert files == sorted(f"run/{f}" for f in [
        ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", ".lego/hydra/config.yaml",
        ".lego/hydra/hydra.yaml", ".lego/hydra/overrides.yaml", ".lock", "config_resolved.yaml",
        "eval/metrics.json", "generate/config.json", "generate/metrics.json", "generate/samples.md",
        "hard_examples/threshold.json", "lego.log", "metrics.json", "metrics/phase1.csv", "metrics/phase2.csv",
        "metrics/summary.json", "phase1/cache.json",
        "phase1/history.jsonl", "phase1/model.pt", "phase1/result.json", "phase2/cache.json", "phase2/history.jsonl",
        "phase2/model.pt", "phase2/result.json", "run.json", "tokenizer/tokenizer.json"]), files
    log_text = (d / "lego.log").read_text()
    assert log_text.count("phase1 epoch 1:") == 1 and log_text.count("phase2 epoch 2:") == 1
    for phase in ("phase1", "phase2"):
        assert [json.loads(r)["epoch"] for r in (d / phase / "history.jsonl").read_text().splitlines()] == [1, 2]
    summary = json.loads((d / "metrics.json").read_text())
    assert summary["world_size"] == 2

    # the threshold is the exact quantile over every rank's validation tokens: a single process
    # computing it with the saved phase-1 model over the same tokens gets the same number
    info = json.loads((d / "hard_examples/threshold.json").read_text())
    state = torch.load(d / "phase1/model.pt", weights_only=True)
    model = load_model(d / "phase1/model.pt", state["model_args"], "cpu", "phase1")
    data = DataConfig(**state["config"]["data"])
    data.cache_dir = str(tmp_path / "cache")
    corpus = load_corpus(data)
    loader = make_loader(corpus.validation, data.seq_len, data.eval_batch_size, shuffle=False, seed=42)
    single = compute_confidence_threshold(model, loader, 0.5, "cpu")
    assert info["threshold"] == single
    assert info["num_tokens"] == (len(corpus.validation) // (data.seq_len + 1)) * data.seq_len
    assert summary["threshold"] == single

    # the same command again finishes from the files (every rank skips what rank 0 finds on disk)
    before = (d / "phase2/model.pt").stat().st_mtime_ns
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-4000:]
    assert (d / "phase2/model.pt").stat().st_mtime_ns == before
    assert json.loads((d / "metrics.json").read_text())["ppl"] == summary["ppl"]
    # another config in that directory: refused with the key named, and no rank hangs (torchrun
    # stops the others once one has failed, so their own error line may or may not get printed)
    other = subprocess.run([*cmd, "phase1.lr=5e-3"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert other.returncode != 0
    assert "holds a run with another config (phase1.lr" in other.stderr
    # a run dir in use: rank 0 cannot take the lock and every rank stops with the same line; no
    # rank waits on a peer that has gone (that ended in a gloo "Connection closed" traceback).
    # torchrun's own launcher still prints its ChildFailedError traceback: that one is not ours.
    from lego.artifacts import file_lock

    with file_lock(d / ".lock"):
        busy = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert busy.returncode != 0
    assert f"lego-run: error: run dir {d} is in use by another lego-run process" in busy.stderr, busy.stderr[-3000:]
    assert "Connection closed" not in busy.stderr and "lego/" not in busy.stderr.split("ChildFailedError")[0], \
        busy.stderr[-3000:]
