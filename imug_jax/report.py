"""Scoring and reporting for the `imug.eval` task: summary.json, report.md and PNG plots.

`score_and_report(out_dir, benchmark, judge)` scores every run folder under the outputs root
(`<out_dir>/<run>/<domain>/<subdomain>/question_<id>/result.json`) with the official pipeline
(`imug_jax.scoring.pipeline`) and writes into `report_dir`:

  summary.json       official per-model summary ("score_unit": "percentage", "models": {...}) plus
                     the scoring settings, counts, failures, exposure-bias analysis and TTS gains
  summary.md         the official markdown tables (as `summarize_results.py` prints them)
  report.md          everything, with the plots
  scores/<run>.jsonl every per-turn record
  judge/             an OpenAI-compatible judge's reply cache and request log (`run_from_config`
                     and the CLI): a rerun pays for no reply twice, `replay_only` replays exactly
  score_by_turn_<run>.png, own_vs_reference_<run>.png, tts_gains.png

Run names pair up by convention: `<m>__refhist` is the reference-history control of `<m>`
(`imug_jax.run`), `<m>+<strategy>` a test-time-scaling variant of `<m>` (`imug_jax.tts.run`).
`run_from_config(config, workdir, model, bench)` is the one call `imug_jax.run` makes after the
rollouts: test-time-scaling rollouts (if configured), then scoring and the report.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from absl import logging

from imug_jax.data import release as release_lib
from imug_jax.judges import make_judge
from imug_jax.judges.base import Judge
from imug_jax.judges.oracle import OracleJudge
from imug_jax.judges.prompts import PromptSet
from imug_jax.scoring import exposure, plots, summary
from imug_jax.scoring.pipeline import ScoringOptions, score_model
from imug_jax.scoring.summary import TurnRow
from imug_jax.tts import gains as tts_gains

REFERENCE_SUFFIX = "__refhist"  # Same convention as imug_jax.run.
TTS_SEPARATOR = "+"


def find_runs(out_dir: str | Path) -> list[str]:
  """Run folders under the outputs root: those holding at least one question's result.json."""
  root = Path(out_dir)
  if not root.is_dir():
    return []
  return sorted(
    d.name
    for d in root.iterdir()
    if d.is_dir() and next(d.glob("*/*/question_*/result.json"), None)
  )


def pair_runs(runs: Sequence[str]) -> tuple[list[str], dict[str, str], dict[str, str]]:
  """(baseline runs, {baseline: reference run}, {tts run: baseline}) by the naming convention."""
  names = set(runs)
  references = {
    r[: -len(REFERENCE_SUFFIX)]: r
    for r in runs
    if r.endswith(REFERENCE_SUFFIX) and r[: -len(REFERENCE_SUFFIX)] in names
  }
  scaled = {
    r: r.split(TTS_SEPARATOR, 1)[0]
    for r in runs
    if TTS_SEPARATOR in r and r.split(TTS_SEPARATOR, 1)[0] in names
  }
  baselines = [r for r in runs if r not in references.values() and r not in scaled]
  return baselines, references, scaled


def resolve_judge(
  judge: Judge | OracleJudge | str, bench: release_lib.Release
) -> Judge | OracleJudge:
  """A judge object, or a spec: "oracle" (the synthetic benchmark's exact ground truth) or
  "random" / "random:<seed>" (the smoke-test judge of the unit tests; its scores mean nothing)."""
  if not isinstance(judge, str):
    return judge
  kind, _, argument = judge.partition(":")
  if kind == "oracle":
    return OracleJudge(bench.data_dir)
  if kind == "random":
    return make_judge("random", **({"seed": int(argument)} if argument else {}))
  raise ValueError(f"judge spec {judge!r}: pass a judge object, 'oracle' or 'random[:seed]'")


def score_and_report(
  out_dir: str | Path,
  benchmark: str | Path | release_lib.Release,
  judge: Judge | OracleJudge | str = "oracle",
  *,
  report_dir: str | Path | None = None,
  runs: Sequence[str] | None = None,
  prompts: PromptSet | None = None,
  options: ScoringOptions | None = None,
  num_boot: int = 1000,
  seed: int = 0,
  print_tables: bool = True,
  diagnostics: dict | None = None,
) -> dict[str, Any]:
  """Scores every run under `out_dir`, then writes summary.json, report.md and the plots.

  Args:
    out_dir: the outputs root holding `<run>/<domain>/...` folders.
    benchmark: the release folder (or its parent), or a loaded `Release`.
    judge: any Judge (OpenAI-compatible client, local model judge), an `OracleJudge`, or a spec
      ("oracle" on the synthetic benchmark; "random[:seed]", the smoke-test judge).
    report_dir: where to write; default `<out_dir>/../report`.
    runs: run folders to score; default every run found.
    prompts: judge prompts (ours by default; `PromptSet.official(checkout)` for parity).
    options: scoring options (MCQ parser, retries, missing-output policy, workers...).
    num_boot, seed: bootstrap settings of the exposure-bias analysis.
    print_tables: print the official tables.
    diagnostics: `imug_jax.tts.diagnostics.diagnose`'s result, reported as it is.

  Returns:
    The summary.json payload.
  """
  options = options or ScoringOptions()
  bench = (
    benchmark
    if isinstance(benchmark, release_lib.Release)
    else release_lib.load_release(benchmark, check=False)
  )
  judge = resolve_judge(judge, bench)
  prompts = prompts or PromptSet.ours()
  out_dir = Path(out_dir)
  report_dir = Path(report_dir) if report_dir is not None else out_dir.parent / "report"
  runs = list(runs) if runs is not None else find_runs(out_dir)
  if not runs:
    raise FileNotFoundError(f"{out_dir}: no run folders with result.json files")
  baselines, references, scaled = pair_runs(runs)

  rows: dict[str, list[TurnRow]] = {}
  counts, failures = {}, {}
  (report_dir / "scores").mkdir(parents=True, exist_ok=True)
  for run in runs:
    result = score_model(
      out_dir / run, bench, judge, prompts=prompts, options=options, model_name=run
    )
    rows[run], counts[run] = result.rows, result.counts
    failures[run] = [
      {k: f.get(k) for k in ("domain", "subdomain", "sample_id", "turn", "method", "error")}
      for f in result.failures
    ]
    with (report_dir / "scores" / f"{_safe(run)}.jsonl").open("w", encoding="utf-8") as handle:
      for record in result.records:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    logging.info("scored %s: %s", run, result.counts)

  payload = summary.summarize_models(row for run in runs for row in rows[run])
  for run in runs:
    payload["models"].setdefault(run, summary.summarize([]))
  payload["scoring"] = {
    "judge": judge.name,
    "prompts": prompts.source,
    "mcq_parser": options.mcq_parser,
    "judge_retries": options.judge_retries,
    "missing_output": options.missing_output,
    "grid_subdomains": list(options.grid_subdomains),
    "benchmark": str(bench.data_dir),
  }
  payload["counts"] = counts
  payload["failures"] = {run: len(f) for run, f in failures.items()}
  payload["exposure"] = {
    m: exposure.analyse(
      rows[m], rows[references[m]] if m in references else None, num_boot=num_boot, seed=seed
    )
    for m in baselines
  }
  payload["tts"] = {run: tts_gains.gains(rows[base], rows[run]) for run, base in scaled.items()}
  payload["runs"] = {"baselines": baselines, "references": references, "tts": scaled}
  if diagnostics is not None:
    payload["tts_diagnostics"] = diagnostics

  figures = _plots(payload, report_dir)
  (report_dir / "summary.json").write_text(
    json.dumps(payload, indent=2, ensure_ascii=False, default=str), encoding="utf-8"
  )
  official = "\n\n".join(summary.markdown_summary(m, payload["models"][m]) for m in runs)
  (report_dir / "summary.md").write_text(official + "\n", encoding="utf-8")
  (report_dir / "report.md").write_text(_markdown(payload, failures, figures), encoding="utf-8")
  if print_tables:
    print(official)
  payload["report_dir"] = str(report_dir)
  return payload


def run_from_config(config, workdir: str | Path, model, bench: release_lib.Release) -> dict:
  """Test-time-scaling rollouts (config.tts), then `score_and_report` (config.scoring).

  config.scoring (all optional): judge ("oracle" | "openai" | "local"), judge_seed, base_url,
  judge_model, api_key_env, timeout_s, official_prompts_dir, mcq_parser, missing_output,
  judge_retries, workers, grid_subdomains, num_boot.
  config.tts (optional): strategies (subset of ["cot", "verify", "bon"]), rounds, n, verifier
  ("self" | "judge"), diagnostics (default True: with the oracle judge, what the model answers
  to the strategies' questions against the ground truth, `imug_jax.tts.diagnostics`).
  """
  scoring = _section(config, "scoring")
  tts = _section(config, "tts")
  judge = _judge_from_config(scoring, model, bench, Path(workdir) / "report" / "judge")
  out_dir = Path(workdir) / "outputs" / "model_outputs"
  samples = list(bench.samples or ())
  max_samples = _section(config, "data").get("max_samples", 0)
  if max_samples:
    samples = samples[:max_samples]
  strategies = list(tts.get("strategies", ()))
  n = int(tts.get("n", 4))
  batch_model = _batch_model(model, n) if strategies else None
  if strategies:
    from imug_jax.tts import run as tts_run

    wrapped = tts_run.build_wrappers(
      model,
      strategies,
      rounds=int(tts.get("rounds", 2)),
      n=n,
      verifier=tts.get("verifier", "self"),
      judge=judge,
      batch_model=batch_model,
    )
    rollout = _section(config, "rollout")
    tts_run.rollout_strategies(
      wrapped,
      samples,
      images_dir=bench.images_dir,
      out_dir=out_dir,
      temperature=rollout.get("temperature", 0.7),
      seed=rollout.get("seed", 0),
      force=rollout.get("force", False),
      progress=rollout.get("progress", False),
    )
  diagnosed = None
  if strategies and isinstance(judge, OracleJudge) and tts.get("diagnostics", True):
    from imug_jax.tts import diagnostics

    diagnosed = diagnostics.diagnose(
      model,
      bench,
      samples=samples,
      temperature=_section(config, "rollout").get("temperature", 0.7),
      n=n,
      batch_model=batch_model,
      seed=_section(config, "rollout").get("seed", 0),
    )
  grid_default = ScoringOptions().grid_subdomains
  if isinstance(judge, OracleJudge):
    grid_default = ()  # The oracle scores every image turn against its exact target.
  elif (bench.data_dir / "synthetic_meta.jsonl").exists():
    grid_default = (*grid_default, "grid_coloring")  # The synthetic benchmark's grid task.
  options = ScoringOptions(
    mcq_parser=scoring.get("mcq_parser", "official"),
    judge_retries=int(scoring.get("judge_retries", 2)),
    missing_output=scoring.get("missing_output", "zero"),
    workers=int(scoring.get("workers", 1)),
    grid_subdomains=tuple(scoring.get("grid_subdomains", grid_default)),
  )
  prompts = PromptSet.from_option(scoring.get("official_prompts_dir") or None)
  runs = None
  if samples and len(samples) < len(bench.samples or ()):
    bench = dataclasses.replace(bench, samples=samples)
  return score_and_report(
    out_dir,
    bench,
    judge,
    report_dir=Path(workdir) / "report",
    runs=runs,
    prompts=prompts,
    options=options,
    num_boot=int(scoring.get("num_boot", 1000)),
    diagnostics=diagnosed,
  )


def _section(config, name: str) -> Mapping[str, Any]:
  value = config.get(name, None) if hasattr(config, "get") else getattr(config, name, None)
  return value if value is not None else {}


def _judge_from_config(
  scoring: Mapping[str, Any], model, bench: release_lib.Release, cache_dir: Path
) -> Judge | OracleJudge:
  """The configured judge; an OpenAI-compatible one keeps its reply cache and request log in
  `cache_dir` (with the report), so a rerun pays for no reply twice. The smoke-test random judge
  is not offered: its scores are noise."""
  kind = scoring.get("judge", "oracle")
  if kind == "oracle":
    return OracleJudge(bench.data_dir)
  if kind == "openai":
    return make_judge(
      "openai",
      base_url=scoring["base_url"],
      model=scoring["judge_model"],
      api_key_env=scoring.get("api_key_env", "IMUG_JUDGE_API_KEY"),
      timeout_s=float(scoring.get("timeout_s", 150.0)),
      concurrency=int(scoring.get("concurrency", 4)),
      cache_dir=cache_dir,
      replay_only=bool(scoring.get("replay_only", False)),
    )
  if kind == "local":
    return make_judge("local", model=model, seed=int(scoring.get("judge_seed", 0)))
  raise ValueError(f"scoring.judge must be 'oracle', 'openai' or 'local', got {kind!r}")


def _batch_model(model, n: int):
  """The tiny model rebuilt with `num_samples=n` (same seed, so the same weights), else None."""
  config = getattr(model, "config", None)
  if type(model).__name__ != "TinyUnifiedModel" or getattr(config, "num_samples", n) == n:
    return None
  from imug_jax.models.tiny import TinyUnifiedModel

  batched = TinyUnifiedModel(
    model.tokenizer, dataclasses.replace(config, num_samples=n), name=model.name
  )
  batched.params = model.params  # The same weights, whatever seed built `model`.
  return batched


# ------------------------------------------------------------------------------------- output


def _safe(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _series_from(groups: Mapping[str, Any], label_prefix: str = "") -> list[plots.Series]:
  series = []
  for group, data in groups.items():
    turns = sorted(int(t) for t in data["by_turn"])
    means = [data["by_turn"][t]["mean"] for t in turns]
    series.append(
      plots.Series(
        f"{label_prefix}{group}",
        turns,
        [m["value"] for m in means],
        [m["low"] for m in means],
        [m["high"] for m in means],
      )
    )
  return series


def _plots(payload: dict, report_dir: Path) -> dict[str, str]:
  figures = {}
  for model, analysis in payload["exposure"].items():
    if analysis["groups"]:
      name = f"score_by_turn_{_safe(model)}.png"
      plots.line_chart(
        _series_from(analysis["groups"]),
        report_dir / name,
        title=f"{model}: image score by turn (95% CI)",
        xlabel="turn",
        ylabel="image score (%)",
        y_range=(0, 100),
      )
      figures[f"by_turn:{model}"] = name
    if analysis.get("reference_groups") and OVERALL in analysis["reference_groups"]:
      name = f"own_vs_reference_{_safe(model)}.png"
      series = _series_from(
        {
          "own history": analysis["groups"][OVERALL],
          "reference history": analysis["reference_groups"][OVERALL],
        }
      )
      plots.line_chart(
        series,
        report_dir / name,
        title=f"{model}: own vs reference history",
        xlabel="turn",
        ylabel="image score (%)",
        y_range=(0, 100),
      )
      figures[f"reference:{model}"] = name
  gain_series = []
  for run, result in payload["tts"].items():
    turns = sorted(int(t) for t in result["by_turn"])
    if turns:
      entries = [result["by_turn"][t] for t in turns]
      gain_series.append(
        plots.Series(
          run,
          turns,
          [e["gain"] for e in entries],
          [e.get("low") for e in entries],
          [e.get("high") for e in entries],
        )
      )
  if gain_series:
    plots.line_chart(
      gain_series,
      report_dir / "tts_gains.png",
      title="Test-time scaling: image-score gain over the baseline (95% CI)",
      xlabel="turn",
      ylabel="gain (points)",
      zero_line=True,
    )
    figures["tts"] = "tts_gains.png"
  return figures


OVERALL = exposure.OVERALL


def _fmt(value, digits: int = 2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def _ci(estimate: Mapping[str, Any]) -> str:
  if estimate["value"] is None:
    return "-"
  if estimate["low"] is None:
    return _fmt(estimate["value"])
  return f"{_fmt(estimate['value'])} [{_fmt(estimate['low'])}, {_fmt(estimate['high'])}]"


def _gain(entry: Mapping[str, Any]) -> str:
  """A TTS gain with its interval (entries of `tts.gains`)."""
  estimate = {k: entry.get(k) for k in ("low", "high")}
  return _ci({"value": entry["gain"], **estimate}) + f" (n={entry['count']})"


def _markdown(payload: dict, failures: Mapping[str, list], figures: Mapping[str, str]) -> str:
  s = payload["scoring"]
  judge_note = (
    " (the synthetic benchmark's exact ground truth: every point of an image turn scores 5 x the "
    "patch match of the image with its target; dynamic answers are measured on the model's image)"
    if s["judge"] == OracleJudge.name
    else ""
  )
  lines = [
    "# IMUG-Bench report",
    "",
    f"- Judge: `{s['judge']}`{judge_note}; prompts: `{s['prompts']}`; judge retries on "
    f"unparseable replies: {s['judge_retries']}.",
    f"- MCQ parser: **{s['mcq_parser']}**"
    + (
      " (reproduces the official adjacent-capitals quirk: multi-letter answers such as `BCD` "
      "parse to no letter and score 0)."
      if s["mcq_parser"] == "official"
      else " (corrected: runs of capitals such as `BCD` are read as letters; not the official "
      "score)."
    ),
    f"- Image turns without an image: `{s['missing_output']}`; grid scorer subdomains: "
    f"{', '.join(s['grid_subdomains']) or 'none'}.",
    f"- Benchmark: `{s['benchmark']}`. Scores are percentages (image: point mean x 20; text: "
    "MCQ x 100), unweighted micro-means over turns.",
    "",
    "## Runs",
    "",
    "| Run | Samples | Turns scored | Failures | Judge calls | Reused | Grid |",
    "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
  ]
  for run, c in payload["counts"].items():
    lines.append(
      f"| {run} | {c['samples']} | {c['turns_scored']} | {c['failures']} | "
      f"{c['judge_calls']} | {c['judge_calls_reused']} | {c['grid_overrides']} |"
    )
  for run, result in payload["models"].items():
    lines += [
      "",
      summary.markdown_summary(run, result)
      .replace("\n# ", "\n## ")
      .replace("## ", "### ")
      .replace("# ", "## ", 1),
    ]
  lines += [
    "",
    "## Exposure bias (image score against turn; our analysis, not in the official code)",
    "",
    "| Run | Group | Slope (pts/turn) [95% CI] | Drop first->last [95% CI] |",
    "| --- | --- | --- | --- |",
  ]
  for model, analysis in payload["exposure"].items():
    for group, data in analysis["groups"].items():
      lines.append(
        f"| {model} | {group} | {_ci(data['slope'])} | {_ci(data['drop_first_to_last'])} |"
      )
    if f"by_turn:{model}" in figures:
      lines += ["", f"![{model} by turn]({figures[f'by_turn:{model}']})"]
    if analysis.get("reference_groups", {}).get(OVERALL):
      own, ref = analysis["groups"][OVERALL], analysis["reference_groups"][OVERALL]
      gap = analysis["gap"][OVERALL]["by_turn"]
      lines += [
        "",
        f"### {model}: image score by turn, own vs reference history (95% CI)",
        "",
        "| Turn | Own history | Reference history | Own - reference | Image turns |",
        "| ---: | --- | --- | --- | ---: |",
      ]
      for turn, entry in own["by_turn"].items():
        reference = ref["by_turn"].get(turn)
        lines.append(
          f"| {turn} | {_ci(entry['mean'])} | {_ci(reference['mean']) if reference else '-'} | "
          f"{_ci(gap[turn]) if turn in gap else '-'} | {entry['count']} |"
        )
    if analysis.get("gap"):
      turns = sorted({t for gap in analysis["gap"].values() for t in gap["by_turn"]})
      lines += [
        "",
        f"### {model}: own - reference history (per turn, 95% CI)",
        "",
        "| Group | " + " | ".join(f"turn {t}" for t in turns) + " | Slope difference |",
        "| --- " * (len(turns) + 2) + "|",
      ]
      for group, gap in analysis["gap"].items():
        cells = " | ".join(_ci(gap["by_turn"][t]) if t in gap["by_turn"] else "-" for t in turns)
        lines.append(f"| {group} | {cells} | {_fmt(gap['slope_difference'])} |")
      if f"reference:{model}" in figures:
        lines += ["", f"![{model} own vs reference]({figures[f'reference:{model}']})"]
  if payload["tts"]:
    turns = sorted({int(t) for g in payload["tts"].values() for t in g["by_turn"]})
    lines += [
      "",
      "## Test-time scaling (gain over the baseline run, paired turns, 95% CI)",
      "",
      "| Run | Image: base -> scaled | Image gain | All: base -> scaled | All gain |",
      "| --- | --- | --- | --- | --- |",
    ]
    for run, g in payload["tts"].items():
      image, overall = g["image"], g["overall"]
      lines.append(
        f"| {run} | {_fmt(image['baseline'])} -> {_fmt(image['scaled'])} | {_gain(image)} | "
        f"{_fmt(overall['baseline'])} -> {_fmt(overall['scaled'])} | {_gain(overall)} |"
      )
    lines += [
      "",
      "Image gain per turn (points, 95% CI; image turns paired):",
      "",
      "| Run | " + " | ".join(f"turn {t}" for t in turns) + " |",
      "| --- " * (len(turns) + 1) + "|",
    ]
    for run, g in payload["tts"].items():
      cells = " | ".join(_gain(g["by_turn"][t]) if t in g["by_turn"] else "-" for t in turns)
      lines.append(f"| {run} | {cells} |")
    if "tts" in figures:
      lines += ["", f"![TTS gains]({figures['tts']})"]
  if payload.get("tts_diagnostics"):
    from imug_jax.tts import diagnostics

    lines += diagnostics.markdown(payload["tts_diagnostics"])
  failed = {run: f for run, f in failures.items() if f}
  if failed:
    lines += ["", "## Turns that could not be scored (not counted in any mean)", ""]
    for run, items in failed.items():
      lines.append(f"- {run}: {len(items)}")
      for item in items[:10]:
        lines.append(
          f"  - {item['domain']}/{item['subdomain']}/{item['sample_id']} turn "
          f"{item['turn']} ({item['method']}): {str(item['error'])[:160]}"
        )
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
  """`python -m imug_jax.report --out_dir OUTPUTS --benchmark DATA [--judge ...]`: score existing
  rollouts (ours or the official client's) and write the report."""
  import argparse

  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("--out_dir", required=True, help="outputs root holding <run>/ folders")
  parser.add_argument("--benchmark", required=True, help="release data folder (or its parent)")
  parser.add_argument("--report_dir", default=None)
  parser.add_argument("--runs", default="", help="comma-separated run folders (default: all)")
  parser.add_argument(
    "--judge",
    default="oracle",
    choices=("oracle", "openai"),
    help="oracle: the synthetic benchmark's exact ground truth; openai: a chat judge",
  )
  parser.add_argument("--base_url", default="")
  parser.add_argument("--judge_model", default="")
  parser.add_argument("--api_key_env", default="IMUG_JUDGE_API_KEY")
  parser.add_argument(
    "--replay_only", action="store_true", help="answer only from the judge's reply cache"
  )
  parser.add_argument("--official_prompts_dir", default="")
  parser.add_argument("--mcq_parser", default="official", choices=("official", "corrected"))
  parser.add_argument("--missing_output", default="zero", choices=("zero", "judge"))
  parser.add_argument("--workers", type=int, default=4)
  args = parser.parse_args(argv)
  if args.judge == "openai":
    report_dir = Path(args.report_dir or Path(args.out_dir).parent / "report")
    judge = make_judge(
      "openai",
      base_url=args.base_url,
      model=args.judge_model,
      api_key_env=args.api_key_env,
      cache_dir=report_dir / "judge",
      replay_only=args.replay_only,
    )
  else:
    judge = "oracle"
  score_and_report(
    args.out_dir,
    args.benchmark,
    judge,
    report_dir=args.report_dir,
    runs=[r for r in args.runs.split(",") if r] or None,
    prompts=PromptSet.from_option(args.official_prompts_dir or None),
    options=ScoringOptions(
      mcq_parser=args.mcq_parser, missing_output=args.missing_output, workers=args.workers
    ),
  )


if __name__ == "__main__":
  main()
