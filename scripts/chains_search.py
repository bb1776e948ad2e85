"""Search data=chains settings where depth pays: dense models of two depths at equal training MACs.

    python scripts/chains_search.py --name v4h3 --depths 2 4 --steps-shallow 3000 -- \\
        data=chains data.chains.num_vars=4 'data.chains.depth_probs=[0.34,0.33,0.33]' model.dim=64

For one setting (Hydra overrides after `--`, composed with the packaged config as `lego-run` composes them),
trains a dense model of each depth on all tokens with phase 1's optimizer and schedule, the deeper ones for
the steps that match the shallowest one's training MACs (to the nearest step), and scores each on the
validation split by token label (accuracy and ppl per hop count, `lego.labels.label_table`). Writes
<out>/<name>.json (settings, steps, MACs, seconds, per-label tables) and appends a line to <out>/search.md.
Choose on validation: the test split is not read.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from lego.batches import make_loader
from lego.cli import to_config
from lego.config import resolve
from lego.cost import dense_training_macs, steps_for_macs
from lego.data import load_corpus
from lego.labels import label_table, labelled_tokens
from lego.pipeline.compute import cost_shape
from lego.pipeline.setup import make_loaders, setup_torch
from lego.pipeline.standard import train_standard

CONF = Path(__file__).resolve().parents[1] / "lego" / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--depths", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps-shallow", type=int, required=True, help="optimizer steps of the shallowest model")
    ap.add_argument("--budget-depth", type=int, default=None,
                    help="the depth whose --steps-shallow steps set the budget (default: the shallowest trained)")
    ap.add_argument("--out", type=Path, default=Path("outputs/reference/chains_search"))
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = resolve(to_config(compose(config_name="config", overrides=["progress=false", *a.overrides])))
    device = setup_torch(cfg)
    corpus = load_corpus(cfg.data)
    loaders = make_loaders(cfg, corpus, device=device)
    shape = cost_shape(cfg, corpus.vocab_size)
    tokens = cfg.data.batch_size * cfg.data.seq_len
    budget = a.steps_shallow * dense_training_macs(tokens=tokens, num_layers=a.budget_depth or min(a.depths),
                                                   **shape)
    work = a.out / "runs" / a.name
    record = {"name": a.name, "overrides": a.overrides, "train_tokens": len(corpus.train), "budget_macs": budget,
              "models": {}}
    for depth in sorted(a.depths):
        steps = steps_for_macs(budget, dense_training_macs(tokens=tokens, num_layers=depth, **shape))
        t0 = time.time()
        model = train_standard(cfg, corpus, loaders, depth, work / f"dense{depth}", device, f"dense{depth}", steps)
        seconds = time.time() - t0
        val = make_loader(corpus.validation, cfg.data.seq_len, cfg.data.eval_batch_size, shuffle=False,
                          seed=cfg.seed, labels=corpus.labels["validation"])
        tok = labelled_tokens(model, val, device, progress=False)
        table = label_table(tok["label"], tok["nll_deep"], tok["ok_deep"])
        hist = [json.loads(x) for x in (work / f"dense{depth}" / "history.jsonl").read_text().splitlines()]
        record["models"][str(depth)] = {"steps": steps, "train_s": seconds, "by_label": table,
                                        "val_losses": [h.get("val_loss") for h in hist]}
        print(f"{a.name} dense{depth}: {steps} steps, {seconds:.0f} s, " + ", ".join(
            f"{k} {v['acc']:.3f}" for k, v in table.items() if "hops" in k) + f", ppl {table['all']['ppl']:.3f}",
            flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{a.name}.json").write_text(json.dumps(record, indent=1))
    d = [str(x) for x in sorted(a.depths)]

    def deep_acc(t):  # accuracy on answers of 2+ hops
        rows = [v for k, v in t.items() if k.endswith("hops") and int(k.split()[0]) >= 2]
        return sum(r["correct"] for r in rows) / max(1, sum(r["n_tokens"] for r in rows))

    lo, hi = record["models"][d[0]]["by_label"], record["models"][d[-1]]["by_label"]
    if len(d) == 1:  # one depth: its numbers in both columns of the table
        d = [d[0], d[0]]
    line = (f"| {a.name} | {' '.join(a.overrides)} | {a.steps_shallow} | "
            f"{deep_acc(lo):.3f} | {deep_acc(hi):.3f} | {lo['all']['ppl']:.3f} | {hi['all']['ppl']:.3f} | "
            f"{sum(m['train_s'] for m in record['models'].values()):.0f} |\n")
    md = a.out / "search.md"
    if not md.exists():
        md.write_text(f"| name | overrides | steps (dense {d[0]}) | 2+ hop acc dense {d[0]} | 2+ hop acc dense {d[-1]} "
                      f"| val ppl dense {d[0]} | val ppl dense {d[-1]} | seconds |\n|---|---|---|---|---|---|---|---|\n")
    with md.open("a") as f:
        f.write(line)
    print(line, end="")


if __name__ == "__main__":
    main()
