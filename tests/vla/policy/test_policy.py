"""The VLA policy: two embodiments with different action sizes through one backbone; masked loss; parallel vs
autoregressive decoding; overfitting a fixed chunk; save/load."""

import pytest
import torch

from backbone.tokenizer import build_bpe_tokenizer
from helpers import tiny_policy
from heads.embodiment import Embodiment, EmbodimentRegistry
from vla.policy import ACTION, VLAPolicyConfig, VLAPolicy, build_policy

CAM = "observation.images.top"
WRIST = "observation.images.wrist"


ROBOTS = [Embodiment("point2d", action_dim=2, state_dim=2, cameras=(CAM,), fps=10, chunk_len=4),
          Embodiment("arm3", action_dim=3, state_dim=5, cameras=(CAM, WRIST), fps=20, chunk_len=3)]


def registry():
    return EmbodimentRegistry(ROBOTS)


def make_policy(decoding="parallel", seed=0, **cfg):
    return tiny_policy(ROBOTS, seed=seed, decoding=decoding, **cfg)


def make_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B = 2
    batch = {
        CAM: torch.rand(B, 3, 32, 32, generator=g),
        WRIST: torch.rand(B, 3, 32, 32, generator=g),
        "observation.state": torch.rand(B, 5, generator=g) * 2 - 1,
        "action": torch.rand(B, 4, 3, generator=g) * 1.8 - 0.9,
        "action_is_pad": torch.zeros(B, 4, dtype=torch.bool),
        "task": ["go to the red square", "touch the blue circle"],
        "embodiment": ["point2d", "arm3"],
    }
    return batch


def test_sequence_has_each_robots_own_action_count():
    policy = make_policy()
    seq = policy.build_sequences(make_batch())
    assert seq.num_actions == [4 * 2, 3 * 3]
    assert [(seq.kinds[b] == ACTION).sum().item() for b in range(2)] == [8, 9]
    assert (seq.block_ids[seq.kinds == ACTION] == 0).all() and (seq.block_ids[seq.kinds != ACTION] == -1).all()


def test_robot_targets_encode_each_sample_with_its_own_robots_binner():
    """The targets are encoded one robot at a time (one call per robot, not per sample): each sample's bins, offsets
    and weights are still those of its own robot's chunk, in batch order."""
    policy = make_policy()
    batch = make_batch()
    for key in ("action", "action_is_pad", "observation.state", CAM, WRIST):
        batch[key] = torch.cat([batch[key], batch[key].flip(0)])  # point2d, arm3, arm3, point2d
    batch["embodiment"] = ["point2d", "arm3", "arm3", "point2d"]
    batch["task"] = batch["task"] * 2
    batch["action"] = torch.rand(4, 4, 3, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9  # all different
    batch["action_is_pad"][2, 3:] = True
    robot = policy._robot_targets(batch)
    for b, emb in enumerate(policy._embodiments(batch, 4)):
        bins, offsets = policy.binners[emb.name].encode_with_offsets(batch["action"][b, : emb.chunk_len, : emb.action_dim])
        assert torch.equal(robot["bins"][b], bins) and torch.equal(robot["offsets"][b], offsets)
        weights = torch.where(batch["action_is_pad"][b, : emb.chunk_len], policy.config.pad_loss_weight, 1.0)
        assert torch.equal(robot["weights"][b], weights[:, None].expand(-1, emb.action_dim))


def test_instruction_first_moves_only_the_instruction_before_the_images():
    from vla.policy.model import IMAGE, TEXT

    batch = make_batch()
    policy, first = make_policy(), make_policy(instruction_first=True)  # same seed: same weights
    for b, task in enumerate(batch["task"]):
        last_word = policy.backbone.language.embed(torch.tensor(policy.tokenizer.encode(task)[-1:]))[0]
        for model, before_images in ((policy, False), (first, True)):
            seq = model.build_sequences(batch)
            kinds = seq.kinds[b].tolist()
            # the same image and action tokens (the text is tokenized in other pieces, so its count may differ by one)
            assert [kinds.count(k) for k in (IMAGE, ACTION)] == [
                (policy.build_sequences(batch).kinds[b] == k).sum().item() for k in (IMAGE, ACTION)]
            at = [t for t, kind in enumerate(kinds) if kind == TEXT and torch.equal(seq.inputs_embeds[b, t], last_word)]
            assert at and all((t < kinds.index(IMAGE)) == before_images for t in at)


def test_padded_steps_do_not_count_in_the_loss():
    policy = make_policy()
    batch = make_batch()
    batch["action_is_pad"][0, 2:] = True
    loss_a, _ = policy(batch)
    batch["action"][0, 2:] = torch.rand(2, 3) * 2 - 1  # change only padded steps
    loss_b, _ = policy(batch)
    assert torch.allclose(loss_a, loss_b)
    batch["action"][0, 0] = -batch["action"][0, 0]  # a real step changes the loss
    loss_c, _ = policy(batch)
    assert not torch.allclose(loss_a, loss_c)


def test_camera_dropout_blacks_out_a_share_of_frames_in_training_only():
    policy = make_policy(camera_dropout={"top": 0.5})
    assert policy.config.camera_dropout == {CAM: 0.5}
    n = 64  # the arm has a wrist camera besides the top one; the point robot's top camera is its only one
    batch = {CAM: torch.rand(n, 3, 32, 32) + 0.1, "observation.state": torch.zeros(n, 5),
             "embodiment": ["point2d", "arm3"] * (n // 2)}
    torch.manual_seed(0)
    dropped = policy.train()._drop_cameras(batch)[CAM]
    black = (dropped.flatten(1) == 0).all(1)
    assert not black[0::2].any() and 8 < int(black[1::2].sum()) < 24
    assert torch.equal(dropped[~black], batch[CAM][~black]) and batch[CAM].min() > 0  # the caller's batch untouched
    batch = make_batch()
    policy.eval()
    loss_eval = policy(batch)[0]
    assert torch.equal(loss_eval, policy(batch)[0])  # nothing random outside training
    with pytest.raises(ValueError, match="camera_dropout"):
        make_policy(camera_dropout={"top": 1.0})


def test_pad_loss_weight_trains_padded_steps_and_counts_them():
    policy = make_policy(pad_loss_weight=0.5)
    batch = make_batch()
    batch["action_is_pad"][0, 2:] = True
    loss_a, _ = policy(batch)
    batch["action"][0, 2:] = torch.rand(2, 3) * 2 - 1  # padded steps now count
    assert not torch.allclose(loss_a, policy(batch)[0])
    # the units the action loss averages over: 2 real + 2 x 0.5 padded steps of the point robot, 3 steps of the arm
    assert policy.loss_weights(batch)["action"] == (2 + 2 * 0.5) * 2 + 3 * 3
    with pytest.raises(ValueError, match="pad_loss_weight"):
        make_policy(pad_loss_weight=-1.0)


def _overfit(policy, batch, steps):
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    policy.train()
    for _ in range(steps):
        loss, metrics = policy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    policy.eval()
    return metrics


@pytest.mark.parametrize("decoding", ["parallel", "autoregressive"])
def test_overfit_two_embodiments_to_within_a_bin(decoding):
    policy = make_policy(decoding)
    batch = make_batch()
    metrics = _overfit(policy, batch, 120)
    assert metrics["bin_accuracy"] > 0.95, metrics
    chunk = policy.predict_action_chunk(batch)
    bin_width = 2 / 256
    assert (chunk[0, :4, :2] - batch["action"][0, :4, :2]).abs().max() < bin_width
    assert (chunk[1, :3, :3] - batch["action"][1, :3, :3]).abs().max() < bin_width


def test_parallel_and_autoregressive_policies_each_memorise_the_same_bins():
    """Two policies, one per decoding, each overfit to the same chunk, decode the same bins (bin centres, no offset
    head). This checks memorisation, not that the two decodings agree on one set of weights; for the decoding
    guarantee see test_cached_autoregressive_decoding_equals_teacher_forced_argmax."""
    batch = make_batch(1)
    chunks = {}
    for decoding in ("parallel", "autoregressive"):
        policy = make_policy(decoding, continuous_offset=False)
        _overfit(policy, batch, 120)
        chunks[decoding] = policy.predict_action_chunk(batch)
    assert torch.equal(chunks["parallel"], chunks["autoregressive"])


@pytest.mark.parametrize("use_mla", [True, False], ids=["mla", "mha"])
@pytest.mark.parametrize("router_prior", [False, True], ids=["no_prior", "router_prior"])
def test_cached_autoregressive_decoding_equals_teacher_forced_argmax(one_thread, use_mla, router_prior):
    """One set of random weights: the cached autoregressive decode (prefill into the KV cache, then one action token
    at a time, constrained to the action bins) equals the argmax of one teacher-forced forward whose targets are the
    decoded bins, at every action position, for a left-padded batch of two robots with different action sizes, chunk
    lengths, state sizes and cameras (so prompts and full sequences differ in length)."""
    torch.manual_seed(0)
    policy = build_policy(VLAPolicyConfig(decoding="autoregressive", continuous_offset=False, router_prior=router_prior,
                                          max_chunk_len=8, max_action_dim=4),
                          registry(), build_bpe_tokenizer(vocab_size=300), "test", use_mla=use_mla).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # New vocabulary rows start as the mean row plus 0.1 std of noise, so the bin logits of random weights are
        # near ties; drawing the action rows afresh (fixed seed) spreads them without touching the check itself.
        head = policy.backbone.language.lm_head.weight
        head[policy.action_token_ids] = torch.randn(len(policy.action_token_ids), head.shape[1], generator=g)
        if router_prior:  # zero at init, which would hide a decode that ignores it
            policy.router_prior.bias.normal_(0.0, 2.0, generator=g)
    batch = make_batch(0)
    embodiments = [policy.registry.get(name) for name in batch["embodiment"]]
    assert len({(e.chunk_len, e.action_dim, e.state_dim) for e in embodiments}) == 2

    chunk = policy.predict_action_chunk(batch)
    decoded = [policy.binners[e.name].encode(chunk[b, : e.chunk_len, : e.action_dim]) for b, e in enumerate(embodiments)]
    for b, (e, bins) in enumerate(zip(embodiments, decoded)):  # bin centres: the chunk says exactly which bins
        assert torch.equal(policy.binners[e.name].decode(bins), chunk[b, : e.chunk_len, : e.action_dim])

    prompt = policy.build_sequences(batch)
    full = policy.build_sequences(batch, decoded)
    assert (~prompt.attention_mask).any() and (~full.attention_mask).any()  # left padding in both
    assert full.num_actions == [e.chunk_len * e.action_dim for e in embodiments]
    with torch.no_grad():
        out = policy.backbone.language(inputs_embeds=full.inputs_embeds, attention_mask=full.attention_mask,
                                       router_bias=policy._router_bias(full), compute_logits=False)
        hidden_ND, _ = policy._action_hidden(out.hidden_states, full)
        logits_NK = policy._bin_logits(hidden_ND)
    teacher_forced = logits_NK.argmax(-1)
    top2 = logits_NK.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1e-3, "near-tied bin logits: the comparison would hang on rounding"
    decoded_N = torch.cat([d.reshape(-1) for d in decoded])
    mismatch = (teacher_forced != decoded_N).nonzero().flatten().tolist()
    assert not mismatch, f"cached decode differs from the teacher-forced argmax at action positions {mismatch}"


def test_select_action_serves_a_chunk_from_the_queue_and_save_load(tmp_path):
    policy = make_policy(n_action_steps=2).eval()
    batch = make_batch()
    calls = []
    original = policy.predict_action_chunk
    policy.predict_action_chunk = lambda b: calls.append(1) or original(b)
    actions = [policy.select_action(batch) for _ in range(4)]
    assert len(calls) == 2 and actions[0].shape == (2, 3)
    policy.predict_action_chunk = original
    policy.save(tmp_path)
    again = VLAPolicy.load(tmp_path)
    assert torch.equal(again.predict_action_chunk(batch), policy.predict_action_chunk(batch))
    assert again.tokenizer.token_id("<|act_255|>") == policy.tokenizer.token_id("<|act_255|>")
    # a truncated head file or a malformed config is an error naming the file, not a safetensors / json traceback
    from backbone.checkpoint import CheckpointError

    head = tmp_path / "policy_head.safetensors"
    head.write_bytes(head.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="policy_head.safetensors: corrupt or truncated"):
        VLAPolicy.load(tmp_path)
    (tmp_path / "policy_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="policy_config.json: not valid JSON"):
        VLAPolicy.load(tmp_path)


def test_unknown_embodiment_and_missing_camera_are_clear_errors():
    policy = make_policy()
    batch = make_batch()
    batch["embodiment"] = ["point2d", "hexapod"]
    with pytest.raises(KeyError, match="hexapod"):
        policy(batch)
    batch = make_batch()
    del batch[WRIST]
    with pytest.raises(KeyError, match="wrist"):
        policy(batch)


def test_routing_analysis_on_policy_batches(tmp_path):
    from vla.policy.routing import collect_policy_routing, plot_routing_heatmap, write_routing_json

    policy = make_policy(router_prior=True).eval()
    stats = collect_policy_routing(policy, [make_batch(0), make_batch(1)])
    assert {"action:point2d", "action:arm3", "image", "text", "state"} <= set(stats.groups)
    report = write_routing_json(stats, tmp_path / "routing.json")
    assert len(report["layers"]) == policy.backbone.language.config.num_hidden_layers - 1
    plot_routing_heatmap(stats, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").stat().st_size > 1000
    # the router prior is a learned bias that only touches action tokens
    with torch.no_grad():
        policy.router_prior.bias[0].fill_(5.0)
        policy.router_prior.bias[0, :, 0] = 50.0  # point2d action tokens always pick expert 0
    stats = collect_policy_routing(policy, [make_batch(0)])
    shares = stats.shares(1)
    assert shares["action:point2d"][0] > 0.45 and shares["image"][0] < 0.9


GROUNDING = ["<|ref|>the red square<|/ref|><|det|>[[120,345,310,560]]<|/det|>",
             "<|ref|>the blue circle<|/ref|><|det|>[[600,100,720,230]]<|/det|>"]


def test_ground_target_puts_the_recorded_box_before_the_actions_and_trains_it():
    from vla.policy.model import TEXT

    policy = make_policy(ground_target=True)
    batch = make_batch() | {"grounding": GROUNDING}
    seq = policy.build_sequences(batch, grounding=policy._recorded_grounding(batch))
    for b, text in enumerate(GROUNDING):
        ids = policy.tokenizer.encode(text)
        start = seq.ground_start[b]
        assert seq.num_ground[b] == len(ids) and start + len(ids) == seq.action_start[b]
        assert (seq.kinds[b, start:start + len(ids)] == TEXT).all()
        assert torch.equal(seq.inputs_embeds[b, start:start + len(ids)], policy.backbone.language.embed(torch.tensor(ids)))
    out = policy(batch, return_terms=True)
    assert "ground" in out.terms and policy.loss_weights(batch)["ground"] == sum(len(policy.tokenizer.encode(t)) for t in GROUNDING)
    # the actions read the answer: another box, another action loss
    other = make_batch() | {"grounding": [GROUNDING[1].replace("blue circle", "red square"), GROUNDING[1]]}
    assert not torch.allclose(out.terms["action"], policy(other, return_terms=True).terms["action"])
    with pytest.raises(ValueError, match="grounding"):
        policy(make_batch())  # a dataset without recorded targets
    with pytest.raises(ValueError, match="ground_target"):
        make_policy("autoregressive", ground_target=True)
    with pytest.raises(ValueError, match="needs ground_target"):
        make_policy(target_token=True)


def test_target_token_carries_the_answers_box_as_numbers():
    from vla.policy.model import STATE

    policy = make_policy(ground_target=True, target_token=True)
    batch = make_batch() | {"grounding": GROUNDING}
    seq = policy.build_sequences(batch, grounding=policy._recorded_grounding(batch))
    b = 1
    at = seq.ground_start[b] + seq.num_ground[b]  # right after the answer, before the actions
    assert seq.kinds[b, at] == STATE and at + 1 == seq.action_start[b]
    x = torch.tensor([600, 100, 720, 230]) / 999 * 2 - 1
    expected = policy.box_proj.proj(torch.cat([x, torch.ones(1)]))
    assert torch.allclose(seq.inputs_embeds[b, at], expected)
    assert policy._answer_box(policy.tokenizer.encode("<|ref|>the blue circle<|/ref|><|det|>[[60")) is None


@pytest.mark.parametrize("target_token", [False, True])
def test_ground_target_policy_says_the_box_it_learned_then_acts(target_token, one_thread):
    policy = make_policy(ground_target=True, target_token=target_token)
    batch = make_batch() | {"grounding": GROUNDING}
    metrics = _overfit(policy, batch, 200)
    assert metrics["ground_token_acc"] > 0.99 and metrics["bin_accuracy"] > 0.95, metrics
    inference = {k: v for k, v in batch.items() if k not in ("grounding", "action", "action_is_pad")}
    chunk = policy.predict_action_chunk(inference)  # generates the answer itself
    assert policy.last_grounding == GROUNDING
    assert (chunk[0, :4, :2] - batch["action"][0, :4, :2]).abs().max() < 2 / 256


def test_compile_decoding_keeps_the_policy_as_it_was():
    """compile_decoding() compiles lazily (nothing runs until a chunk generates) and registers nothing: the state dict,
    the parameters and the saved checkpoint are those of the eager policy. (The compiled passes' tokens equal the
    eager ones: tests/backbone/test_generate.py, and `vla bench policy`'s `grounded_compiled_same_answer`.)"""
    policy = make_policy(ground_target=True)
    keys = list(policy.state_dict())
    assert policy.generates and not make_policy().generates and make_policy("autoregressive").generates
    assert policy.compile_decoding() < 1.0  # no warm-up asked: nothing compiled yet
    assert list(policy.state_dict()) == keys
    assert not [n for n, _ in policy.named_modules() if "_orig_mod" in n]
