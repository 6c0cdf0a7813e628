"""Checkpoints: config.json + model.safetensors round trip, and clear errors for broken folders."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mindeye.errors import FormatError, MissingFileError
from mindeye.models import build_model, load_checkpoint, read_checkpoint_config, save_checkpoint

VOXELS = {"subj01": 40, "subj02": 50}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model("tiny", voxels_per_subject=VOXELS).eval()


def outputs(model, voxels):
    with torch.no_grad():
        out = model(voxels, "subj02")
        sampled = model.prior.sample(out.backbone_tokens, steps=4, generator=torch.Generator().manual_seed(0))
    return out.backbone_tokens, out.retrieval_tokens, out.low_level_latent, sampled


def test_round_trip_gives_identical_outputs(model, tmp_path):
    save_checkpoint(model, tmp_path / "ckpt", extra={"run": "unit-test", "epoch": 3})
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert not loaded.training
    assert loaded.config == model.config
    voxels = torch.randn(3, 50)
    for expected, got in zip(outputs(model, voxels), outputs(loaded, voxels)):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    config, meta = read_checkpoint_config(tmp_path / "ckpt")
    assert config == model.config
    assert meta["extra"] == {"run": "unit-test", "epoch": 3}
    assert meta["format_version"] == 1 and len(meta["weights_sha256"]) == 64
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_round_trip_keeps_dtype_and_added_subjects(model, tmp_path):
    model.add_subject("subj09", 30)
    model = model.to(torch.bfloat16)
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path)
    assert loaded.config.voxels_per_subject == {**VOXELS, "subj09": 30}
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    voxels = torch.randn(2, 30, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(voxels, "subj09").retrieval_tokens, model(voxels, "subj09").retrieval_tokens)


def test_tampered_voxel_count_names_the_mismatched_tensors(model, tmp_path):
    save_checkpoint(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["voxels_per_subject"]["subj02"] = 51
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"wrong shapes \[aligner\.linears\.subj02\.weight: file \(64, 50\), "
                                          r"config \(64, 51\)\]"):
        load_checkpoint(tmp_path)


def test_config_with_an_extra_subject_names_the_missing_tensors(model, tmp_path):
    save_checkpoint(model, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["config"]["voxels_per_subject"]["subj03"] = 20
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(FormatError, match=r"missing \[aligner\.linears\.subj03\.bias, "
                                          r"aligner\.linears\.subj03\.weight\]"):
        load_checkpoint(tmp_path)


def test_truncated_weights_fail_the_hash_check(model, tmp_path):
    save_checkpoint(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(FormatError, match="truncated, modified or from another checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FormatError, match="should be a safetensors file"):
        load_checkpoint(tmp_path, verify_hash=False)


def test_missing_files_are_named(model, tmp_path):
    with pytest.raises(MissingFileError, match="missing checkpoint config"):
        load_checkpoint(tmp_path)
    save_checkpoint(model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="missing checkpoint weights"):
        load_checkpoint(tmp_path)


def test_foreign_config_json_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(FormatError, match="format should be 'mindeye2-checkpoint'"):
        load_checkpoint(tmp_path)


def test_non_json_extra_is_rejected_before_writing(model, tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(model, tmp_path, extra={"optimizer": torch.zeros(2)})
    assert not (tmp_path / "config.json").exists()


def test_calibration_round_trip_and_errors(tmp_path):
    from mindeye.errors import FormatError, MissingFileError
    from mindeye.models import calibration_units, load_calibration, save_calibration

    stats = {"subj01": (np.arange(4, dtype=np.float32), np.full(4, 2.0, np.float32)),
             "subj08": (np.zeros(3, np.float32), np.ones(3, np.float32))}
    save_calibration(tmp_path, stats, units="zscored_per_session", estimator="glmsingle")
    assert calibration_units(tmp_path) == ("zscored_per_session", "glmsingle")
    loaded = load_calibration(tmp_path)
    assert sorted(loaded) == ["subj01", "subj08"]
    for subject, (mean, std) in stats.items():
        np.testing.assert_array_equal(loaded[subject][0], mean)
        np.testing.assert_array_equal(loaded[subject][1], std)
    with pytest.raises(ValueError, match="std must be finite and positive"):
        save_calibration(tmp_path, {"subj01": (np.zeros(2), np.zeros(2))}, units="percent_signal_change",
                         estimator="realtime_glm")
    with pytest.raises(ValueError, match="units must be one of"):
        save_calibration(tmp_path, stats, units="percent", estimator="realtime_glm")
    with pytest.raises(MissingFileError, match="calibration statistics"):
        load_calibration(tmp_path / "nowhere")
    from safetensors.numpy import save_file

    save_file({"subj01.mean": np.zeros(2, np.float32)}, str(tmp_path / "calibration.safetensors"))
    with pytest.raises(FormatError, match="missing"):
        load_calibration(tmp_path)
    assert calibration_units(tmp_path) == ("unknown", "unknown")  # written before units were recorded
