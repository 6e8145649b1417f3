"""The training layer: run config, optimiser, tasks, pure steps, the trainer and its
hooks, faults and several hosts (runs are stored by `transformer.store`).

  config      RunConfig (model, data, train, checkpoint, mesh), base_config() for configs/*.py
  optim       AdamW, schedules
  tasks       what a model is trained to do: batch layout, model call, end-of-run report
  steps       the pure train_step and eval_step
  hooks       what runs between steps: metric sums, records, checkpoints, the non-finite policy
  trainer     Trainer: the jitted sharded steps and the loop
  run         train_and_evaluate: a whole run
  finetune    parameters to start from (checkpoint.init_from)
  faults, distributed, hostmem, metrics   signals, several hosts, CPU memory, MFU and records
"""
