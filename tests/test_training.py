import gzip
import json
import os
import signal

import pytest
import torch

from dflash_core.checkpoint import load_draft, save_draft
from dflash_core.cli_training import find_data_file
from dflash_core.draft import default_target_layer_ids
from dflash_core.drafting import DFlashDrafter, DraftRequest
from dflash_core.engine import SpeculativeEngine
from dflash_core.sampling import SamplingParams
from dflash_core.training import target_states
from dflash_core.training.blocks import (
    accepted_draft_tokens,
    block_attention_mask,
    default_gamma,
    draft_blocks_forward,
    sample_anchors,
    slot_weights,
)
from dflash_core.training.data import read_sequences
from dflash_core.training.datagen import done_record_ids, generate_responses
from dflash_core.training.target_states import (
    StateRecorder,
    features_file,
    load_or_run_target,
    tap_target,
    teacher_file,
)
from dflash_core.training.trainer import DraftTrainer, TrainConfig
from tests.helpers import VOCAB, assert_close, random_target


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return random_target(tmp_path_factory.mktemp("llama"), "llama", num_hidden_layers=4)


def test_block_mask_limits_each_block():
    mask = block_attention_mask(torch.tensor([2, 5]), block_size=3, num_context=7)
    assert mask.shape == (6, 7 + 6)
    for query in range(3):  # block 0, anchor 2
        assert mask[query, :7].tolist() == [True, True, False, False, False, False, False]
        assert mask[query, 7:].tolist() == [True, True, True, False, False, False]
    for query in range(3, 6):  # block 1, anchor 5
        assert mask[query, :7].tolist() == [True] * 5 + [False] * 2
        assert mask[query, 7:].tolist() == [False, False, False, True, True, True]


def test_slot_weights_decay():
    weights = slot_weights(4, gamma=2.0)
    assert weights[0] == 0.0
    assert_close(weights[1:], torch.exp(-torch.tensor([0.0, 1.0, 2.0]) / 2.0), 1e-6, "weights")
    assert default_gamma(16) == 7.0
    assert default_gamma(10) == 5.0
    assert default_gamma(8) == 4.0


def test_anchor_bounds():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        anchors = sample_anchors(num_tokens=30, response_start=10, max_anchors=8, generator=gen)
        assert len(anchors) == 8
        assert len(set(anchors.tolist())) == 8
        assert anchors.min() >= 10
        assert anchors.max() <= 28
    assert sample_anchors(12, 11, 8, gen).numel() == 0  # no token left to predict
    assert sample_anchors(5, 0, 8, gen).tolist() == [1, 2, 3]


def test_training_forward_matches_inference_drafter(target):
    trainer = DraftTrainer(
        target, [], TrainConfig(num_layers=2, block_size=4, num_tapped_layers=2), "unused"
    )
    model = trainer.model.eval()
    tokens = torch.randint(0, VOCAB, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        tapped = target(
            tokens[None], target.new_cache(1, 32), torch.tensor([0]), model.config.target_layer_ids
        ).tapped[0]
        anchors = torch.tensor([3, 9, 15])
        positions = (anchors[:, None] + torch.arange(4)).flatten()
        block_ids = torch.full((3, 4), model.config.mask_token_id)
        block_ids[:, 0] = tokens[anchors]
        hidden = draft_blocks_forward(
            model,
            target.embed_tokens(block_ids.flatten()),
            positions,
            model.context_features(tapped[None])[0],
            block_attention_mask(anchors, 4, 20),
        )
        trained_view = target.lm_head(hidden).view(3, 4, -1)[:, 1:]
    for j, anchor in enumerate(anchors.tolist()):
        drafter = DFlashDrafter.for_target(model, target, num_slots=1, max_seq_len=32)
        request = DraftRequest(
            [0], [0], [tapped[:anchor]], [tokens[:anchor].tolist()], [int(tokens[anchor])]
        )
        assert_close(drafter.draft(request)[0], trained_view[j], 1e-4, f"anchor {anchor}")


def write_data(target, path, count=12, max_new_tokens=40):
    engine = SpeculativeEngine(target, None, max_seq_len=80, num_slots=4)
    gen = torch.Generator().manual_seed(2)
    prompts = [
        (f"toy/{i}", torch.randint(0, VOCAB, (6,), generator=gen).tolist()) for i in range(count)
    ]
    return generate_responses(engine, prompts, path, SamplingParams(max_new_tokens=max_new_tokens))


def test_datagen_resumes_after_interruption(target, tmp_path):
    path = tmp_path / "data.jsonl"
    assert write_data(target, path, count=5) == 5
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:10])  # a cut last line
    assert done_record_ids(path) == {json.loads(line)["record_id"] for line in lines[:3]}
    assert write_data(target, path, count=5) == 2
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted(r["record_id"] for r in records) == [f"toy/{i}" for i in range(5)]
    assert all(len(r["response_ids"]) == 40 for r in records)


def test_datagen_records_the_states_training_reads(target, tmp_path, monkeypatch):
    layer_ids = default_target_layer_ids(target.config.num_layers, 2)
    # Sequences longer than max_len are cut by training; the recorder keys them the same way.
    recorder = StateRecorder(tmp_path, layer_ids, max_len=34)
    engine = SpeculativeEngine(
        target, None, max_seq_len=80, num_slots=3, tap_layer_ids=layer_ids, on_tapped=recorder.add
    )
    gen = torch.Generator().manual_seed(4)
    prompts = [
        (f"toy/{i}", torch.randint(0, VOCAB, (3 + i,), generator=gen).tolist()) for i in range(5)
    ]
    out = tmp_path / "responses.jsonl"
    generate_responses(engine, prompts, out, SamplingParams(max_new_tokens=30), recorder)
    sequences = read_sequences(out, max_len=34, features_dir=tmp_path)
    assert {len(seq.token_ids) for seq in sequences} == {33, 34}  # cut and uncut ones
    expected = tap_target(target, sequences, layer_ids)

    def no_target_pass(*args, **kwargs):
        raise AssertionError("datagen should have saved every sequence's target states")

    monkeypatch.setattr("dflash_core.training.target_states.run_target", no_target_pass)
    found = load_or_run_target(target, tmp_path, sequences, layer_ids)
    for seq, want, got in zip(sequences, expected, found):
        assert got.tapped.shape == want.shape, seq.record_id
        # Batched decoding and one full pass round to the same bf16 values, or one ulp apart.
        torch.testing.assert_close(got.tapped[:-1], want[:-1], atol=1e-2, rtol=1e-2)


def test_datagen_sigterm_saves_finished_states(target, tmp_path):
    layer_ids = default_target_layer_ids(target.config.num_layers, 2)
    recorder = StateRecorder(tmp_path, layer_ids, max_len=64)

    sent = []

    def add_then_stop(request_id, states):
        # The first step after a response finished: stop the run like a job scheduler would.
        recorder.add(request_id, states)
        if recorder.unsaved and not sent:
            sent.append(request_id)
            os.kill(os.getpid(), signal.SIGTERM)

    engine = SpeculativeEngine(
        target, None, max_seq_len=80, num_slots=2, tap_layer_ids=layer_ids, on_tapped=add_then_stop
    )
    prompts = [(f"toy/{i}", list(range(3, 3 + 2 * i + 2))) for i in range(4)]
    out = tmp_path / "responses.jsonl"
    # An earlier test's ray.init may have installed its own handler; datagen must put it back.
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit):
        generate_responses(engine, prompts, out, SamplingParams(max_new_tokens=12), recorder)
    assert signal.getsignal(signal.SIGTERM) is before
    written = done_record_ids(out)
    assert 1 <= len(written) < 4
    saved = torch.load(features_file(tmp_path, layer_ids), weights_only=False)["records"]
    assert set(saved) == written


def test_accepted_draft_tokens_stop_at_first_miss():
    correct = torch.tensor(
        [
            [False, True, True, False, True],
            [False, False, True, True, True],
            [True, True, True, True, True],  # slot 0 is the anchor and never counts
        ]
    )
    assert accepted_draft_tokens(correct).tolist() == [2, 0, 4]


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_tiny_training_lowers_loss_and_saves_checkpoint(target, tmp_path, precision):
    data = tmp_path / "data.jsonl"
    write_data(target, data)
    sequences = read_sequences(data, max_len=64)
    config = TrainConfig(
        num_layers=1,
        block_size=4,
        num_tapped_layers=2,
        anchors_per_sequence=16,
        learning_rate=3e-3,
        epochs=6,
        sequences_per_step=4,
        checkpoint_every=5,
        mask_token_id=VOCAB - 1,
        precision=precision,
    )
    trainer = DraftTrainer(target, sequences, config, tmp_path / "draft")
    trainer.features = tap_target(target, sequences, trainer.model.config.target_layer_ids)
    gen = torch.Generator().manual_seed(0)
    before = sum(float(trainer.sequence_loss(i, gen)[0].detach()) for i in range(len(sequences)))
    summary = trainer.train()
    after = sum(float(trainer.sequence_loss(i, gen)[0].detach()) for i in range(len(sequences)))
    assert after < 0.8 * before, (before, after)
    assert summary["steps"] == 18
    assert 1.0 <= summary["train_acceptance_length"] <= config.block_size
    assert summary["train_acceptance_steps"] == 18
    loaded = load_draft(tmp_path / "draft")
    assert loaded.config == trainer.model.config
    assert (tmp_path / "draft" / "training_summary.json").is_file()


def test_training_resumes_from_checkpoint(target, tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(target, data, count=8)
    sequences = read_sequences(data, max_len=64)
    config = TrainConfig(
        num_layers=1,
        block_size=4,
        num_tapped_layers=1,
        anchors_per_sequence=8,
        epochs=2,
        sequences_per_step=4,
        checkpoint_every=2,
        mask_token_id=1,
    )
    full = DraftTrainer(target, sequences, config, tmp_path / "full")
    full.train()
    # Stop a second run after 2 steps (a checkpoint), then resume it in a new trainer.
    DraftTrainer(target, sequences, config, tmp_path / "resumed").train(stop_at_step=2)
    resumed = DraftTrainer(target, sequences, config, tmp_path / "resumed")
    resumed.train()
    assert resumed.step == full.step == 4
    for name, tensor in full.model.state_dict().items():
        assert_close(resumed.model.state_dict()[name], tensor, 1e-5, name)


def test_resumed_run_reads_cached_target_states(target, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    write_data(target, data, count=4)
    sequences = read_sequences(data, max_len=64)
    config = TrainConfig(
        num_layers=1,
        block_size=4,
        num_tapped_layers=1,
        anchors_per_sequence=4,
        epochs=2,
        sequences_per_step=2,
        checkpoint_every=1,
        mask_token_id=1,
    )
    DraftTrainer(target, sequences, config, tmp_path / "out").train(stop_at_step=1)
    layer_ids = DraftTrainer(
        target, sequences, config, tmp_path / "x"
    ).model.config.target_layer_ids
    assert features_file(tmp_path / "out", layer_ids).is_file()

    def no_target_pass(*args, **kwargs):
        raise AssertionError("the cached target states should have been read")

    monkeypatch.setattr("dflash_core.training.target_states.run_target", no_target_pass)
    resumed = DraftTrainer(target, sequences, config, tmp_path / "out")
    resumed.train()
    assert resumed.step == 4


def test_grown_data_taps_only_new_records(target, tmp_path, monkeypatch):
    data = tmp_path / "data.jsonl"
    write_data(target, data, count=6)
    sequences = read_sequences(data, max_len=64)
    config = TrainConfig(
        num_layers=1,
        block_size=4,
        num_tapped_layers=1,
        epochs=1,
        sequences_per_step=2,
        mask_token_id=1,
    )
    first = DraftTrainer(target, sequences[:4], config, tmp_path / "a", features_dir=tmp_path)
    first.train()
    tapped = []

    real_run = target_states.run_target

    def counting_run(model, seqs, layer_ids, top_k=0):
        tapped.extend(seq.record_id for seq in seqs)
        return real_run(model, seqs, layer_ids, top_k)

    monkeypatch.setattr(target_states, "run_target", counting_run)
    second = DraftTrainer(target, sequences, config, tmp_path / "b", features_dir=tmp_path)
    second.train()
    assert tapped == [seq.record_id for seq in sequences[4:]]
    expected = tap_target(target, sequences, second.model.config.target_layer_ids)
    for got, want in zip(second.features, expected):
        assert torch.equal(got, want)


def test_data_folders_with_shared_ids(target, tmp_path):
    # Two datagen runs over the same prompts (say greedy and sampled) reuse the record ids.
    write_data(target, tmp_path / "short" / "data.jsonl", count=3, max_new_tokens=10)
    write_data(target, tmp_path / "long" / "data.jsonl", count=3, max_new_tokens=30)
    sequences = []
    for name in ("short", "long"):
        folder = tmp_path / name
        sequences += read_sequences(folder / "data.jsonl", max_len=64, features_dir=folder)
    assert sequences[0].record_id == sequences[3].record_id
    config = TrainConfig(
        num_layers=1, block_size=4, num_tapped_layers=1, epochs=1, sequences_per_step=3
    )
    trainer = DraftTrainer(target, sequences, config, tmp_path / "out")
    trainer.train()
    layer_ids = trainer.model.config.target_layer_ids
    for name in ("short", "long"):
        assert features_file(tmp_path / name, layer_ids).is_file()
    assert not features_file(tmp_path / "out", layer_ids).exists()
    expected = tap_target(target, sequences, layer_ids)
    for got, want in zip(trainer.features, expected):
        assert torch.equal(got, want)


def test_repeated_record_id_rejected(target, tmp_path):
    write_data(target, tmp_path / "data.jsonl", count=2)
    sequences = read_sequences(tmp_path / "data.jsonl", max_len=64, features_dir=tmp_path)
    config = TrainConfig(num_layers=1, block_size=4, num_tapped_layers=1, epochs=1)
    trainer = DraftTrainer(target, sequences + sequences[:1], config, tmp_path / "out")
    with pytest.raises(ValueError, match="record id 'toy/0' appears twice"):
        trainer.train()


def test_teacher_cache_holds_target_top_k(target, tmp_path):
    write_data(target, tmp_path / "data.jsonl", count=2)
    sequences = read_sequences(tmp_path / "data.jsonl", max_len=64)
    config = TrainConfig(
        num_layers=1,
        block_size=4,
        num_tapped_layers=1,
        epochs=1,
        distill_weight=0.5,
        distill_top_k=5,
    )
    trainer = DraftTrainer(target, sequences, config, tmp_path / "out")
    trainer.train()
    assert teacher_file(tmp_path / "out", 5).is_file()
    seq = sequences[1]
    ids = torch.tensor([seq.token_ids])
    out = target(ids, target.new_cache(1, ids.shape[1]), torch.tensor([0]))
    expected = target.logits(out.hidden[0]).softmax(-1).topk(5, dim=-1)
    top_ids, top_probs = trainer.teacher[1]
    start = seq.response_start  # rows before it (the prompt) are never read, and stay zero
    assert torch.equal(top_ids[start:].long(), expected.indices[start:])
    assert_close(top_probs[start:].float(), expected.values[start:], 1e-3, "top-k probabilities")
    assert not top_probs[:start].any()


def test_top1_teacher_equals_greedy_labels(target, tmp_path):
    # On greedy responses each token is the target's top-1 pick, so a top-1 teacher is the
    # data's token and the soft loss equals the plain cross-entropy.
    write_data(target, tmp_path / "data.jsonl", count=3)
    sequences = read_sequences(tmp_path / "data.jsonl", max_len=64)
    losses = []
    for weight in (0.0, 1.0):
        config = TrainConfig(
            num_layers=1,
            block_size=4,
            num_tapped_layers=1,
            anchors_per_sequence=8,
            distill_weight=weight,
            distill_top_k=1,
        )
        trainer = DraftTrainer(target, sequences, config, tmp_path / f"out{weight}")
        trainer._load_target_states()
        gen = torch.Generator().manual_seed(0)
        losses.append([trainer.sequence_loss(i, gen)[0].item() for i in range(3)])
    assert_close(torch.tensor(losses[1]), torch.tensor(losses[0]), 1e-5, "losses")


@pytest.mark.parametrize(("field", "value"), [("distill_weight", 1.5), ("distill_top_k", 0)])
def test_invalid_distillation_option_is_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


def test_gzipped_data_reads_like_plain(target, tmp_path):
    plain = tmp_path / "plain" / "responses.jsonl"
    write_data(target, plain, count=3)
    packed = tmp_path / "packed" / "responses.jsonl.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert find_data_file(tmp_path / "packed") == packed
    assert find_data_file(tmp_path / "plain") == plain
    assert read_sequences(packed, max_len=64) == read_sequences(plain, max_len=64)
    with pytest.raises(FileNotFoundError, match="--data .*empty: no such file"):
        find_data_file(tmp_path / "empty")


def test_data_vocab_matches_full_head_rows(target, tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(target, data, count=4)
    sequences = read_sequences(data, max_len=64)
    base = dict(num_layers=1, block_size=4, num_tapped_layers=1, mask_token_id=1)
    small = DraftTrainer(target, sequences, TrainConfig(**base), tmp_path / "small")
    full = DraftTrainer(
        target, sequences, TrainConfig(**base, train_vocab="full"), tmp_path / "full"
    )
    tokens = sorted({t for seq in sequences for t in seq.token_ids})
    assert small.head.shape[0] == len(tokens) < full.head.shape[0]
    assert small.model.config.draft_vocab_ids == tuple(tokens)
    assert full.model.config.draft_vocab_ids == ()
    rows = small.label_rows[torch.tensor(tokens)]
    assert torch.equal(small.head[rows], full.head[torch.tensor(tokens)])
    unused = [t for t in range(full.head.shape[0]) if t not in set(tokens)]
    assert (small.label_rows[torch.tensor(unused)] == -100).all()
    # Same weights and anchors: the data-vocabulary loss is the full loss with fewer
    # competing tokens, so it can only be lower.
    small.model.load_state_dict(full.model.state_dict())
    small.features = full.features = tap_target(
        target, sequences, small.model.config.target_layer_ids
    )
    for index in range(len(sequences)):
        loss_small = small.sequence_loss(index, torch.Generator().manual_seed(index))[0]
        loss_full = full.sequence_loss(index, torch.Generator().manual_seed(index))[0]
        assert float(loss_small.detach()) <= float(loss_full.detach()) + 1e-5


def test_unknown_train_vocab_is_rejected():
    with pytest.raises(ValueError, match="'words' is not one of data, full"):
        TrainConfig(train_vocab="words")


def test_unknown_precision_is_rejected():
    with pytest.raises(ValueError, match="'half' is not one of float32, bfloat16"):
        TrainConfig(precision="half")


def test_init_from_starts_from_a_draft(target, tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(target, data, count=4)
    sequences = read_sequences(data, max_len=64)
    base = dict(num_layers=1, block_size=4, num_tapped_layers=1, mask_token_id=1)
    start = DraftTrainer(target, sequences, TrainConfig(**base, seed=5), tmp_path / "a")
    save_draft(start.model, tmp_path / "start")
    fresh = DraftTrainer(target, sequences, TrainConfig(**base), tmp_path / "b")
    warm = DraftTrainer(
        target, sequences, TrainConfig(**base, init_from=str(tmp_path / "start")), tmp_path / "c"
    )
    fresh_differs = False
    for name, tensor in start.model.state_dict().items():
        assert torch.equal(warm.model.state_dict()[name], tensor), name
        fresh_differs |= not torch.equal(fresh.model.state_dict()[name], tensor)
    assert fresh_differs  # the seeds differ, so equal weights come from init_from
    shallower = TrainConfig(**{**base, "num_layers": 0}, init_from=str(tmp_path / "start"))
    with pytest.raises(ValueError, match="does not fit this run.*--layers no smaller than its 1"):
        DraftTrainer(target, sequences, shallower, tmp_path / "d")
    missing = TrainConfig(**base, init_from=str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match=r"\(--init-from\) .*missing: no draft there"):
        DraftTrainer(target, sequences, missing, tmp_path / "e")


def test_init_from_grows_layers_as_no_ops(target, tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(target, data, count=3)
    sequences = read_sequences(data, max_len=64)
    base = dict(block_size=4, num_tapped_layers=1, mask_token_id=1)
    start = DraftTrainer(
        target, sequences, TrainConfig(**base, num_layers=1, seed=5), tmp_path / "a"
    )
    save_draft(start.model, tmp_path / "start")
    grown = DraftTrainer(
        target,
        sequences,
        TrainConfig(**base, num_layers=3, init_from=str(tmp_path / "start")),
        tmp_path / "b",
    )
    assert len(grown.model.layers) == 3

    for name, tensor in start.model.layers[0].state_dict().items():
        assert torch.equal(grown.model.layers[0].state_dict()[name], tensor), name
    # The added layers are not all zero: only their output projections are, so they can learn.
    assert grown.model.layers[2].self_attn.q_proj.weight.abs().sum() > 0

    start.features = grown.features = tap_target(
        target, sequences, start.model.config.target_layer_ids
    )
    for index in range(len(sequences)):
        ours = grown.sequence_loss(index, torch.Generator().manual_seed(index))
        theirs = start.sequence_loss(index, torch.Generator().manual_seed(index))
        torch.testing.assert_close(ours[0], theirs[0])  # same loss: same logits
        assert torch.equal(ours[2], theirs[2])  # same hits per slot

    # Training moves the added layers away from the no-op start.
    grown.train(stop_at_step=1)
    assert grown.model.layers[2].mlp.down_proj.weight.abs().sum() > 0


def test_init_from_keeps_the_start_vocabulary(target, tmp_path):
    data = tmp_path / "data.jsonl"
    write_data(target, data, count=4)
    sequences = read_sequences(data, max_len=64)
    base = dict(num_layers=1, block_size=4, num_tapped_layers=1, mask_token_id=1)
    start = DraftTrainer(target, sequences[:2], TrainConfig(**base), tmp_path / "a")
    save_draft(start.model, tmp_path / "start")
    further = TrainConfig(**base, init_from=str(tmp_path / "start"))
    warm = DraftTrainer(target, sequences[2:], further, tmp_path / "b")
    old = {t for seq in sequences[:2] for t in seq.token_ids}
    new = {t for seq in sequences[2:] for t in seq.token_ids}
    assert old - new  # the new data lacks some tokens of the start draft
    assert warm.model.config.draft_vocab_ids == tuple(sorted(old | new))


def test_bf16_without_cpu_support_warns(target, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("dflash_core.training.trainer.cpu_has_bf16_instructions", lambda: False)
    config = TrainConfig(num_layers=1, block_size=4, num_tapped_layers=1, precision="bfloat16")
    DraftTrainer(target, [], config, tmp_path)
    assert "pass --precision float32" in caplog.text
