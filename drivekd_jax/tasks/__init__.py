"""What `launch.py` runs: each task is `run(config, workdir)`, thin wiring over the libraries.

- `train`: task "drivekd.train" (distillation, then the held-out evaluation);
- `evaluate`: task "drivekd.heldout" (the held-out evaluation of a workdir's latest checkpoint);
- `eval_drivebench`: task "drivekd.eval" (DriveBench answers, judged scores, efficiency, report);
- `generate`: task "drivekd.generate" (one InternVL3 answer about a rendered scene).
"""
