"""mindeye-train on the tiny world: pretraining learns, fine-tuning starts from the pretrained shared weights,
resume reproduces an uninterrupted run, a 2-process DDP run matches the 1-process run, configs and --help."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from mindeye.config import CONFIG_DIR, load_config
from mindeye.errors import ConfigValueError
from mindeye.evaluation import two_way_identification
from mindeye.models import build_model, calibration_units, load_checkpoint
from mindeye.models.readout import READOUT_FILE, load_readouts
from mindeye.targets import build_target_cache
from offline_training.data import hold_out_fold, load_subject
from offline_training.evaluate import predict_test_set
from offline_training.trainer import BatchPlan, init_from_pretrained, make_optimizer, train

REPO = Path(__file__).resolve().parents[1]
NO_DROPOUT = ["model.dropout=0", "model.low_level.dropout=0"]
pytestmark = pytest.mark.usefixtures("one_thread")


def overrides(root: Path, out_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={root}", f"out_dir={out_dir}", "cpu=true", "progress=false", "subjects=[1,2]", *extra]


def run(root: Path, out_dir: Path, *extra: str) -> Path:
    return train(load_config("train", overrides(root, out_dir, *extra)))


def read_log(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(out_dir / "checkpoint").state_dict()


@pytest.fixture(scope="module")
def pretrained(tiny_world, tmp_path_factory):
    """Subjects 1 and 2 pretrained for 8 epochs (dropout, BiMixCo then SoftCLIP, all losses)."""
    root, previous = tiny_world[0], torch.get_num_threads()
    torch.set_num_threads(1)  # module scope: the per-test one_thread fixture does not reach here
    yield root, run(root, tmp_path_factory.mktemp("pretrain"), "train.epochs=8")
    torch.set_num_threads(previous)


# --- pretraining and its outputs ---------------------------------------------------------------------------

def test_pretraining_lowers_the_loss_and_retrieves_test_images_far_above_chance(pretrained):
    _, out_dir = pretrained
    log = read_log(out_dir)
    assert [r["epoch"] for r in log] == list(range(1, 9))
    assert [r["contrastive"] for r in log] == ["bimixco"] * 2 + ["softclip"] * 6  # int(0.33 * 8) = 2
    first, last = log[0], log[-1]
    assert last["train/loss"] < 0.6 * first["train/loss"]
    assert last["train/prior"] < first["train/prior"] and last["test/prior_loss"] < first["test/prior_loss"]
    assert last["test/chance"] == pytest.approx(1 / 30)  # 30 shared test images: 30-way retrieval
    assert last["test/image_top1"] >= 4 * last["test/chance"]
    assert last["test/brain_top1"] >= 3 * last["test/chance"]
    assert {"test/subj01/image_top1", "test/subj02/brain_top1"} <= set(last)
    assert last["lr"] < 1e-6  # OneCycleLR ends at max_lr / 25 / 1000
    assert (out_dir / "training.png").stat().st_size > 10_000


def test_checkpoint_holds_the_model_the_run_config_and_the_calibration_statistics(pretrained):
    root, out_dir = pretrained
    model = load_checkpoint(out_dir / "checkpoint")
    meta = json.loads((out_dir / "checkpoint" / "config.json").read_text())
    assert meta["extra"]["mode"] == "pretrain" and meta["extra"]["epochs_done"] == 8
    assert meta["extra"]["run"]["train"]["batch_per_subject"] == 16
    assert (model.config.clip_tokens, model.config.clip_dim) == (16, 64)  # injected from the world's encoder
    assert (model.config.low_level.latent_channels, model.config.low_level.latent_size) == (3, 16)
    calibration = load_file(out_dir / "checkpoint" / "calibration.safetensors")
    assert sorted(calibration) == ["subj01.mean", "subj01.std", "subj02.mean", "subj02.std"]
    data_cfg = load_config("train", [f"data.root={root}"]).data
    subj02 = load_subject(data_cfg, 2)
    np.testing.assert_array_equal(calibration["subj02.std"], subj02.zscore_std)
    # the world's nifti betas: its offline GLM's percent signal change, recorded for the live backend's check
    assert calibration_units(out_dir / "checkpoint") == ("percent_signal_change", "offline_glm")
    assert model.config.voxels_per_subject["subj02"] == subj02.n_voxels
    readouts = load_readouts(out_dir / "checkpoint")
    assert sorted(readouts) == ["subj01", "subj02"] and readouts["subj02"].n_trials == len(subj02.train_voxels)
    test = predict_test_set(model.eval(), subj02)  # the readout generalises to the test images' backbone tokens
    with torch.no_grad():
        tokens = readouts["subj02"](torch.from_numpy(test.backbone_tokens)).numpy()
    true = build_target_cache(data_cfg).get(test.image_ids)[0]
    two_way = two_way_identification(tokens.reshape(len(true), -1), true.reshape(len(true), -1))
    assert two_way > 0.8
    with torch.no_grad():
        out = model(torch.from_numpy(subj02.test_voxels[:3]), "subj02")
    assert out.low_level_latent.shape == (3, 3, 16, 16)


# --- fine-tuning -------------------------------------------------------------------------------------------

def test_finetune_initialisation_loads_every_shared_weight_and_adds_a_fresh_aligner(pretrained):
    _, out_dir = pretrained
    source = load_checkpoint(out_dir / "checkpoint").state_dict()
    model = init_from_pretrained(out_dir / "checkpoint", {"subj08": 123}, (16, 64), (3, 16, 16))
    state = model.state_dict()
    assert model.config.subjects == ["subj08"] and model.training
    assert sorted(k for k in state if k.startswith("aligner.")) == ["aligner.linears.subj08.bias",
                                                                    "aligner.linears.subj08.weight"]
    shared = [k for k in state if not k.startswith("aligner.")]
    assert shared and all(torch.equal(state[k], source[k]) for k in shared)
    assert state["aligner.linears.subj08.weight"].shape == (64, 123)
    kept = init_from_pretrained(out_dir / "checkpoint", {"subj02": source["aligner.linears.subj02.weight"].shape[1]},
                                (16, 64), (3, 16, 16))  # a pretrained subject keeps its aligner
    assert torch.equal(kept.state_dict()["aligner.linears.subj02.weight"], source["aligner.linears.subj02.weight"])
    with pytest.raises(ValueError, match="has an aligner for subj02 with"):
        init_from_pretrained(out_dir / "checkpoint", {"subj02": 7}, (16, 64), (3, 16, 16))
    with pytest.raises(ValueError, match="predicts 16 x 64 tokens"):
        init_from_pretrained(out_dir / "checkpoint", {"subj08": 7}, (16, 32), (3, 16, 16))


def test_one_session_finetune_of_a_held_out_subject_starts_where_scratch_cannot(pretrained, tmp_path):
    root, pretrain_dir = pretrained
    one_session = ["subjects=[8]", "train_sessions=[1]", "train.epochs=4"]
    finetune = run(root, tmp_path / "finetune", "mode=finetune", *one_session, f"init_from={pretrain_dir}",
                   "train.eval.sample_every=2", "train.eval.sample_steps=5")
    scratch = run(root, tmp_path / "scratch", "mode=scratch", *one_session, "readout.max_trials=10")
    assert load_checkpoint(finetune / "checkpoint").config.subjects == ["subj08"]
    assert list(load_file(finetune / "checkpoint" / "calibration.safetensors")) == ["subj08.mean", "subj08.std"]
    tuned, fresh = read_log(finetune), read_log(scratch)
    n_session_trials = len(load_subject(load_config("train", [f"data.root={root}"]).data, 8, [1]).train_voxels)
    assert tuned[-1]["step"] == 4 * (n_session_trials // 16)  # an epoch = one pass over the one session
    # the pretrained backbone and prior transfer to a subject they never saw: far lower test prior loss
    assert all(t["test/prior_loss"] < 0.7 * f["test/prior_loss"] for t, f in zip(tuned, fresh))
    assert [("test/sampled_image_top1" in r) for r in tuned] == [False, True, False, True]
    assert 0 <= tuned[-1]["test/sampled_image_top1"] <= 1
    # the token readout, fitted on the session's trials when the run ended; none above readout.max_trials
    readout = load_readouts(finetune / "checkpoint")["subj08"]
    assert readout.n_trials == n_session_trials and readout.token_shape == (16, 64)
    assert not (scratch / "checkpoint" / READOUT_FILE).exists()


def test_an_adapter_finetune_trains_the_aligner_and_low_rank_backbone_updates_only(pretrained, tmp_path):
    root, pretrain_dir = pretrained
    tuned = run(root, tmp_path / "lora", "mode=finetune", "subjects=[8]", "train_sessions=[1]", "train.epochs=2",
                f"init_from={pretrain_dir}", "adapter_rank=2", "train.eval.sample_every=0")
    before, after = weights(pretrain_dir), weights(tuned)  # the checkpoint: a plain model, adapters merged
    assert set(after) == {k for k in before if not k.startswith("aligner.")} | {"aligner.linears.subj08.weight",
                                                                                 "aligner.linears.subj08.bias"}
    frozen = [k for k in after if not k.startswith(("aligner.", "backbone."))]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # heads and prior untouched
    for name in ("backbone.to_tokens.weight", "backbone.blocks.0.fc1.weight"):
        singular = torch.linalg.svdvals((after[name] - before[name]).double())
        assert singular[0] > 0 and singular[2] < 1e-2 * singular[0]  # a rank-2 update (float32 rounding aside)
    assert torch.equal(after["backbone.to_tokens.bias"], before["backbone.to_tokens.bias"])
    assert read_log(tuned)[-1]["test/image_top1"] >= 0  # evaluated like any run
    with pytest.raises(ConfigValueError, match="adapter_rank is a positive rank for mode=finetune"):
        run(root, tmp_path / "bad", "mode=scratch", "adapter_rank=2")


def test_a_frozen_prior_finetune_on_a_validation_fold_keeps_the_prior_and_evaluates_held_out_images(
        pretrained, tmp_path):
    root, pretrain_dir = pretrained
    tuned = run(root, tmp_path / "frozen", "mode=finetune", "subjects=[8]", "train_sessions=[1]", "train.epochs=2",
                f"init_from={pretrain_dir}", "freeze=[prior]", "validation_fold=[2,4]", "train.eval.sample_every=0")
    before, after = weights(pretrain_dir), weights(tuned)
    prior = [k for k in after if k.startswith("prior.")]
    assert prior and all(torch.equal(after[k], before[k]) for k in prior)
    assert not torch.equal(after["backbone.to_tokens.weight"], before["backbone.to_tokens.weight"])
    session = load_subject(load_config("train", [f"data.root={root}"]).data, 8, [1])
    held_out = hold_out_fold(session, 4, 2)
    n_images = len(np.unique(session.train_image_ids))
    assert len(np.unique(held_out.test_image_ids)) in (n_images // 4, n_images // 4 + 1)
    assert not set(held_out.test_image_ids) & set(held_out.train_image_ids)  # every trial of a held-out image
    assert len(held_out.train_voxels) + len(held_out.test_voxels) == len(session.train_voxels)
    log = read_log(tuned)
    assert log[-1]["step"] == 2 * (len(held_out.train_voxels) // 16)  # trained without the held-out fold
    assert log[-1]["test/chance"] == pytest.approx(1 / len(np.unique(held_out.test_image_ids)))  # evaluated on it
    folds = [set(hold_out_fold(session, 4, k).test_image_ids) for k in (1, 2, 3, 4)]
    assert set().union(*folds) == set(session.train_image_ids) and sum(map(len, folds)) == n_images
    with pytest.raises(ConfigValueError, match="2 optimizer step\\(s\\), too few for the one-cycle schedule"):
        run(root, tmp_path / "short", "mode=finetune", "subjects=[8]", "train_sessions=[1]", "train.epochs=1",
            f"init_from={pretrain_dir}", "validation_fold=[1,2]")  # half a short session: 2 batches of 16


# --- resume and multi-process equality ---------------------------------------------------------------------

def test_resume_after_an_epoch_reproduces_the_uninterrupted_run_exactly(tiny_world, tmp_path):
    root = tiny_world[0]
    settings = ["train.epochs=3", "train.mixup.fraction=0.5"]  # epoch 1 BiMixCo, 2-3 SoftCLIP; dropout on
    whole = run(root, tmp_path / "whole", *settings)
    run(root, tmp_path / "parts", *settings, "train.stop_after_epoch=1")
    assert [r["epoch"] for r in read_log(tmp_path / "parts")] == [1]
    with pytest.raises(FileExistsError, match="resume=true continues it"):
        run(root, tmp_path / "parts", *settings)
    with pytest.raises(ValueError, match="differs from the run"):
        run(root, tmp_path / "parts", "train.epochs=4", "train.mixup.fraction=0.5", "resume=true")
    parts = run(root, tmp_path / "parts", *settings, "resume=true")
    expected, got = weights(whole), weights(parts)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    strip = lambda log: [{k: v for k, v in r.items() if k != "seconds"} for r in log]  # noqa: E731
    assert strip(read_log(parts)) == strip(read_log(whole))


def test_bfloat16_autocast_follows_the_float32_run_and_saves_float32_weights(tiny_world, tmp_path):
    """The claim benchmark trains in bf16 autocast on CPU (benchmarks/results/train_step_profile.txt): the same
    batches give the float32 run's losses to bf16 rounding, and the checkpoint keeps float32 weights."""
    root = tiny_world[0]
    settings = ["train.epochs=2", *NO_DROPOUT]
    fp32 = read_log(run(root, tmp_path / "fp32", *settings))
    bf16_dir = tmp_path / "bf16"  # its own process: accelerate fixes the precision once per process
    command = [sys.executable, "-m", "offline_training.train",
               *overrides(root, bf16_dir, *settings, "train.mixed_precision=bf16")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    bf16 = read_log(bf16_dir)
    for key in ("train/loss", "train/prior", "train/contrastive"):
        assert bf16[0][key] == pytest.approx(fp32[0][key], rel=0.03), key
    assert bf16[-1]["train/loss"] < bf16[0]["train/loss"]
    assert {str(w.dtype) for w in weights(bf16_dir).values()} == {"torch.float32"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_run_gives_the_one_process_checkpoint(tiny_world, tmp_path):
    """Same global batch of 2 x 16, split 8 + 8 across two gloo processes: the contrastive loss gathers
    both halves, so the run must follow the one-process run (mixup on; dropout off, being per-process)."""
    root = tiny_world[0]
    settings = ["train.epochs=2", "train.mixup.fraction=0.5", *NO_DROPOUT]
    one = run(root, tmp_path / "one", *settings)
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(CONFIG_DIR / "accelerate" / "cpu_2proc.yaml"), "--main_process_port",
               str(free_port()), "-m", "offline_training.train", *overrides(root, tmp_path / "two", *settings)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    single, double = load_checkpoint(one / "checkpoint"), load_checkpoint(tmp_path / "two" / "checkpoint")
    voxels = torch.from_numpy(load_subject(load_config("train", [f"data.root={root}"]).data, 2).test_voxels[:20])
    generator = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    with torch.no_grad():
        a, b = single(voxels, "subj02"), double(voxels, "subj02")
        samples = [m.prior.sample(out.backbone_tokens, steps=5, generator=generator())
                   for m, out in ((single, a), (double, b))]
    for x, y in ((a.backbone_tokens, b.backbone_tokens), (a.retrieval_tokens, b.retrieval_tokens), tuple(samples)):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-4)
    # The low-level branch is trained by L1, whose gradient is a sign: rounding that flips it is amplified.
    # Two one-process runs differing only in their thread count differ by ~2e-3 here (latents span [-1, 1]).
    torch.testing.assert_close(b.low_level_latent, a.low_level_latent, rtol=0, atol=1e-2)
    assert not torch.equal(weights(one)["backbone.to_tokens.weight"],
                           build_model(single.config).state_dict()["backbone.to_tokens.weight"])  # it trained
    log_one, log_two = read_log(one), read_log(tmp_path / "two")
    for key in ("train/loss", "train/contrastive", "test/image_top1"):
        assert log_two[-1][key] == pytest.approx(log_one[-1][key], abs=1e-4)


# --- pieces, configs and errors ------------------------------------------------------------------------------

def test_batch_plan_splits_each_subjects_block_evenly_and_reorders_the_gathered_rows():
    plans = [BatchPlan([40, 25], batch_per_subject=4, num_processes=2, process_index=r, seed=0) for r in (0, 1)]
    assert plans[0].steps_per_epoch == 10  # the largest subject's 40 trials
    assert plans[0].local_rows.tolist() == [0, 1, 4, 5] and plans[1].local_rows.tolist() == [2, 3, 6, 7]
    gathered = torch.cat([p.local_rows for p in plans])  # what all_gather returns, rank-major
    assert gathered[plans[0].canonical_from_gathered].tolist() == list(range(8))
    order = plans[0].epoch_order(epoch=3)
    assert sorted(order[0].tolist()) == list(range(40))  # the largest subject: one pass
    assert len(order[1]) == 40 and set(order[1].tolist()) == set(range(25))  # the smaller one: reshuffled passes
    assert all(np.array_equal(a, b) for a, b in zip(order, plans[1].epoch_order(epoch=3)))  # same on every process
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        BatchPlan([40], batch_per_subject=5, num_processes=2, process_index=0, seed=0)
    with pytest.raises(ValueError, match="exceeds a subject's training set"):
        BatchPlan([40, 3], batch_per_subject=4, num_processes=1, process_index=0, seed=0)


def test_samples_per_epoch_sets_the_steps_of_an_epoch_over_all_subjects_as_the_official_code():
    # the official pretraining: 750 trials x 40 sessions an epoch in global batches of 6 x 7 subjects
    plan = BatchPlan([9000] * 7, batch_per_subject=6, num_processes=1, process_index=0, seed=0,
                     samples_per_epoch=30000)
    assert plan.steps_per_epoch == 30000 // 42  # 714, not 9000 // 6 = 1500 (one pass over a subject)
    order = BatchPlan([40, 25], batch_per_subject=4, num_processes=1, process_index=0, seed=0,
                      samples_per_epoch=96).epoch_order(epoch=0)
    assert [len(o) for o in order] == [48, 48]  # 12 steps of 4 from each subject: past one pass of the smaller
    with pytest.raises(ValueError, match="less than one global batch"):
        BatchPlan([40, 25], batch_per_subject=4, num_processes=1, process_index=0, seed=0, samples_per_epoch=7)


def test_optimizer_does_not_decay_biases_and_normalisation_weights():
    model = build_model("tiny", voxels_per_subject={"subj01": 10})
    decay, no_decay = make_optimizer(model, lr=3e-4, weight_decay=0.01).param_groups
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.01, 0.0)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert {"backbone.blocks.0.norm.weight", "backbone.blocks.0.fc1.bias", "prior.blocks.0.attn_norm.weight",
            "low_level_head.norm.weight", "retrieval_head.0.weight"} <= no_decay_names
    assert all(n.endswith("bias") or "norm" in n or n.startswith("retrieval_head.") for n in no_decay_names)
    assert {"backbone.to_tokens.weight", "prior.blocks.0.to_q.weight"} <= {names[id(p)] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("extra, error, message", [
    (["mode=finetune"], ValueError, "mode=finetune needs init_from"),
    (["init_from=/x"], ValueError, "init_from is only for mode=finetune"),
    (["mode=distill"], ValueError, "mode must be one of"),
    (["subjects=[1,1]"], ValueError, "distinct subject numbers"),
    (["train.eval.subjects=[3]"], ValueError, "must be among the trained subjects"),
    (["resume=true"], FileNotFoundError, "holds no training state"),
    (["freeze=[prior]"], ValueError, "freeze lists parts of a pretrained model for mode=finetune"),
    (["validation_fold=[5,4]"], ValueError, "validation_fold is \\[k, n\\]"),
])
def test_bad_settings_are_refused_with_the_key_named(tmp_path, extra, error, message):
    with pytest.raises(error, match=message):
        train(load_config("train", overrides(tmp_path / "no-world", tmp_path / "run", *extra)))


def test_accelerate_configs_parse_as_accelerate_reads_them():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"cpu_2proc": ("MULTI_GPU", 2, 1), "single_gpu": ("NO", 1, 1), "multi_gpu_ddp": ("MULTI_GPU", 8, 1),
                "multi_node_ddp": ("MULTI_GPU", 16, 2), "fsdp": ("FSDP", 8, 1), "deepspeed_zero2": ("DEEPSPEED", 8, 1)}
    for name, (kind, processes, machines) in expected.items():
        config = load_config_from_file(str(CONFIG_DIR / "accelerate" / f"{name}.yaml"))  # unknown keys raise
        assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes,
                                                                                            machines), name
    zero = load_config_from_file(str(CONFIG_DIR / "accelerate" / "deepspeed_zero2.yaml")).deepspeed_config
    assert (zero["zero_stage"], zero["offload_optimizer_device"]) == (2, "cpu")
    fsdp = load_config_from_file(str(CONFIG_DIR / "accelerate" / "fsdp.yaml")).fsdp_config
    assert set(fsdp["fsdp_transformer_layer_cls_to_wrap"].split(",")) == {"ResidualBlock", "PriorBlock"}


def test_presets_compose():
    for preset in ("tiny", "small", "paper", "paper_pretrain"):
        cfg = load_config("train", [f"train={preset}"])
        assert cfg.train.lr == 3e-4 and cfg.train.loss_weights.prior == 30.0, preset
    assert load_config("train", ["train=paper"]).train.epochs == 150


def test_help_explains_modes_and_examples():
    result = subprocess.run([sys.executable, "-m", "offline_training.train", "--help"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    for text in ("mindeye-train", "pretrain", "finetune", "scratch", "init_from", "accelerate launch",
                 "train: tiny | small | paper | paper_pretrain", "batch_per_subject"):
        assert text in result.stdout, text
