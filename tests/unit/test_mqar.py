"""bench.mqar: Zoology's MQAR data, the recall model, training and the runner.

Covers: the data's invariants (key and value ranges, each key once, every query key paired with
its label, every other label -100, determinism by seed, the power law favouring early queries),
the constraints V > L and 4 * num_kv <= L; softmax learning MQAR on a tiny setting; the runner
writing one result per case, "n/a" for mechanisms without causal_self, and resume skipping
what is stored; the presets.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from attnzoo.bench.mqar import (
    IGNORE_INDEX,
    PRESETS,
    MQARConfig,
    MQARModel,
    Segment,
    multiquery_ar,
    plan_mqar,
    preset,
    run_mqar,
    train_mqar,
    best_over_lr,
)
from attnzoo.bench.results import ResultStore
from attnzoo.errors import ParameterError
from attnzoo.registry import list_mechanisms


# the CPU is shared: two threads under load were up to 10x slower than one for these small models
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("vocab", "length", "pairs", "noise"), [(64, 32, 4, True), (300, 256, 64, True), (130, 128, 8, False)])
def test_data_invariants(vocab, length, pairs, noise):
    inputs, labels = multiquery_ar(vocab, length, pairs, 200, seed=3, random_non_queries=noise)
    assert inputs.shape == labels.shape == (200, length) and inputs.dtype == labels.dtype == torch.int64
    keys, values = inputs[:, 0 : 2 * pairs : 2], inputs[:, 1 : 2 * pairs : 2]
    assert keys.min() >= 1 and keys.max() < vocab // 2
    assert values.min() >= vocab // 2 and values.max() < vocab
    assert inputs.min() >= 0 and inputs.max() < vocab
    for row in range(200):
        pair = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert len(pair) == pairs  # each key once
        answers = (labels[row] != IGNORE_INDEX).nonzero().flatten().tolist()
        assert len(answers) == pairs and all(a >= 2 * pairs and (a - 2 * pairs) % 2 == 0 for a in answers)
        queried = [inputs[row, a].item() for a in answers]
        assert sorted(queried) == sorted(pair)  # every key is queried once, after the context
        assert all(labels[row, a].item() == pair[inputs[row, a].item()] for a in answers)
    assert ((labels == IGNORE_INDEX).sum(1) == length - pairs).all()
    if not noise:  # without noise the query region holds only the queried keys
        region = inputs[:, 2 * pairs :]
        assert ((region == 0) | (labels[:, 2 * pairs :] != IGNORE_INDEX)).all()


def test_data_is_deterministic_by_seed():
    a, b, c = (multiquery_ar(128, 64, 8, 50, seed=s) for s in (7, 7, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_query_gaps_follow_the_power_law():
    # Zoology's power_a = 0.01 puts most queries right after the context; power_a = 1 is uniform
    def mean_gap(power_a: float) -> float:
        _, labels = multiquery_ar(512, 256, 4, 2000, power_a=power_a, seed=0)
        positions = (labels != IGNORE_INDEX).nonzero()[:, 1].double()
        return float(((positions - 8) / 2).mean())

    uniform = (256 - 8) // 2
    assert abs(mean_gap(1.0) - (uniform - 1) / 2) < 3  # uniform over [0, 124): mean 61.5
    assert mean_gap(0.01) < 0.6 * mean_gap(1.0)


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(vocab_size=32, seq_len=32, num_kv_pairs=4), "vocab_size"),
        (dict(vocab_size=64, seq_len=32, num_kv_pairs=9), "num_kv_pairs"),
        (dict(vocab_size=64, seq_len=32, num_kv_pairs=0), "num_kv_pairs"),
        (dict(vocab_size=64, seq_len=32, num_kv_pairs=4, power_a=0.0), "power_a"),
    ],
)
def test_constraints_name_the_argument(kwargs, argument):
    with pytest.raises(ParameterError) as info:
        multiquery_ar(num_examples=4, **kwargs)
    assert info.value.argument == argument


def test_model_shapes_and_tied_head():
    model = MQARModel(64, 32, "linear")
    assert model(torch.randint(64, (3, 16))).shape == (3, 16, 64)
    assert model.head.weight is model.embedding.weight
    assert model.state_size() == 2 * model.layers[0].mixer.state_size()


def test_answer_logits_give_the_full_heads_ignore_index_loss():
    torch.manual_seed(0)
    model = MQARModel(64, 32, "softmax").double()
    inputs, labels = multiquery_ar(64, 32, 4, 6, seed=1)
    full = torch.nn.functional.cross_entropy(model(inputs).flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)
    logits, answers = model.answer_logits(inputs, labels)
    assert logits.shape == (24, 64) and torch.equal(answers, labels[labels != IGNORE_INDEX])
    torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, answers), full)


TINY = MQARConfig(
    vocab_size=64,
    train=(Segment(32, 4, 1000),),
    test=(Segment(32, 4, 100),),
    d_models=(32,),
    learning_rates=(1e-2,),
    epochs=12,
    batch_size=32,
    test_batch_size=100,
    early_stop=0.95,
)


def test_softmax_learns_mqar_on_a_tiny_setting():
    # measured: early stop (>= 0.95) after 5-7 epochs for seeds 0-3, 8-10 s with 1 thread on the
    # shared 2-core CPU (with 2 threads under a load of ~16 processes it once took 118 s)
    outcome = train_mqar("softmax", 32, 1e-2, TINY)
    assert outcome.accuracy >= 0.9, outcome
    assert outcome.stopped_early and outcome.steps < 12 * 32
    assert outcome.state_size is None


def test_training_lowers_the_answer_loss():
    # the fast, weaker check: 32 steps take the answer loss below 0.9 ln(V) (a uniform guess is
    # ln(V); guessing among the V/2 values, ln(V/2) = 0.83 ln(V)). Measured 3.51 < 3.74.
    config = replace(TINY, train=(Segment(32, 4, 512),), test=(Segment(32, 4, 16),), epochs=2)
    outcome = train_mqar("softmax", 32, 1e-2, config)
    assert outcome.steps == 32 and outcome.epochs == 2
    assert outcome.final_loss < 0.9 * math.log(64), outcome


def _quick(mechanisms: tuple[str, ...]) -> MQARConfig:
    return MQARConfig(
        vocab_size=64,
        train=(Segment(32, 4, 32),),
        test=(Segment(32, 4, 16), Segment(48, 6, 8)),
        d_models=(16,),
        learning_rates=(1e-3, 1e-2),
        mechanisms=mechanisms,
        epochs=1,
        batch_size=16,
    )


def test_runner_writes_one_result_per_case_and_resumes(tmp_path):
    causal_less = next(m.name for m in list_mechanisms() if "causal_self" not in m.patterns)
    config = _quick(("softmax", "linear", causal_less))
    seen = []
    with ResultStore(tmp_path / "r.sqlite") as store:
        first = run_mqar(config, store, on_case=lambda done, total, text: seen.append((done, total)))
        assert [(r.mechanism, r.metrics.get("lr")) for r in first] == [
            ("softmax", 1e-3), ("softmax", 1e-2), ("linear", 1e-3), ("linear", 1e-2), (causal_less, None)
        ]
        assert seen == [(i, 5) for i in range(1, 6)]
        rows = {(r["mechanism"], r["metrics"].get("lr")): r for r in store.results(kind="mqar")}
        softmax, linear, na = rows["softmax", 1e-2], rows["linear", 1e-2], rows[causal_less, None]
        for row in (softmax, linear):
            m = row["metrics"]
            assert 0.0 <= m["accuracy"] <= 1.0 and m["d_model"] == 16 and m["steps"] == 2 and m["train_seconds"] > 0
            assert set(m["by_segment"]) == {"L32-kv4", "L48-kv6"}
        assert linear["metrics"]["state_size"] == 2 * 16 * 17 and linear["metrics"]["state_kind"] == "recurrent"
        assert softmax["metrics"]["state_size"] is None and softmax["metrics"]["kv_cache_size"] == 2 * 2 * 48 * 16
        assert na["note"].startswith("n/a") and na["metrics"] == {}
        again = run_mqar(config, store)
        assert again == [] and len(store.results(kind="mqar")) == 5
        more = run_mqar(replace(config, d_models=(16, 8)), store)
        assert {(r.mechanism, r.metrics["d_model"]) for r in more} == {("softmax", 8), ("linear", 8)}
        summary = best_over_lr(store.results(kind="mqar", latest=True))
        assert [(s["mechanism"], s["d_model"]) for s in summary] == [("linear", 8), ("linear", 16), ("softmax", 8), ("softmax", 16)]
        for s in summary:
            runs = [r["metrics"]["accuracy"] for r in store.results(kind="mqar") if r["mechanism"] == s["mechanism"] and r["metrics"].get("d_model") == s["d_model"]]
            assert len(runs) == 2 and s["accuracy"] == max(runs)


def test_plan_covers_every_causal_mechanism_or_says_na():
    cases = plan_mqar(_quick(None))
    for mech in list_mechanisms():
        mine = [c for c in cases if c.mechanism == mech.name]
        if "causal_self" in mech.patterns:
            assert len(mine) == 2 and all(c.skip is None for c in mine)
        else:
            assert len(mine) == 1 and mine[0].skip.startswith("n/a")
    assert len({c.key for c in cases}) == len(cases)


def test_presets():
    zoology = preset("zoology")
    assert zoology.vocab_size == 8192 and zoology.num_layers == 2
    assert [(s.seq_len, s.num_kv_pairs, s.num_examples) for s in zoology.train] == [
        (64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000)
    ]
    assert max((s.seq_len, s.num_kv_pairs) for s in zoology.test) == (1024, 256)
    assert zoology.learning_rates == pytest.approx([10 ** (-3 + 0.5 * i) for i in range(4)])
    for config in PRESETS.values():  # every segment satisfies Zoology's constraints
        for s in config.train + config.test:
            assert config.vocab_size > s.seq_len and 4 * s.num_kv_pairs <= s.seq_len
    cpu = preset("cpu")
    assert max(s.seq_len for s in cpu.train) <= 256 and cpu.vocab_size < 8192
    assert preset("cpu", epochs=1).epochs == 1
    with pytest.raises(ParameterError):
        preset("gpu")
    assert math.isclose(zoology.early_stop, 0.99)


def test_extrapolation_preset_trains_at_one_length_and_tests_to_16x():
    from attnzoo.bench.mqar import EXTRAPOLATION, preset

    config = preset("extrapolation")
    assert config is not None and config == EXTRAPOLATION
    train_lengths = {s.seq_len for s in config.train}
    test_lengths = [s.seq_len for s in config.test]
    assert train_lengths == {64} and max(test_lengths) == 16 * 64
    assert all(s.num_kv_pairs * 16 == s.seq_len for s in config.test)  # Zoology's L / 16 pairs
    assert config.vocab_size > max(test_lengths)
    assert dict(config.overrides)["window"] == (32, 0)  # fixed across lengths
    assert config.early_stop > 1.0


def test_mqar_length_table_shows_each_test_length():
    from rich.console import Console

    from attnzoo.bench.mqar import EXTRAPOLATION
    from attnzoo.cli.bench import mqar_length_table

    rows = [{"mechanism": "softmax", "metrics": {"d_model": 64, "accuracy": 0.5, "lr": 3e-3,
             "by_segment": {"L64-kv4": 1.0, "L1024-kv64": 0.25}}}]
    console = Console(record=True, width=200)
    console.print(mqar_length_table(rows, EXTRAPOLATION))
    text = console.export_text()
    assert "L=64*" in text and "L=1024" in text and "1.000" in text and "0.250" in text
