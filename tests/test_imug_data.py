"""IMUG data: the real release files, validation errors, round trips, TFDS, synthetic benchmark."""

import copy
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from _paths import data_file

from imug_jax.data import release, schema, synthetic, tfds_builder
from imug_jax.data.schema import BenchmarkFormatError
from imug_jax.models import image_tokenizer as itok
from imug_jax.scoring import grid as grid_scorer

REAL = data_file("imug")


def test_real_domain_classes_match_the_shipped_mapping():
  real = json.loads((REAL / "config" / "domain_classes.json").read_text())
  shipped = schema.domain_classes()
  assert {k: tuple(v) for k, v in real.items()} == shipped
  domains = [d for ds in shipped.values() for d in ds]
  assert len(shipped) == 3 and len(domains) == 19 == len(set(domains))
  assert schema.class_of("Geometric_Coloring") == "Static Spatial"
  assert schema.class_of("Weather") == "Temporal Causal"
  assert schema.class_of("Everyday_Tasks") == "Hybrid"
  with pytest.raises(KeyError, match="Nope"):
    schema.class_of("Nope")


def test_real_reference_files_load_and_cross_check():
  bench = release.load_release(REAL, require_benchmark=False)  # Runs Release.check().
  assert bench.samples is None
  refs = bench.image_references
  assert len(refs) == 3113
  assert Counter(schema.class_of(k.domain) for k in refs) == {
    "Static Spatial": 1448,
    "Temporal Causal": 1122,
    "Hybrid": 543,
  }
  assert sum(len(turns) for turns in refs.values()) == 4092
  assert sum(1 for turns in refs.values() if not turns) == 327
  assert len({k.subdomain for k in refs}) == 97
  assert len(bench.dynamic_references) == 719
  for (key, turn), ref_turns in bench.dynamic_references.items():
    assert key in refs, key  # Every dynamic turn belongs to a sample of the benchmark.
    assert turn not in refs[key], (key, turn)  # A dynamic MCQ turn is a text turn.
    assert all(r < turn for r in ref_turns)
  for turns in refs.values():
    for turn, links in turns.items():
      assert turn >= 1
      for link in links:
        assert link.ref_turn <= turn
        if link.ref_type == "output":  # A turn cannot see its own output.
          assert link.ref_turn < turn


def test_real_grid_ground_truth():
  grids = schema.load_grid_gt(REAL / "data" / "grid_gt")
  assert len(grids) == 24
  assert Counter(k.subdomain for k in grids) == {
    "cubes_coloring": 10,
    "cubes_completion": 7,
    "cubes_synthesis": 7,
  }
  bench = release.load_release(REAL, require_benchmark=False, check=False)
  for key, turns in grids.items():
    assert key.domain == "Geometric_Coloring"
    assert key in bench.image_references
    for grid in turns.values():
      assert all(cell in schema.GRID_VALUES for row in grid for cell in row)


def _record():
  return {
    "domain": "Apparel",
    "subdomain": "background_replacement",
    "sample_id": "10",
    "system_prompt": "be brief",
    "difficulty": "hard",
    "tasks": [
      {
        "turn": 1,
        "modality": "image",
        "input": [{"text": "Replace the background."}, {"image": "Apparel__bg__10__img_0.jpg"}],
        "output": {"evaluation_points": ["point 1", "point 2"]},
      },
      {
        "turn": 2,
        "modality": "text",
        "input": [{"text": "Which? A. x B. y"}],
        "output": {"answer": "A+<DYNAMIC>", "note": "kept"},
      },
      {"turn": 3, "modality": "text", "input": [{"text": "Q"}], "output": {"answer": "BD"}},
    ],
  }


def test_release_record_round_trips(tmp_path):
  raw = _record()
  path = tmp_path / "benchmark.jsonl"
  schema.write_jsonl(path, [raw, {**raw, "sample_id": "11", "category": "old_name"}])
  samples = schema.load_benchmark(path)
  assert [s.to_json() for s in samples] == [raw, {**raw, "sample_id": "11", "category": "old_name"}]
  sample = samples[0]
  assert sample.key == schema.SampleKey("Apparel", "background_replacement", "10")
  assert [t.output_mode for t in sample.tasks] == ["image_only", "text_only", "text_only"]
  assert sample.tasks[1].is_dynamic and sample.tasks[1].fixed_letters == "A"
  assert not sample.tasks[2].is_dynamic and sample.tasks[2].fixed_letters == "BD"
  assert sample.tasks[0].input_images == ("Apparel__bg__10__img_0.jpg",)
  done = sample.with_responses({1: "turn_1_output.png", 2: "A", 3: "ERROR: x"})
  again = schema.parse_sample(json.loads(json.dumps(done.to_json())))
  assert again == done and again.tasks[0].model_response == "turn_1_output.png"
  # The category fallback (no subdomain field) keeps its field name.
  legacy = copy.deepcopy(raw)
  legacy["category"] = legacy.pop("subdomain")
  parsed = schema.parse_sample(legacy)
  assert parsed.subdomain == "background_replacement" and parsed.to_json() == legacy


def _break(path, value):
  raw = _record()
  target = raw
  for key in path[:-1]:
    target = target[key]
  if value is KeyError:
    del target[path[-1]]
  else:
    target[path[-1]] = value
  return raw


@pytest.mark.parametrize(
  "path, value, message",
  [
    (("tasks", 0, "turn"), "1", "field 'turn': turn must be an integer"),
    (("tasks", 0, "turn"), True, "turn must be an integer"),
    (("tasks", 1, "modality"), "video", "turn 2 field 'modality'"),
    (("tasks", 1, "input"), [], "turn 2 field 'input'"),
    (("tasks", 0, "input"), [{"image": "a.jpg"}, {"text": "t"}], "turn 1 field 'input\\[0\\]'"),
    (("tasks", 0, "input"), [{"text": "t"}, {"video": "v"}], "turn 1 field 'input\\[1\\]'"),
    (("tasks", 0, "input"), [{"text": "t"}, {"image": "../x.jpg"}], "images/: .*without '/'"),
    (("tasks", 0, "input"), [{"text": "t"}, {"image": ".."}], "images/: must be a plain name"),
    (("tasks", 0, "output"), {"answer": "A"}, "turn 1 field 'output.evaluation_points'"),
    (("tasks", 2, "output"), {}, "turn 3 field 'output.answer'"),
    (("tasks", 2, "output"), {"answer": "<DYNAMIC>+A"}, "turn 3 field 'output.answer'"),
    (("tasks", 2, "turn"), 2, "strictly increasing"),
    (("tasks",), [], "field 'tasks'"),
    (("sample_id",), 10, "field 'sample_id'"),
    (("domain",), "../../../../elsewhere", "field 'domain'.*output layout.*without '/'"),
    (("subdomain",), "..\\..\\elsewhere", "field 'subdomain'.*without '\\\\\\\\'"),
    (("sample_id",), "..", "field 'sample_id'.*plain name"),
    (("sample_id",), "C:evil", "field 'sample_id'.*drive prefix"),
    (("domain",), KeyError, "field 'domain'"),
    (("subdomain",), KeyError, "subdomain \\(or category\\)"),
    (("system_prompt",), ["x"], "field 'system_prompt'"),
  ],
)
def test_each_validation_error_names_file_line_sample_turn_field(tmp_path, path, value, message):
  bench = tmp_path / "benchmark.jsonl"
  schema.write_jsonl(bench, [_record(), _break(path, value)])
  with pytest.raises(BenchmarkFormatError, match=message) as error:
    schema.load_benchmark(bench)
  text = str(error.value)
  assert f"{bench}:2" in text
  if path[0] == "tasks" and len(path) > 2 and path[2] != "turn":
    assert "sample Apparel/background_replacement/10" in text


def test_bad_json_and_duplicates_are_named(tmp_path):
  bench = tmp_path / "benchmark.jsonl"
  bench.write_text(json.dumps(_record()) + "\n{not json\n")
  with pytest.raises(BenchmarkFormatError, match=f"{bench}:2: invalid JSON"):
    schema.load_benchmark(bench)
  schema.write_jsonl(bench, [_record(), _record()])
  with pytest.raises(BenchmarkFormatError, match="duplicate sample"):
    schema.load_benchmark(bench)


def _write_small_release(root: Path):
  raw = _record()
  (root / "images").mkdir(parents=True)
  (root / "images" / "Apparel__bg__10__img_0.jpg").write_bytes(
    itok.png_bytes(np.zeros((4, 4, 3), np.uint8))
  )
  schema.write_jsonl(root / "benchmark.jsonl", [raw])
  key = {"domain": "Apparel", "subdomain": "background_replacement", "sample_id": "10"}
  schema.write_jsonl(
    root / "image_references.jsonl",
    [{**key, "reference_links": [{"turn_idx": 1, "refs": [{"ref_turn": 1, "ref_type": "input"}]}]}],
  )
  schema.write_jsonl(
    root / "dynamic_references.jsonl", [{**key, "turn_idx": 2, "ref_turn_idxs": [1]}]
  )
  return key


def test_release_cross_check_errors(tmp_path):
  key = _write_small_release(tmp_path)
  bench = release.load_release(tmp_path)
  assert bench.dynamic_references[(bench.samples[0].key, 2)] == (1,)
  bad_refs = [
    ({**key, "reference_links": [{"turn_idx": 2, "refs": []}]}, "not an image turn"),
    (
      {
        **key,
        "reference_links": [{"turn_idx": 1, "refs": [{"ref_turn": 1, "ref_type": "output"}]}],
      },
      "own input, not its own output",
    ),
    ({**key, "sample_id": "99", "reference_links": []}, "no such sample"),
    ({**key, "domain": "Unknown", "reference_links": []}, "in no class"),
  ]
  for line, message in bad_refs:
    schema.write_jsonl(tmp_path / "image_references.jsonl", [line])
    with pytest.raises(BenchmarkFormatError, match=message):
      release.load_release(tmp_path)
  schema.write_jsonl(tmp_path / "image_references.jsonl", [])
  schema.write_jsonl(
    tmp_path / "dynamic_references.jsonl",
    [{**key, "turn_idx": 2, "ref_turn_idxs": [1]}, {**key, "turn_idx": 3, "ref_turn_idxs": [1]}],
  )
  with pytest.raises(BenchmarkFormatError, match="'BD' is not dynamic"):
    release.load_release(tmp_path)
  schema.write_jsonl(tmp_path / "dynamic_references.jsonl", [])
  with pytest.raises(BenchmarkFormatError, match="turn 2: dynamic answer 'A\\+<DYNAMIC>' has no"):
    release.load_release(tmp_path)
  schema.write_jsonl(
    tmp_path / "dynamic_references.jsonl", [{**key, "turn_idx": 2, "ref_turn_idxs": [2]}]
  )
  with pytest.raises(BenchmarkFormatError, match="must be earlier turns"):
    release.load_release(tmp_path)
  schema.write_jsonl(
    tmp_path / "dynamic_references.jsonl", [{**key, "turn_idx": 2, "ref_turn_idxs": [1]}]
  )
  (tmp_path / "images" / "Apparel__bg__10__img_0.jpg").unlink()
  with pytest.raises(BenchmarkFormatError, match="turn 1 field 'input': image .* is missing"):
    release.load_release(tmp_path)
  (tmp_path / "grid_gt").mkdir()
  (tmp_path / "grid_gt" / "Geometric_Coloring__cubes_coloring__1.jsonl").write_text(
    json.dumps({"turn": 2, "grid": [["0", "x", "0"], ["0"] * 3, ["0"] * 3]}) + "\n"
  )
  with pytest.raises(BenchmarkFormatError, match="cubes_coloring__1.jsonl:1 turn 2 field 'grid'"):
    release.load_release(tmp_path, check=False)


def test_synthetic_benchmark_is_valid_and_exact(tmp_path):
  bench = synthetic.write_synthetic(tmp_path, num_samples=12, seed=3)  # Loads and cross-checks.
  samples = bench.samples
  assert len(samples) == 12
  assert all(2 <= len(s.tasks) <= 6 for s in samples)
  assert {s.domain for s in samples} == {d for d, _, _ in synthetic.DOMAINS}
  assert {schema.class_of(s.domain) for s in samples} == {
    "Static Spatial",
    "Temporal Causal",
    "Hybrid",
  }
  assert any(t.answer == "<DYNAMIC>" for s in samples for t in s.tasks)
  assert any(t.answer == "A+<DYNAMIC>" for s in samples for t in s.tasks)
  assert any(t.answer and not t.is_dynamic for s in samples for t in s.tasks)
  assert any(t.input_images for s in samples for t in s.tasks)
  truth = synthetic.ground_truth_images(tmp_path)
  assert set(truth) == {(s.key, t.turn) for s in samples for t in s.tasks if t.modality == "image"}
  # The dynamic oracle answers from the ground-truth images; the grid scorer reads their grids.
  meta = synthetic.load_meta(tmp_path)
  assert set(meta) == set(bench.dynamic_references)
  for (key, turn), entry in meta.items():
    image = itok.read_image(truth[(key, entry["image_turn"])].read_bytes())
    letters = synthetic.oracle_dynamic_answer(entry, image)
    assert len(letters) == len(entry["fixed"]) + 1, (key, turn, letters)
    assert synthetic.oracle_dynamic_answer(entry, None) == entry["fixed"]
  assert bench.grid_gt
  for key, turns in bench.grid_gt.items():
    for turn, cells in turns.items():
      detection = grid_scorer.detect_grid(truth[(key, turn)])
      assert detection.matrix == [list(row) for row in cells], (key, turn, detection)
  # Same seed, same files.
  again = synthetic.write_synthetic(tmp_path / "again", num_samples=12, seed=3)
  assert [s.to_json() for s in again.samples] == [s.to_json() for s in samples]


def test_synthetic_cli(tmp_path):
  synthetic.main(["--out", str(tmp_path), "--num_samples", "4", "--seed", "1"])
  for name in (
    "benchmark.jsonl",
    "image_references.jsonl",
    "dynamic_references.jsonl",
    "synthetic_meta.jsonl",
  ):
    assert (tmp_path / name).is_file()
  assert list((tmp_path / "grid_gt").glob("*.jsonl"))
  assert len(release.load_release(tmp_path).samples) == 4


def test_tfds_builder_round_trips_the_release(tmp_path):
  bench = synthetic.write_synthetic(tmp_path / "release", num_samples=6, seed=0)
  builder = tfds_builder.build(tmp_path / "release", tmp_path / "tfds")
  source = builder.as_data_source(split="test")
  assert len(source) == 6
  by_key = {s.key: s for s in bench.samples}
  for index in range(len(source)):
    example = tfds_builder.decode_example(source[index])
    sample = example.sample
    assert sample.to_json() == by_key[sample.key].to_json()
    for name, data in example.images.items():
      assert data == bench.image_path(name).read_bytes()
    assert set(example.images) == {n for t in sample.tasks for n in t.input_images}
    assert example.image_references == bench.image_references.get(sample.key, {})
    assert example.dynamic_references == {
      t: r for (k, t), r in bench.dynamic_references.items() if k == sample.key
    }
    assert example.grid_gt == bench.grid_gt.get(sample.key, {})


def test_palette_tokenizer_round_trips():
  tok = itok.PaletteTokenizer(grid=6, patch=8)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, tok.vocab_size, tok.num_tokens)
  black = itok.colour_index("black")
  tokens = np.where(tokens // itok.NUM_EDGE_CODES == black, black * itok.NUM_EDGE_CODES, tokens)
  image = tok.decode(tokens)
  assert image.shape == (48, 48, 3) and image.dtype == np.uint8
  np.testing.assert_array_equal(tok.encode(image), tokens)
  np.testing.assert_array_equal(tok.encode(itok.read_image(itok.png_bytes(image))), tokens)
  # Any size is resized; a flat red picture is all red patches without edges.
  red = np.zeros((100, 70, 3), np.uint8) + np.array([220, 30, 30], np.uint8)
  assert set(tok.encode(red).tolist()) == {tok.token("red")}
  with pytest.raises(ValueError):
    tok.decode(np.full(tok.num_tokens, tok.vocab_size))


def test_tfds_builder_cli(tmp_path, capsys):
  synthetic.write_synthetic(tmp_path / "release", num_samples=3, seed=1)
  tfds_builder.main(["--release", str(tmp_path / "release"), "--data_dir", str(tmp_path / "t")])
  assert "3 samples" in capsys.readouterr().out
  assert list((tmp_path / "t" / "imug_bench" / "1.0.0").glob("*.array_record*"))


def test_tfds_builder_keeps_release_jpeg_bytes_and_extra_fields(tmp_path):
  import io

  from PIL import Image

  _write_small_release(tmp_path / "release")
  buffer = io.BytesIO()
  Image.fromarray(np.full((30, 50, 3), 90, np.uint8)).save(buffer, format="JPEG")
  jpeg = buffer.getvalue()
  (tmp_path / "release" / "images" / "Apparel__bg__10__img_0.jpg").write_bytes(jpeg)
  source = tfds_builder.build(tmp_path / "release", tmp_path / "tfds").as_data_source(split="test")
  example = tfds_builder.decode_example(source[0])
  assert example.sample.to_json() == _record()  # Unknown fields ("difficulty", "note") kept.
  assert example.images == {"Apparel__bg__10__img_0.jpg": jpeg}
  assert example.dynamic_references == {2: (1,)}
  assert example.image_references == {1: (schema.ImageRef(1, "input"),)}
