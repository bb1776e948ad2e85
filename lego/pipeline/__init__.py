"""What the stages of `lego.stages` share, none of it a stage (torchtune keeps recipes apart from the library):

- setup: the torch set-up, the loaders, `RunContext` (what every stage reads) and the run's `evaluator`
- science: the config that decides results (the run-dir claim, the model cache's keys)
- results: a result on disk, read or computed (rank 0 writes, others read), or required from an earlier run
- cache: the content-addressed cache of trained models
- train: `train_block`, the optimizer / schedule / fit skeleton every trained model runs through
- standard: a standard LM on every token (phase 1, the dense baselines), through the cache
- mining: the threshold at an exit, and the loaders of hard sequences
- upper: an upper Block grown on the model below and trained on its hard tokens (phase 2, later Blocks)
- compute: what training cost (the pipeline's records, mining, the dense baselines' budgets)
- verdict: the routed model against the dense frontier
"""
