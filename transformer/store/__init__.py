"""The run store: a run directory's layout (`RunDir`, `load_run`) and its Orbax checkpoints.

Below training and evaluation, which both open runs; imports the model (to shape a restore
target) and the data layer's tokenizer, nothing above.

  rundir      RunDir: config.json, tokenizer.json, checkpoints/, metrics.jsonl; load_run
  checkpoint  Orbax checkpoints with fallback past damaged steps
"""
