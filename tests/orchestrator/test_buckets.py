"""Axes that vary in the spec (dynamic axes, buckets, pad values, traffic, output axes), each bad
declaration refused before Ray with its field path; the shape plans settled before Ray (axes traced,
padding verified or refused on eager fp32); the store's selections keyed by shape point too."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
import torch

from aitune.specs import Sample
from orchestrator.planning.candidates import ModelLoadError, make_sample, samples_key
from orchestrator.planning.shape_plans import settle_shapes
from orchestrator.records import SelectionRecord
from orchestrator.spec.schema import SpecError, parse_spec
from orchestrator.store import DB_NAME, SCHEMA_VERSION, SqliteStore

IDS = {"name": "input_ids", "shape": ["seq"], "dtype": "int64", "int_range": [0, 100], "kwarg": True,
       "dynamic": {"seq": {"buckets": [8, 16], "pad": 0}}}
MASK = {"name": "attention_mask", "shape": ["seq"], "dtype": "int64", "int_range": [1, 2], "kwarg": True,
        "dynamic": {"seq": {"pad": 0}}}
TAGGER = {"name": "tagger", "factory": "aitune.examples:token_tagger", "inputs": [IDS, MASK]}
ENCODER = {"name": "enc", "factory": "aitune.examples:small_encoder", "kwargs": {"dim": 32, "layers": 1},
           "inputs": [{"name": "tokens", "shape": ["seq"], "dtype": "int64", "int_range": [0, 1000],
                       "dynamic": {"seq": {"buckets": [8, 16], "pad": 0}}}]}


def spec_of(*models, **fields):
    return parse_spec({"models": list(models), "batch_sizes": [1, 2], **fields})


def refused(*models) -> str:
    with pytest.raises(SpecError) as caught:
        spec_of(*models)
    return str(caught.value)


def test_points_and_traffic_weights_follow_the_declaration():
    model = spec_of({**TAGGER, "traffic": {"seq": {5: 0.6, "12": 0.3, 16: 0.1}}}).models[0]
    assert model.axes() == {"seq": [8, 16]} and model.points() == [{"seq": 8}, {"seq": 16}]
    weights = model.traffic_weights()["seq"]
    assert weights[8] == pytest.approx(0.6) and weights[16] == pytest.approx(0.4)  # 12 and 16 pad to 16
    uniform = spec_of(TAGGER).models[0].traffic_weights()["seq"]
    assert uniform == {8: 0.5, 16: 0.5}
    assert spec_of({**TAGGER, "inputs": [{**IDS, "shape": [8], "dynamic": None}]}).models[0].points() == [{}]


@pytest.mark.parametrize("change, where, said", [
    ({"inputs": [{**IDS, "dynamic": {"sq": {"buckets": [8]}}}, MASK]}, "models[0].inputs[0].dynamic.sq",
     "unknown axis 'sq': shape ['seq'] names 'seq'"),
    ({"inputs": [{**IDS, "dynamic": None}, MASK]}, "models[0].inputs[0].shape[0]", "axis 'seq' is not declared"),
    ({"inputs": [{**IDS, "dynamic": {"seq": {"buckets": [16, 8]}}}, MASK]}, "models[0].inputs[0].dynamic.seq.buckets",
     "strictly increasing, got [16, 8]"),
    ({"inputs": [{**IDS, "dtype": "int8", "int_range": [0, 100], "dynamic": {"seq": {"buckets": [8], "pad": 300}}}, MASK]},
     "models[0].inputs[0].dynamic.seq.pad", "pad 300 does not fit int8"),
    ({"inputs": [IDS, {**MASK, "dynamic": {"seq": {"pad": 0.5}}}]}, "models[0].inputs[1].dynamic.seq.pad",
     "pad 0.5 is not an integer"),
    ({"inputs": [{**IDS, "dynamic": {"seq": {"pad": 0}}}, MASK]}, "models[0].inputs[0].dynamic.seq",
     "axis 'seq' has no buckets"),
    ({"inputs": [IDS, {**MASK, "dynamic": {"seq": {"buckets": [8, 32]}}}]}, "models[0].inputs[1].dynamic.seq.buckets",
     "has buckets [8, 16] in inputs[0]; give them once"),
    ({"traffic": {"len": {8: 1.0}}}, "models[0].traffic.len", "unknown axis 'len'"),
    ({"traffic": {"seq": {40: 1.0}}}, "models[0].traffic.seq[40]", "length 40 is outside 1..16"),
    ({"traffic": {"seq": {8: -1.0}}}, "models[0].traffic.seq[8]", "greater than 0"),
    ({"output_axes": {"len": {"output": 1}}}, "models[0].output_axes.len", "unknown axis 'len'"),
    ({"inputs": [{**IDS, "shape": ["s/q"], "dynamic": {"s/q": {"buckets": [8]}}}]}, "models[0].inputs[0].shape[0]",
     "axis name 's/q' must be letters, digits and '_'"),
    ({"inputs": None, "sample_factory": "aitune.examples:image_sample", "dynamic": {"seq": {"buckets": [8]}}},
     "models[0].sample_factory", "can't be called with ['batch_size', 'seed']"),
    ({"dynamic": {"seq": {"buckets": [8]}}}, "models[0].dynamic", "'dynamic' at the model is for a sample_factory's axes"),
    ({"inputs": None, "sample_factory": "test_buckets:fixed_sample", "dynamic": {"seq": {"buckets": [8]}}},
     "models[0].sample_factory", "can't be called with ['batch_size', 'lengths', 'seed']"),
])
def test_a_bad_declaration_is_refused_with_its_field_path(change, where, said):
    text = refused({**TAGGER, **change})
    assert f"{where}: " in text and said in text, text


def test_a_bad_declaration_stops_tune_before_ray_starts(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("models:\n  - name: tagger\n    factory: aitune.examples:token_tagger\n    inputs:\n"
                    "      - {name: input_ids, shape: [seq], dtype: int64, kwarg: true, dynamic: {seq: {buckets: [64, 32]}}}\n"
                    "      - {name: attention_mask, shape: [seq], dtype: int64, kwarg: true, dynamic: {seq: {pad: 0}}}\n"
                    f"batch_sizes: [1]\nstore: {tmp_path / 'store'}\n")
    from env_helpers import child_env

    done = subprocess.run([sys.executable, "-m", "orchestrator", "tune", str(spec)], capture_output=True, text=True,
                          timeout=300, env=child_env())
    assert done.returncode == 2, done.stderr
    said = done.stdout + done.stderr
    assert "models[0].inputs[0].dynamic.seq.buckets: buckets must be strictly increasing, got [64, 32]" in said
    assert "Started a local Ray" not in said and not (tmp_path / "store").exists()


def test_each_bucket_has_its_own_samples_and_keys():
    model = spec_of(TAGGER).models[0]
    short, long = make_sample(model, 2, {"seq": 8}), make_sample(model, 2, {"seq": 16})
    assert short.kwargs["input_ids"].shape == (2, 8) and long.kwargs["input_ids"].shape == (2, 16)
    assert torch.equal(make_sample(model, 2, {"seq": 8}).kwargs["input_ids"], short.kwargs["input_ids"])
    assert samples_key(model, 2, {"seq": 8}) != samples_key(model, 2, {"seq": 16}) != samples_key(model, 2)


def test_shape_plans_trace_the_axes_and_verify_or_refuse_padding_on_eager_fp32():
    plans = settle_shapes(spec_of(TAGGER, ENCODER))
    tagger, enc = plans["tagger"], plans["enc"]
    assert tagger.pads and tagger.outputs_from == "traced"
    (axis,) = tagger.shapes.axes
    assert axis.inputs == (("input_ids", 1, 0), ("attention_mask", 1, 0))
    assert axis.outputs == ((0, "output['logits']", 1),)  # the pooled output does not follow seq
    assert "padding verified on eager fp32" in tagger.line("tagger")
    assert not enc.pads and enc.padding.startswith("padding seq 1 up to 8 changes the outputs")
    assert "padding refused: " in enc.line("enc")


def fixed_sample(batch_size: int, seed: int) -> Sample:
    """A sample factory that can't take lengths."""
    return lengths_sample(batch_size, seed, {})


def lengths_sample(batch_size: int, seed: int, lengths: dict[str, int]) -> Sample:
    """A sample factory that takes the bucket lengths (tests: a model with its own sample maker)."""
    n = lengths.get("seq", 8)
    ids = torch.randint(0, 100, (batch_size, n), generator=torch.Generator().manual_seed(seed + n))
    return Sample((), {"input_ids": ids, "attention_mask": torch.ones(batch_size, n, dtype=torch.int64)})


def test_a_sample_factory_takes_the_lengths_and_its_axes_are_traced():
    model = {"name": "tagger", "factory": "aitune.examples:token_tagger",
             "sample_factory": "test_buckets:lengths_sample", "dynamic": {"seq": {"buckets": [4, 8], "pad": {"input_ids": 0}}}}
    plan = settle_shapes(spec_of(model))["tagger"]
    assert plan.pads and plan.shapes.axes[0].inputs == (("input_ids", 1, 0), ("attention_mask", 1, 0))
    wrong = {**model, "dynamic": {"seq": {"buckets": [4, 8], "pad": {"ids": 0}}}}
    with pytest.raises(ModelLoadError, match=r"models\[0\]\.dynamic\.seq\.pad: no input named ids"):
        settle_shapes(spec_of(wrong))


def test_declared_output_axes_are_used_and_a_missing_output_is_named():
    plan = settle_shapes(spec_of({**TAGGER, "output_axes": {"seq": {"output['logits']": 1}}}))["tagger"]
    assert plan.outputs_from == "declared" and plan.pads
    with pytest.raises(ModelLoadError, match=r"models\[0\]\.output_axes\.seq: no output 'logits'; outputs: output\['logits'\]"):
        settle_shapes(spec_of({**TAGGER, "output_axes": {"seq": {"logits": 1}}}))


# -- the store: selections keyed by shape point (schema 4), a version 3 store migrated ------------------
def selection(shape: str) -> SelectionRecord:
    return SelectionRecord("tagger", 2, "d" * 64, f"k-{shape}", "eager", "why", shape=shape)


def test_selections_of_one_batch_at_two_shape_points_are_both_kept(tmp_path):
    with SqliteStore(tmp_path / "s") as store:
        sweep = store.begin_sweep("b", {})
        store.put_selection(sweep, selection("seq=8"))
        store.put_selection(sweep, selection("seq=16"))
        assert sorted(s.shape for s in store.selections(sweep)) == ["seq=16", "seq=8"]


def test_a_version_3_store_is_migrated_keeping_its_selections(tmp_path):
    root = tmp_path / "s"
    with SqliteStore(root) as store:
        sweep = store.begin_sweep("old", {})
        store.put_selection(sweep, selection(""))
    db = sqlite3.connect(root / DB_NAME)
    db.executescript("""
        CREATE TABLE selections_3 (sweep_id TEXT NOT NULL, model TEXT NOT NULL, batch_size INTEGER NOT NULL,
            device_class_key TEXT NOT NULL, record_json TEXT NOT NULL, PRIMARY KEY (sweep_id, model, batch_size, device_class_key));
        INSERT INTO selections_3 SELECT sweep_id, model, batch_size, device_class_key, record_json FROM selections;
        DROP TABLE selections; ALTER TABLE selections_3 RENAME TO selections;
        DELETE FROM schema_version; INSERT INTO schema_version (version) VALUES (3);
    """)
    db.close()
    with SqliteStore(root, readonly=True) as reader:  # read as it is
        assert [s.winner_key for s in reader.selections(sweep)] == ["k-"]
    with SqliteStore(root) as store:
        store.put_selection(sweep, selection("seq=8"))
        assert sorted(s.shape for s in store.selections(sweep)) == ["", "seq=8"]
    db = sqlite3.connect(root / DB_NAME)
    assert db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] == SCHEMA_VERSION == 4
    assert "shape" in [r[1] for r in db.execute("PRAGMA table_info(selections)")]
    db.close()



def test_the_report_weighs_each_buckets_winner_by_the_traffic_mix():
    from orchestrator.outcome.buckets import bucket_figures, bucket_lines
    from orchestrator.records import ResultRecord
    from sweep_helpers import measurement

    spec = spec_of({**TAGGER, "traffic": {"seq": {5: 0.75, 16: 0.25}}})
    results, selections = [], []
    for shape, ms in (("seq=8", 1.0), ("seq=16", 3.0)):
        results.append(ResultRecord(key=f"k{shape}", model="tagger", batch_size=2, backend="B", config={}, candidate="c",
                                    status="ok", device_class_key="d" * 64, measurement=measurement(ms), shape=shape))
        selections.append(SelectionRecord("tagger", 2, "d" * 64, f"k{shape}", "c", "why", shape=shape))
    (figures,) = bucket_figures(spec, selections, results)
    assert figures["traffic"] == {"seq=8": 0.75, "seq=16": 0.25}
    assert figures["expected_ms"] == pytest.approx(0.75 * 1.0 + 0.25 * 3.0) and figures["largest_ms"] == 3.0
    (line,) = bucket_lines([figures])
    assert line.startswith("buckets of tagger b2 on ?: seq=8 1.000 ms (75%), seq=16 3.000 ms (25%)")
    assert "expected under the traffic mix 1.500 ms a call, always the largest bucket 3.000 ms (2.00x)" in line
    # a fixed-shape model has no such line
    assert bucket_figures(spec, [SelectionRecord("tagger", 2, "d" * 64, "x", "c", "why")], results) == []


def _strategy_inputs(static_ms: dict, dynamic_ms: dict | None):
    from orchestrator.records import ResultRecord
    from sweep_helpers import measurement

    results, selections = [], []
    for shape, ms in static_ms.items():
        results.append(ResultRecord(key=f"k{shape}", model="tagger", batch_size=2, backend="B", config={}, candidate="c",
                                    status="ok", device_class_key="d" * 64, measurement=measurement(ms), shape=shape))
        selections.append(SelectionRecord("tagger", 2, "d" * 64, f"k{shape}", "c", "why", shape=shape))
    results.append(ResultRecord(key="kdyn", model="tagger", batch_size=2, backend="B", config={}, candidate="dyn",
                                status="ok", device_class_key="d" * 64, measurement=measurement(1.0),
                                shape="seq=2..16", bucket_ms=dynamic_ms))
    selections.append(SelectionRecord("tagger", 2, "d" * 64, "kdyn", "dyn", "why", shape="seq=2..16"))
    return results, selections


@pytest.mark.parametrize("static_ms, dynamic_ms, chosen", [
    ({"seq=8": 1.0, "seq=16": 3.0}, {"seq=8": 1.2, "seq=16": 2.0}, "dynamic"),   # 0.75*1.2+0.25*2.0=1.4 < 1.5
    ({"seq=8": 1.0, "seq=16": 3.0}, {"seq=8": 1.5, "seq=16": 2.0}, "static"),    # 1.625 > 1.5
    ({"seq=8": 1.0}, {"seq=8": 9.0, "seq=16": 9.0}, "dynamic"),                 # no static winner at seq=16
    ({"seq=8": 1.0, "seq=16": 3.0}, {"seq=8": 0.1}, "static"),                  # the dynamic one lacks seq=16
    ({"seq=8": 1.0, "seq=16": 3.0}, None, "static"),
])
def test_the_cheaper_strategy_under_the_traffic_mix_serves(static_ms, dynamic_ms, chosen):
    from orchestrator.outcome.shape_strategy import choose_strategies, strategy_lines

    spec = spec_of({**TAGGER, "traffic": {"seq": {5: 0.75, 16: 0.25}}})
    results, selections = _strategy_inputs(static_ms, dynamic_ms)
    (figures,) = choose_strategies(spec, selections, results)
    assert figures["chosen"] == chosen
    superseded = {s.shape for s in selections if s.superseded}
    assert superseded == ({"seq=2..16"} if chosen == "static" else set(static_ms))
    (line,) = strategy_lines([figures])
    assert line.startswith("shapes of tagger b2 on ?: static buckets (seq=8 1.000") and line.endswith(f"{chosen} chosen")
