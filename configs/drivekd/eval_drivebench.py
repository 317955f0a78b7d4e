r"""DriveBench evaluation (task "drivekd.eval"): answers, judged scores, efficiency, Table 1.

Embedded default (synthetic DriveBench-format data written into the workdir, a random tiny
InternVL, the deterministic word-overlap judge served on loopback; a couple of minutes on 2 CPU
cores): shows the pipeline end to end, not a driving skill.

    python launch.py --config=configs/drivekd/eval_drivebench.py --workdir=/tmp/drivebench_eval

A trained student (a training workdir) or any local HF-format InternVL checkpoint, on the
released DriveBench files, judged by an OpenAI-compatible server (key read from $OPENAI_API_KEY):

    python launch.py --config=configs/drivekd/eval_drivebench.py --workdir=/tmp/eval_1b \
      --config.model.checkpoint=/models/InternVL3-1B-hf \
      --config.data.drivebench_dir=/data/drivebench/data \
      --config.settings=clean,no_image,fog,snow --config.sampling=official \
      --config.judge.base_url=https://api.openai.com/v1 --config.judge.model=gpt-3.5-turbo \
      --config.judge.api_key_env=OPENAI_API_KEY

`--config.judge.official_templates_dir=<toolkit checkout>/evaluate` scores with the toolkit's own
prompt templates (parity); by default our wording of the same criteria and points is used.
`--config.report.compare_workdirs=DIR1,DIR2` adds the rows of earlier evaluations to Table 1.
Writes `<workdir>/drivebench/<setting>/{answers.jsonl, judged.jsonl, scores.json}`,
`summary.json`, `efficiency.json`, `report.md` and `settings.png`; a relaunch resumes.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg:
    raise ValueError(f"configs/drivekd/eval_drivebench.py:{arg}: takes no argument")
  c = ml_collections.ConfigDict()
  c.task = "drivekd.eval"
  c.seed = 0
  # An HF-format InternVL directory or a training workdir; "": a random-init preset.
  c.model = ml_collections.ConfigDict(
    dict(checkpoint="", name="", preset="tiny", dtype="float32", tokenizer="")
  )
  # The release's data/ folder (JSONs, samples/, corruption/, visual_description.json);
  # "": synthetic DriveBench-format files written into the workdir.
  c.data = ml_collections.ConfigDict(
    dict(
      drivebench_dir="",
      synthetic=ml_collections.ConfigDict(
        dict(num_train_frames=16, num_test_frames=3, image_size=64)
      ),
    )
  )
  c.settings = "clean,no_image,fog"  # comma-separated: clean, no_image, the 15 corruptions
  c.max_items = 0  # first N items of each setting (0: all)
  c.sampling = "greedy"  # or "official": temperature 0.2, top-p 0.2, 512 new tokens
  c.max_new_tokens = 32  # with greedy decoding
  c.batch_size = 4
  c.buckets = (1024, 2048)
  c.max_images = 6
  c.judge = ml_collections.ConfigDict(
    dict(
      base_url="local",  # "local": loopback overlap judge; "": no judged scores
      model="gpt-3.5-turbo",
      api_key_env="JUDGE_API_KEY",
      official_templates_dir="",
      concurrency=4,
      attempts=3,
      replay_only=False,
    )
  )
  # presets: comma-separated preset names (e.g. "1B,2B,8B") measured too, random-init and sharded
  # over the mesh, as efficiency-only rows of Table 1.
  c.efficiency = ml_collections.ConfigDict(
    dict(enabled=True, new_tokens=32, presets="", dtype="bfloat16")
  )
  c.report = ml_collections.ConfigDict(dict(compare_workdirs=""))
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ()
  return c
