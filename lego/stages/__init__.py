"""The stages of a LEGO run, one recipe a file: `run(ctx, ...)` computes a stage's result in its directory of
the run dir (or reads it when it is already there) and returns it; `load(ctx, ...)` reads what an earlier
invocation wrote, for runs whose `stages` leave the stage out. `lego.run` calls them in order:

    phase1 -> hard_examples -> phase2 -> blocks (Blocks 3, 4, ...) -> baselines -> eval -> generate

The library pieces they share (loaders, the model cache, the training skeleton, compute accounting) are in
`lego.pipeline`.

Words: a *stage* is one step of that list (the `stages` key names phase1, hard_examples, phase2, eval and
generate; blocks runs with phase2, baselines with eval). A *training* is one model trained to its budget
(phase1, phase2, block3, dense4, ...): its directory holds model.pt, history.jsonl and result.json. A
`StageConfig` (the specification's name) is one term of a training loss: a range of layers and a weight.
"""
